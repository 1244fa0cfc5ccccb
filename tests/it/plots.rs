//! The plots of a run: written at the end of training, and again by `coordinator plot`.

use crate::predict::train_quick_mlp;
use crate::support::{binary, init_logging, mnist_dir};
use std::{path::Path, process::Command};
use tracing::info;

/// Each plot's file name, PNG size and a text its SVG must hold.
const PLOTS: [(&str, (u32, u32), &str); 4] = [
    (
        "learning_curves",
        (1200, 500),
        "mlp: loss and accuracy per epoch (1 epoch)",
    ),
    ("confusion_matrix", (660, 720), "Confusion matrix"),
    ("test_digits", (900, 960), "The first 25 test images"),
    ("confident_mistakes", (900, 786), "most confident of"),
];

fn check_plots(run_dir: &Path) -> anyhow::Result<()> {
    let dir = run_dir.join("plots");
    for (name, size, text) in PLOTS {
        let png = dir.join(format!("{name}.png"));
        let decoded = image::open(&png)?;
        assert_eq!(
            (decoded.width(), decoded.height()),
            size,
            "{}",
            png.display()
        );
        // Not a blank canvas: a plot has ink.
        let dark = decoded.to_luma8().pixels().filter(|p| p.0[0] < 128).count();
        assert!(dark > 1000, "{}: {dark} dark pixels", png.display());
        let svg = std::fs::read_to_string(dir.join(format!("{name}.svg")))?;
        assert!(svg.trim_start().starts_with("<svg"), "{name}.svg");
        assert!(svg.contains(text), "{name}.svg lacks {text:?}");
        assert!(svg.trim_end().ends_with("</svg>"), "{name}.svg is whole");
    }
    Ok(())
}

/// Training writes the plots into the run directory; `coordinator plot` writes them again
/// from the directory alone, and its confusion matrix agrees with the workers' evaluation.
#[test]
fn plots_are_written_after_training_and_on_demand() -> anyhow::Result<()> {
    init_logging();
    let run = tempfile::tempdir()?;
    let run_dir = run.path();

    info!("--- training writes the plots");
    train_quick_mlp(run_dir)?;
    check_plots(run_dir)?;

    info!("--- coordinator plot writes them again");
    std::fs::remove_dir_all(run_dir.join("plots"))?;
    let output = Command::new(binary("coordinator"))
        .arg("plot")
        .arg(run_dir)
        .arg("--data-dir")
        .arg(mnist_dir())
        .output()?;
    let stdout = String::from_utf8(output.stdout)?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.lines().count(), 2 * PLOTS.len(), "{stdout}");
    check_plots(run_dir)?;

    info!("--- the confusion matrix counts what the workers counted");
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl"))?;
    let record: serde_json::Value = serde_json::from_str(metrics.lines().next().expect("a line"))?;
    let accuracy = record["test_accuracy"].as_f64().expect("a number");
    let svg = std::fs::read_to_string(run_dir.join("plots/confusion_matrix.svg"))?;
    let stated = format!("{:.2}% of 10000 test images correct", accuracy * 100.0);
    assert!(svg.contains(&stated), "the matrix lacks {stated:?}");

    info!("--- a directory without a run");
    let empty = tempfile::tempdir()?;
    let output = Command::new(binary("coordinator"))
        .arg("plot")
        .arg(empty.path())
        .output()?;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("metrics.jsonl"));
    Ok(())
}
