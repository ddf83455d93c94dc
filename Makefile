# Everyday entry points; CI runs them through .ci/run.
# Local services default to the ones scripts/services.sh manages; override the
# URLs on the command line or in the environment, e.g.
#   make test OUTBOX_DATABASE_URL=postgres://me@db:5432/test

OUTBOX_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/test
OUTBOX_AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/%2f
export OUTBOX_DATABASE_URL OUTBOX_AMQP_URL

CARGO ?= cargo

.PHONY: build services demo test lint bench deploy-check table-sizes

build:
	$(CARGO) build --release

services:
	bash scripts/services.sh

demo: services build
	bash scripts/demo.sh

# nextest runs test binaries in parallel processes but skips doctests, so those
# run first with cargo test (first, so the nextest summary is the last line).
test: services
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		set -e; \
		$(CARGO) test --doc --workspace --all-features; \
		$(CARGO) nextest run --workspace --all-features --no-fail-fast; \
	else \
		$(CARGO) test --workspace --all-features; \
	fi

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

# The benchmark (bench/, a workspace member of its own, never installed with the
# relay): every figure with its scenario and target, written to bench/RESULTS.md.
# Selected phases only: `make bench PHASES=steady` (comma separated, e.g.
# PHASES=ceiling,drain; the backlog after an outage: PHASES=backlog, and on a
# private PostgreSQL: PHASES=backlog-private; direct vs through a private
# PgBouncer in transaction mode: PHASES=pooled); other knobs through BENCH_ARGS,
# e.g. `make bench PHASES=backlog BENCH_ARGS="--backlog-rows 20000"`; the list:
# `cargo run --release -p outbox-bench -- --help`.
PHASES ?=
BENCH_ARGS ?=
bench: services
	$(CARGO) run --release -p outbox-bench -- $(if $(PHASES),--phases $(PHASES)) $(BENCH_ARGS)

deploy-check:
	bash scripts/deploy-check.sh

# Table and index sizes under a steady load of >= 1,000,000 rows (a few minutes);
# settings: SIZES_* variables, see scripts/table-sizes.sh.
table-sizes: services build
	bash scripts/table-sizes.sh

# The local three-node RabbitMQ cluster (127.0.0.1:5681-5683) beside the default
# broker; tests/cluster.rs starts it itself. `make cluster-down` removes its state.
.PHONY: cluster-up cluster-down cluster-status
cluster-up: services
	bash scripts/rabbitmq-cluster.sh start
cluster-down:
	bash scripts/rabbitmq-cluster.sh stop
cluster-status:
	bash scripts/rabbitmq-cluster.sh status
