use super::{
    confusion_matrix::ConfusionMatrix,
    digit_grid::{DigitCell, DigitGrid},
    figure,
    learning_curves::LearningCurves,
};
use crate::{Error, Result, checkpoint::Checkpoint, metrics::EpochRecord};
use candle_core::Device;
use common::{
    dataset::{CLASSES, Dataset, Split},
    fetch::ensure_mnist,
};
use std::{
    fs,
    path::{Path, PathBuf},
};
use tracing::{info, warn};

/// The folder of a run directory that the plots go to.
pub const PLOTS_DIR: &str = "plots";

/// Digits in the grid of test images: the first 25, 5 by 5.
const GRID: usize = 25;
/// Mistakes shown, most confident first.
const MISTAKES: usize = 20;

/// Draws every plot of the run in `run_dir` into `run_dir/plots/` and returns the files
/// written. The learning curves come from `metrics.jsonl`; the other plots evaluate the last
/// epoch's checkpoint on the test set in `data_dir` (MNIST is fetched there if missing).
pub fn write_plots(run_dir: &Path, data_dir: &Path) -> Result<Vec<PathBuf>> {
    let records = read_metrics(&run_dir.join("metrics.jsonl"))?;
    let checkpoint = Checkpoint::latest_in(run_dir)?;
    ensure_mnist(data_dir)?;
    let dataset = Dataset::load(data_dir)?;
    if let Some(trained_on) = &checkpoint.dataset_digest
        && *trained_on != dataset.digest()
    {
        warn!(
            data_dir = %data_dir.display(),
            "the run trained on other data (dataset sha256 {trained_on}): the plots evaluate it on this directory's test set"
        );
    }
    let test = dataset.test;
    let probabilities = checkpoint.probabilities(&test, &Device::Cpu)?;
    let predicted: Vec<u8> = probabilities.iter().map(argmax).collect();
    let correct = predicted
        .iter()
        .zip(test.labels())
        .filter(|(p, l)| p == l)
        .count();
    let model = match checkpoint.epoch {
        Some(epoch) => format!("{}, epoch {epoch}", checkpoint.model),
        None => checkpoint.model.to_string(),
    };
    let accuracy = format!(
        "{:.2}% of {} test images correct",
        100.0 * correct as f64 / test.len().max(1) as f64,
        test.len()
    );

    let dir = run_dir.join(PLOTS_DIR);
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let curves = LearningCurves {
        title: checkpoint.model.to_string(),
        records,
    };
    let confusion = ConfusionMatrix::new(format!("{model}: {accuracy}"), test.labels(), &predicted);
    let mut written = Vec::new();
    written.extend(figure::save(&curves, &dir)?);
    written.extend(figure::save(&confusion, &dir)?);
    written.extend(figure::save(&test_digits(&test, &predicted, &model), &dir)?);
    let mistakes = confident_mistakes(&test, &predicted, &probabilities, &model);
    written.extend(figure::save(&mistakes, &dir)?);
    Ok(written)
}

/// [`write_plots`] at the end of a job, off the async runtime; a failure is logged as a
/// warning, since the job itself succeeded.
pub async fn write_plots_after_training(run_dir: PathBuf, data_dir: PathBuf) {
    let dir = run_dir.join(PLOTS_DIR);
    match tokio::task::spawn_blocking(move || write_plots(&run_dir, &data_dir)).await {
        Ok(Ok(files)) => info!(dir = %dir.display(), files = files.len(), "plots written"),
        Ok(Err(e)) => warn!("no plots: {e}"),
        Err(e) => warn!("no plots: plotting failed: {e}"),
    }
}

/// The epoch records of `metrics.jsonl`, naming the line that does not parse.
fn read_metrics(path: &Path) -> Result<Vec<EpochRecord>> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let records = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(number, line)| {
            serde_json::from_str(line).map_err(|e| Error::Plot {
                name: "learning_curves".into(),
                problem: format!("{} line {}: {e}", path.display(), number + 1),
            })
        })
        .collect::<Result<Vec<EpochRecord>>>()?;
    if records.is_empty() {
        return Err(Error::Plot {
            name: "learning_curves".into(),
            problem: format!("{} holds no epoch", path.display()),
        });
    }
    Ok(records)
}

fn argmax(probabilities: &[f32; CLASSES]) -> u8 {
    let mut best = 0;
    for (digit, p) in probabilities.iter().enumerate() {
        if *p > probabilities[best] {
            best = digit;
        }
    }
    best as u8
}

/// The first test images with their predicted digits.
fn test_digits(test: &Split, predicted: &[u8], model: &str) -> DigitGrid {
    let cells = (0..GRID.min(test.len()))
        .map(|i| {
            let wrong = predicted[i] != test.label(i);
            let mut caption = vec![format!("predicted {}", predicted[i])];
            if wrong {
                caption.push(format!("true {}", test.label(i)));
            }
            DigitCell {
                pixels: test.image(i).to_vec(),
                caption,
                wrong,
            }
        })
        .collect::<Vec<_>>();
    let wrong = cells.iter().filter(|cell| cell.wrong).count();
    DigitGrid {
        name: "test_digits",
        title: format!(
            "The first {} test images: {model}, {wrong} wrong (red)",
            cells.len()
        ),
        empty_note: "the test set is empty".into(),
        columns: 5,
        cells,
    }
}

/// The misclassified test images to which the model gave the highest probability.
fn confident_mistakes(
    test: &Split,
    predicted: &[u8],
    probabilities: &[[f32; CLASSES]],
    model: &str,
) -> DigitGrid {
    let mut mistakes: Vec<usize> = (0..test.len())
        .filter(|&i| predicted[i] != test.label(i))
        .collect();
    let confidence = |i: usize| probabilities[i][usize::from(predicted[i])];
    // Most confident first; equal confidences in test-set order.
    mistakes.sort_by(|&a, &b| confidence(b).total_cmp(&confidence(a)).then(a.cmp(&b)));
    let total = mistakes.len();
    let cells = mistakes
        .into_iter()
        .take(MISTAKES)
        .map(|i| DigitCell {
            pixels: test.image(i).to_vec(),
            caption: vec![
                format!("predicted {} ({:.1}%)", predicted[i], confidence(i) * 100.0),
                format!("true {} (image {i})", test.label(i)),
            ],
            wrong: true,
        })
        .collect::<Vec<_>>();
    DigitGrid {
        name: "confident_mistakes",
        title: format!(
            "The {} most confident of {total} mistakes: {model}",
            cells.len()
        ),
        empty_note: "no test image is misclassified".into(),
        columns: 5,
        cells,
    }
}
