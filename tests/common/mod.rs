//! The tests' harness moved to the workspace crate `outbox-test-kit`
//! (crates/test-kit); this re-export is kept until every test uses it directly.
#![allow(dead_code, unused_imports)]

pub use outbox_test_kit::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");
