#!/bin/sh
# The compose example's certificates (deploy/compose.yaml, service `certs`):
# a private CA and one server certificate each for PostgreSQL and RabbitMQ,
# named for the host names the other services use (postgres, rabbitmq) and for
# localhost (the published ports). Written once into the `certs` volume; a
# second `up` keeps them. Delete the volume to start over:
#   docker compose -f deploy/compose.yaml down -v
set -eu
cd "${1:-/certs}"  # the volume; another folder for a try outside compose
if [ -f ca.crt ] && [ -f postgres.crt ] && [ -f rabbitmq.crt ]; then
    echo "certs: already in $PWD"
    exit 0
fi
command -v openssl >/dev/null || apk add --no-cache --quiet openssl

# P-256 keys: PostgreSQL (OpenSSL), RabbitMQ (Erlang) and the relay (rustls)
# all take them.
openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout ca.key -out ca.crt -days 825 -subj "/CN=outbox-relay compose example CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

# issue NAME UID: NAME.crt for host NAME, its key readable only by UID (the
# server's user in its image: 999 is postgres in postgres:16 and rabbitmq in
# rabbitmq:3; PostgreSQL refuses a key file others can read).
issue() {
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
        -keyout "$1.key" -out "$1.csr" -subj "/CN=$1"
    printf '%s\n' "subjectAltName=DNS:$1,DNS:localhost,IP:127.0.0.1" \
        "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
        -days 825 -extfile "$1.ext" -out "$1.crt"
    chown "$2:$2" "$1.key"
    chmod 600 "$1.key"
    rm "$1.csr" "$1.ext"
}
issue postgres 999
issue rabbitmq 999

# Nothing else gets signed: the CA key goes. Certificates are public.
rm ca.key ca.srl
chmod 644 ca.crt postgres.crt rabbitmq.crt
echo "certs: CA and server certificates written to $PWD"
