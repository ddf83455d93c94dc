//! `outbox-relay`: everything lives in the library; see `cli::entry`.

fn main() -> std::process::ExitCode {
    outbox_relay::main()
}
