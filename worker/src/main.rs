use clap::Parser;
use std::process::ExitCode;

/// Computes gradients for a lockstep coordinator.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    config: worker::Config,
}

fn main() -> ExitCode {
    worker::main_with(Cli::parse().config)
}
