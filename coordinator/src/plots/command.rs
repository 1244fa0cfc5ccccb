use super::write_plots;
use common::fetch::default_data_dir;
use std::{path::PathBuf, process::ExitCode};

/// Flags of `coordinator plot`.
#[derive(Debug, Clone, clap::Args)]
pub struct PlotArgs {
    /// A run directory (with `metrics.jsonl` and `checkpoints/`); the plots go to its
    /// `plots/` folder.
    pub run_dir: PathBuf,

    /// Directory of the dataset the run trained on; MNIST is fetched there if missing
    /// [default: ~/.cache/lockstep/mnist].
    #[arg(long, env = "LOCKSTEP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

/// `coordinator plot RUN_DIR`: writes the plots and prints the files' paths.
pub fn main(args: PlotArgs) -> ExitCode {
    process::init_tracing("plot", process::LogFormat::Text);
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    match write_plots(&args.run_dir, &data_dir) {
        Ok(files) => {
            for file in files {
                println!("{}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
