use super::{Digit, Prediction, image_files};
use crate::{Error, Result, checkpoint::Checkpoint};
use common::dataset::Split;
use serde::Serialize;
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
};

/// Flags of `coordinator predict`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(
    clap::ArgGroup::new("model").required(true).args(["checkpoint", "run_dir"])
))]
pub struct PredictArgs {
    /// A checkpoint: a run directory's `checkpoints/epoch-NNNN.safetensors`.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,

    /// A run directory: the checkpoint of its last epoch.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,

    /// Print one JSON array: per file, `file` and `digit` and `top3` (digit and
    /// probability), or `file` and `error`.
    #[arg(long)]
    pub json: bool,

    /// Where the model runs: cpu or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// PNG or JPEG files of any size, dark ink on light paper or the reverse; directories
    /// stand for their *.png, *.jpg and *.jpeg files, sorted by name.
    #[arg(required = true, value_name = "FILE_OR_DIR")]
    pub inputs: Vec<PathBuf>,
}

/// One line of `--json` output.
#[derive(Serialize)]
struct JsonLine<'a> {
    file: String,
    #[serde(flatten)]
    prediction: Option<&'a Prediction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `coordinator predict`: prints each file's digit and top-3 probabilities. Every file is
/// tried; the exit status is 1 if any could not be used (each named on stderr), 2 if the
/// model could not be loaded.
pub fn main(args: PredictArgs) -> ExitCode {
    let outcomes = match predict(&args) {
        Ok(outcomes) => outcomes,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut stdout = std::io::stdout().lock();
    let written = if args.json {
        let lines: Vec<JsonLine> = outcomes
            .iter()
            .map(|(file, outcome)| JsonLine {
                file: file.display().to_string(),
                prediction: outcome.as_ref().ok(),
                error: outcome.as_ref().err().map(ToString::to_string),
            })
            .collect();
        serde_json::to_writer_pretty(&mut stdout, &lines)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(stdout))
    } else {
        outcomes
            .iter()
            .try_for_each(|(file, outcome)| match outcome {
                Ok(prediction) => writeln!(stdout, "{}", text_line(file, prediction)),
                Err(_) => Ok(()),
            })
    };
    if let Err(e) = written.and_then(|()| stdout.flush()) {
        eprintln!("error: writing the predictions: {e}");
        return ExitCode::FAILURE;
    }
    let failed = outcomes
        .iter()
        .filter(|(_, outcome)| outcome.is_err())
        .count();
    for (_, outcome) in &outcomes {
        if let Err(e) = outcome {
            eprintln!("error: {e}");
        }
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("{failed} of {} inputs failed", outcomes.len());
        ExitCode::FAILURE
    }
}

/// `digits/seven.png: 7  (7 98.2%, 1 1.1%, 9 <0.1%)`.
fn text_line(file: &Path, prediction: &Prediction) -> String {
    let top3: Vec<String> = prediction
        .top3
        .iter()
        .map(|c| match c.probability * 100.0 {
            percent if percent < 0.05 => format!("{} <0.1%", c.digit),
            percent => format!("{} {percent:.1}%", c.digit),
        })
        .collect();
    format!(
        "{}: {}  ({})",
        file.display(),
        prediction.digit,
        top3.join(", ")
    )
}

/// Loads the model and predicts every input; the outer error is a model that cannot be
/// loaded, the inner ones are files that cannot be used.
pub fn predict(args: &PredictArgs) -> Result<Vec<(PathBuf, Result<Prediction>)>> {
    let device =
        common::device::parse_device(&args.device).map_err(|e| Error::Config(format!("--{e}")))?;
    let checkpoint = match (&args.checkpoint, &args.run_dir) {
        (Some(file), _) => Checkpoint::load(file)?,
        (None, Some(dir)) => Checkpoint::latest_in(dir)?,
        (None, None) => {
            return Err(Error::Config(
                "give --checkpoint FILE or --run-dir DIR".into(),
            ));
        }
    };
    tracing::debug!(checkpoint = %checkpoint.path.display(), model = %checkpoint.model, "model loaded");
    let files: Vec<(PathBuf, Result<Digit>)> = image_files(&args.inputs)
        .into_iter()
        .map(|file| match file {
            Ok(path) => {
                let digit = Digit::open(&path);
                (path, digit)
            }
            Err((path, e)) => (path, Err(e)),
        })
        .collect();
    let digits: Vec<&Digit> = files
        .iter()
        .filter_map(|(_, digit)| digit.as_ref().ok())
        .collect();
    let pixels = digits.iter().flat_map(|digit| digit.pixels()).copied();
    let images = Split::new(pixels.collect(), vec![0; digits.len()])?;
    let mut probabilities = checkpoint.probabilities(&images, &device)?.into_iter();
    Ok(files
        .into_iter()
        .map(|(path, digit)| {
            let prediction = digit.map(|_| {
                Prediction::from_probabilities(&probabilities.next().expect("one per digit"))
            });
            (path, prediction)
        })
        .collect())
}
