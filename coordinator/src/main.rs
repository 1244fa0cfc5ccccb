use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Trains MNIST models with synchronous data-parallel SGD across worker processes.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: coordinator::Config,
}

#[derive(Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once per process: boxing the worker's flags would save nothing"
)]
enum Command {
    /// Run as a worker (what `--workers N` spawns; same flags as the `worker` binary).
    Worker(worker::Config),
    /// Print a running job's epoch, step, workers and last test accuracy.
    Status(coordinator::StatusArgs),
    /// Draw a run directory's plots (learning curves, confusion matrix, digits) into its plots/.
    Plot(coordinator::plots::PlotArgs),
    /// Print the digit a trained model sees in each PNG or JPEG file.
    Predict(coordinator::predict::PredictArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Worker(config)) => worker::main_with(config),
        Some(Command::Status(args)) => coordinator::status_command(args),
        Some(Command::Plot(args)) => coordinator::plots::main(args),
        Some(Command::Predict(args)) => coordinator::predict::main(args),
        None => {
            // Every step encodes the parameters and decodes a gradient per worker: buffers of
            // the model's size that glibc would otherwise map and zero afresh each time.
            common::allocator::keep_freed_memory();
            coordinator::init_logging(cli.config.log_format);
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime starts");
            runtime.block_on(coordinate(cli.config))
        }
    }
}

async fn coordinate(config: coordinator::Config) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(config.listen_addr()).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!("cannot listen on {}: {e}", config.listen_addr());
            return ExitCode::FAILURE;
        }
    };
    let stop = process::stop_on_signals();
    let run_dir = config.run_dir.clone().or_else(|| config.resume.clone());
    let carry_on = match &run_dir {
        Some(dir) => format!(
            "the job can be continued with --resume {0} (or the same command, with --run-dir {0})",
            dir.display()
        ),
        None => "the job can be continued with --resume and its run directory".to_string(),
    };
    match coordinator::run(config, listener, stop).await {
        Ok(summary) => {
            println!(
                "trained {} for {} epoch{} ({} steps) in {:.1} s: test accuracy {:.2}%, test loss {:.4}\nrun directory: {}",
                summary.model,
                summary.epochs_completed,
                if summary.epochs_completed == 1 {
                    ""
                } else {
                    "s"
                },
                summary.steps,
                summary.wall_seconds,
                summary.final_test_accuracy * 100.0,
                summary.final_test_loss,
                summary.run_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e @ coordinator::Error::Stopped(cause)) => {
            tracing::warn!("{e}; {carry_on}");
            ExitCode::from(cause.exit_status())
        }
        Err(e) if e.is_retryable() => {
            tracing::error!("{e}");
            tracing::info!("{carry_on}");
            ExitCode::from(process::exit::RETRYABLE)
        }
        Err(e) if e.is_usage() => {
            tracing::error!("{e}");
            ExitCode::from(process::exit::USAGE)
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
