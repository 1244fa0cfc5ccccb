//! `coordinator predict` as a person uses it: a trained checkpoint and image files on disk,
//! written here from test-set digits at several sizes, inverted, off-centre and as JPEG.

use crate::support::{binary, init_logging, mnist_dir};
use common::dataset::{Dataset, IMAGE_SIDE, Split};
use image::{GrayImage, ImageFormat, Luma, imageops};
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
};
use tracing::info;

/// Test digits written per variant.
const DIGITS: usize = 100;

/// Trains an MLP for one epoch with the real binary (two worker processes), into `run_dir`.
pub fn train_quick_mlp(run_dir: &Path) -> anyhow::Result<()> {
    let output = Command::new(binary("coordinator"))
        .args(["--workers", "2", "--model", "mlp", "--epochs", "1"])
        .arg("--data-dir")
        .arg(mnist_dir())
        .arg("--run-dir")
        .arg(run_dir)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "training failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Test digit `index` as a person might save it.
fn variant(test: &Split, index: usize, name: &str) -> GrayImage {
    let side = IMAGE_SIDE as u32;
    let digit = GrayImage::from_raw(side, side, test.image(index).to_vec()).expect("28x28");
    let scaled = |size: u32| imageops::resize(&digit, size, size, imageops::FilterType::Triangle);
    let dark_on_light = |mut image: GrayImage, paper: u8, ink: u8| {
        for p in image.pixels_mut() {
            let amount = f32::from(p.0[0]) / 255.0;
            p.0[0] =
                (f32::from(paper) + amount * (f32::from(ink) - f32::from(paper))).round() as u8;
        }
        image
    };
    match name {
        // MNIST's own form: white ink on black, 28x28.
        "mnist-28" => digit,
        // Black ink on white paper, larger.
        "inverted-64" => dark_on_light(scaled(64), 255, 0),
        // A large digit far from the centre of a wide sheet of paper.
        "off-centre-200" => {
            let mut sheet = GrayImage::from_pixel(480, 320, Luma([255]));
            imageops::overlay(&mut sheet, &dark_on_light(scaled(200), 255, 0), 250, 100);
            sheet
        }
        // Grey paper, grey ink, stored as JPEG.
        "grey-jpeg-120" => dark_on_light(scaled(120), 225, 40),
        other => panic!("unknown variant {other}"),
    }
}

const VARIANTS: [(&str, ImageFormat, &str); 4] = [
    ("mnist-28", ImageFormat::Png, "png"),
    ("inverted-64", ImageFormat::Png, "png"),
    ("off-centre-200", ImageFormat::Png, "png"),
    ("grey-jpeg-120", ImageFormat::Jpeg, "jpg"),
];

/// Writes the first [`DIGITS`] test digits in every variant, one directory per variant, and
/// returns each file's true label.
fn write_digits(root: &Path) -> anyhow::Result<BTreeMap<PathBuf, u8>> {
    let test = Dataset::load(&mnist_dir())?.test;
    let mut labels = BTreeMap::new();
    for (name, format, extension) in VARIANTS {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        for index in 0..DIGITS {
            let path = dir.join(format!("{index:04}.{extension}"));
            variant(&test, index, name).save_with_format(&path, format)?;
            labels.insert(path, test.label(index));
        }
    }
    Ok(labels)
}

fn predict(args: &[&Path]) -> anyhow::Result<Output> {
    Ok(Command::new(binary("coordinator"))
        .arg("predict")
        .args(args)
        .output()?)
}

/// A checkpoint trained for one epoch reads test digits saved as image files (MNIST-like,
/// inverted and larger, off-centre on a wide sheet, grey JPEG) with at least 90% accuracy in
/// every form; `--json` gives sorted top-3 probabilities; a corrupt file is named while the
/// other files are still predicted.
#[test]
fn predict_reads_digits_from_image_files() -> anyhow::Result<()> {
    init_logging();
    let work = tempfile::tempdir()?;
    let run_dir = work.path().join("run");
    let images = work.path().join("images");

    info!("--- train one epoch of the MLP");
    train_quick_mlp(&run_dir)?;

    info!(
        "--- write {DIGITS} test digits in {} variants",
        VARIANTS.len()
    );
    let labels = write_digits(&images)?;
    let corrupt = images.join("mnist-28").join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nthis is no PNG")?;

    {
        info!("--- predict every directory, text output");
        let dirs: Vec<PathBuf> = VARIANTS
            .iter()
            .map(|(name, ..)| images.join(name))
            .collect();
        let mut args = vec![Path::new("--run-dir"), &run_dir];
        args.extend(dirs.iter().map(PathBuf::as_path));
        let output = predict(&args)?;
        let stdout = String::from_utf8(output.stdout)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(1),
            "one file is corrupt:\n{stderr}"
        );
        assert!(
            stderr.contains(&corrupt.display().to_string()),
            "the corrupt file is named:\n{stderr}"
        );
        let mut predicted = BTreeMap::new();
        for line in stdout.lines() {
            let (file, rest) = line.split_once(": ").expect("FILE: DIGIT  (TOP 3)");
            let digit: u8 = rest.split_whitespace().next().expect("a digit").parse()?;
            assert_eq!(rest.matches('%').count(), 3, "top-3 probabilities: {line}");
            predicted.insert(PathBuf::from(file), digit);
        }
        assert_eq!(
            predicted.len(),
            labels.len(),
            "every good file is predicted"
        );
        for (name, ..) in VARIANTS {
            let dir = images.join(name);
            let (files, right) = labels
                .iter()
                .filter(|(path, _)| path.starts_with(&dir))
                .fold((0, 0), |(files, right), (path, label)| {
                    (files + 1, right + usize::from(predicted[path] == *label))
                });
            let accuracy = right as f64 / files as f64;
            println!(
                "{name}: {right} of {files} correct ({:.1}%)",
                accuracy * 100.0
            );
            assert_eq!(files, DIGITS);
            assert!(accuracy >= 0.9, "{name}: accuracy {accuracy}");
        }
    }

    {
        info!("--- --json from the checkpoint file");
        let checkpoint = run_dir.join("checkpoints/epoch-0001.safetensors");
        let inverted = images.join("inverted-64");
        let output = predict(&[
            Path::new("--json"),
            Path::new("--checkpoint"),
            &checkpoint,
            &inverted,
            &corrupt,
        ])?;
        assert_eq!(output.status.code(), Some(1));
        let entries: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)?;
        assert_eq!(entries.len(), DIGITS + 1);
        for entry in &entries[..DIGITS] {
            let top3 = entry["top3"].as_array().expect("top3");
            assert_eq!(top3.len(), 3, "{entry}");
            let probabilities: Vec<f64> = top3
                .iter()
                .map(|c| c["probability"].as_f64().expect("a probability"))
                .collect();
            assert!(probabilities.is_sorted_by(|a, b| a >= b), "{entry}");
            assert!(probabilities.iter().all(|p| (0.0..=1.0).contains(p)));
            assert!(probabilities.iter().sum::<f64>() <= 1.0 + 1e-6, "{entry}");
            assert_eq!(entry["digit"], top3[0]["digit"]);
            let file = PathBuf::from(entry["file"].as_str().expect("a file name"));
            assert!(file.starts_with(&inverted));
            assert!(labels.contains_key(&file));
        }
        let last = &entries[DIGITS];
        assert_eq!(last["file"], corrupt.display().to_string());
        assert!(last.get("top3").is_none());
        assert!(
            last["error"]
                .as_str()
                .is_some_and(|e| e.contains("corrupt.png") && e.contains("not a readable")),
            "{last}"
        );
    }

    {
        info!("--- a blank image, a missing file and no model");
        let blank = work.path().join("blank.png");
        GrayImage::from_pixel(50, 50, Luma([255])).save(&blank)?;
        let missing = work.path().join("missing.png");
        let output = predict(&[Path::new("--run-dir"), &run_dir, &blank, &missing])?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1));
        assert!(
            stderr.contains("blank.png") && stderr.contains("blank"),
            "{stderr}"
        );
        assert!(stderr.contains("missing.png"), "{stderr}");
        let output = predict(&[Path::new("--run-dir"), work.path(), &blank])?;
        assert!(!output.status.success());
        assert!(String::from_utf8_lossy(&output.stderr).contains("checkpoints"));
    }
    Ok(())
}
