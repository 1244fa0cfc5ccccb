//! Cluster throughput on this machine: `coordinator --workers N` with spawned worker
//! processes, for N = 1, 2, 4 and `--allreduce ps` and `ring` (its workers, on one host, sum
//! through shared memory; `ring-tcp` keeps them on loopback TCP, as workers on several hosts
//! would be), each for a fixed number of
//! steps of one model; per step, the time computing, communicating and the rest (scheduling,
//! averaging, waiting). With `--time-to-accuracy`, also the wall time for LeNet with
//! `--workers 4` (both ways of averaging) to first reach 99% test accuracy.
//!
//! ```text
//! cargo bench -p coordinator --bench cluster [-- [--model M] [--steps S] [--workers 1,2,4]
//!                                                [--allreduce ps,ring,ring-tcp]
//!                                                [--time-to-accuracy]]
//! ```
//!
//! Prints markdown tables and writes `target/bench/cluster.json`. Every run is a real job of
//! the release `coordinator` binary (built first) on real MNIST, in a fresh run directory; the
//! figures come from its `metrics.jsonl`. `scripts/pytorch_ddp.py` measures PyTorch DDP the
//! same way.

use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The ring with its workers kept off shared memory (`LOCKSTEP_RING_SHARED_MEMORY=false`).
const RING_TCP: &str = "ring-tcp";

/// Test accuracy the time-to-accuracy run waits for.
const TARGET_ACCURACY: f64 = 0.99;
/// Epochs the time-to-accuracy run may take (the LeNet recipe of `scripts/results.sh`).
const TTA_EPOCHS: u32 = 5;

#[derive(Debug)]
struct Options {
    model: String,
    steps: u64,
    workers: Vec<usize>,
    allreduce: Vec<String>,
    time_to_accuracy: bool,
}

/// One throughput run.
#[derive(Debug, Serialize)]
struct Throughput {
    model: String,
    workers: usize,
    allreduce: String,
    steps: u64,
    images: u64,
    images_per_s: f64,
    /// Per step, in milliseconds.
    ms_per_step: f64,
    ms_compute: f64,
    ms_comm: f64,
    ms_other: f64,
    comm_share: f64,
}

/// One time-to-accuracy run.
#[derive(Debug, Serialize)]
struct TimeToAccuracy {
    workers: usize,
    allreduce: String,
    /// First epoch whose test accuracy reached the target, if any.
    epoch: Option<u32>,
    /// Training seconds, and training plus evaluation seconds, up to the end of that epoch.
    train_seconds: Option<f64>,
    train_and_eval_seconds: Option<f64>,
    /// Wall time of the whole process, start-up and all epochs included.
    process_seconds: f64,
    accuracies: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    cores: usize,
    load_average: String,
    command: String,
    throughput: Vec<Throughput>,
    time_to_accuracy: Vec<TimeToAccuracy>,
}

fn main() -> Result<()> {
    let options = parse_args()?;
    let coordinator = build_coordinator()?;
    let scratch = tempfile::tempdir()?;
    let mut report = Report {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_average: common::bench_report::load_average(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        throughput: Vec::new(),
        time_to_accuracy: Vec::new(),
    };
    for allreduce in &options.allreduce {
        for &workers in &options.workers {
            let run_dir = scratch.path().join(format!("{allreduce}-{workers}"));
            let steps = options.steps.to_string();
            let args = [
                "--max-steps",
                steps.as_str(),
                "--epochs",
                "1",
                "--checkpoint-every",
                "0",
            ];
            run_job(
                &coordinator,
                &options.model,
                workers,
                allreduce,
                &run_dir,
                &args,
            )?;
            let row = throughput(&options.model, workers, allreduce, &run_dir)?;
            eprintln!(
                "{} x{} {}: {:.0} images/s",
                row.model, row.workers, row.allreduce, row.images_per_s
            );
            report.throughput.push(row);
        }
    }
    if options.time_to_accuracy {
        // Both transports of the ring sum the same bits: they reach 99% at the same step, so
        // one time-to-accuracy run of the ring is enough.
        for allreduce in options.allreduce.iter().filter(|a| *a != RING_TCP) {
            let run_dir = scratch.path().join(format!("tta-{allreduce}"));
            let epochs = TTA_EPOCHS.to_string();
            let started = Instant::now();
            run_job(
                &coordinator,
                "lenet",
                4,
                allreduce,
                &run_dir,
                &["--epochs", epochs.as_str()],
            )?;
            let process_seconds = started.elapsed().as_secs_f64();
            let row = time_to_accuracy(4, allreduce, &run_dir, process_seconds)?;
            eprintln!("lenet x4 {allreduce}: {row:?}");
            report.time_to_accuracy.push(row);
        }
    }
    print_report(&report);
    let path = common::bench_report::write(
        env!("CARGO_TARGET_TMPDIR"),
        "cluster",
        &serde_json::to_string_pretty(&report)?,
    )?;
    println!("\nwritten to {}", path.display());
    Ok(())
}

fn parse_args() -> Result<Options> {
    let mut options = Options {
        model: "lenet".into(),
        steps: 120,
        workers: vec![1, 2, 4],
        allreduce: vec!["ps".into(), "ring".into(), RING_TCP.into()],
        time_to_accuracy: false,
    };
    let list = |value: &str| value.split(',').map(str::to_owned).collect::<Vec<_>>();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            // `cargo bench` passes this to every bench binary.
            "--bench" => {}
            "--model" => options.model = value()?,
            "--steps" => options.steps = value()?.parse()?,
            "--workers" => {
                options.workers = list(&value()?)
                    .iter()
                    .map(|w| w.parse())
                    .collect::<std::result::Result<_, _>>()?;
            }
            "--allreduce" => options.allreduce = list(&value()?),
            "--time-to-accuracy" => options.time_to_accuracy = true,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(options)
}

/// Builds the release coordinator (the bench itself is optimised; so must the job be).
fn build_coordinator() -> Result<PathBuf> {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--bin", "coordinator"])
        .status()?;
    if !status.success() {
        return Err("building the coordinator failed".into());
    }
    Ok(common::bench_report::target_dir(env!("CARGO_TARGET_TMPDIR"))?.join("release/coordinator"))
}

fn run_job(
    coordinator: &Path,
    model: &str,
    workers: usize,
    allreduce: &str,
    run_dir: &Path,
    extra: &[&str],
) -> Result<()> {
    let (mode, shared_memory) = match allreduce {
        RING_TCP => ("ring", "false"),
        other => (other, "true"),
    };
    let output = Command::new(coordinator)
        .args(["--model", model, "--allreduce", mode])
        .args(["--workers", &workers.to_string()])
        // Spawned workers read their flags' environment variables too.
        .env("LOCKSTEP_RING_SHARED_MEMORY", shared_memory)
        .arg("--run-dir")
        .arg(run_dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    if !output.status.success() {
        return Err(format!(
            "{model} x{workers} {allreduce} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(())
}

fn records(run_dir: &Path) -> Result<Vec<Value>> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))?
        .lines()
        .map(|line| Ok(serde_json::from_str(line)?))
        .collect()
}

fn number(record: &Value, key: &str) -> Result<f64> {
    record[key]
        .as_f64()
        .ok_or_else(|| format!("metrics.jsonl lacks {key}").into())
}

fn throughput(model: &str, workers: usize, allreduce: &str, run_dir: &Path) -> Result<Throughput> {
    let records = records(run_dir)?;
    let record = records.first().ok_or("no epoch record")?;
    let steps = number(record, "steps")?;
    let train = number(record, "train_seconds")?;
    let compute = number(record, "compute_seconds")?;
    let comm = number(record, "comm_seconds")?;
    let images = number(record, "samples")?;
    let ms = |seconds: f64| 1000.0 * seconds / steps.max(1.0);
    Ok(Throughput {
        model: model.into(),
        workers,
        allreduce: allreduce.into(),
        steps: steps as u64,
        images: images as u64,
        images_per_s: images / train,
        ms_per_step: ms(train),
        ms_compute: ms(compute),
        ms_comm: ms(comm),
        ms_other: ms((train - compute - comm).max(0.0)),
        comm_share: comm / train,
    })
}

fn time_to_accuracy(
    workers: usize,
    allreduce: &str,
    run_dir: &Path,
    process_seconds: f64,
) -> Result<TimeToAccuracy> {
    let records = records(run_dir)?;
    let mut row = TimeToAccuracy {
        workers,
        allreduce: allreduce.into(),
        epoch: None,
        train_seconds: None,
        train_and_eval_seconds: None,
        process_seconds,
        accuracies: Vec::new(),
    };
    let (mut train, mut total) = (0.0, 0.0);
    for record in &records {
        let accuracy = number(record, "test_accuracy")?;
        train += number(record, "train_seconds")?;
        total += number(record, "seconds")?;
        row.accuracies.push(accuracy);
        if row.epoch.is_none() && accuracy >= TARGET_ACCURACY {
            row.epoch = record["epoch"].as_u64().map(|e| e as u32);
            row.train_seconds = Some(train);
            row.train_and_eval_seconds = Some(total);
        }
    }
    Ok(row)
}

fn print_report(report: &Report) {
    println!(
        "\n{} cores, load average {}",
        report.cores, report.load_average
    );
    println!(
        "\n| model | workers | allreduce | images/s | ms/step | compute | comm | other | comm share |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &report.throughput {
        println!(
            "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1}% |",
            r.model,
            r.workers,
            r.allreduce,
            r.images_per_s,
            r.ms_per_step,
            r.ms_compute,
            r.ms_comm,
            r.ms_other,
            100.0 * r.comm_share
        );
    }
    if report.time_to_accuracy.is_empty() {
        return;
    }
    println!(
        "\n| lenet, workers | allreduce | first epoch at {:.0}% | training s | training + eval s | process s | accuracy per epoch |",
        100.0 * TARGET_ACCURACY
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &report.time_to_accuracy {
        let seconds = |s: Option<f64>| s.map_or("-".into(), |s| format!("{s:.1}"));
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {} |",
            r.workers,
            r.allreduce,
            r.epoch.map_or("not reached".into(), |e| e.to_string()),
            seconds(r.train_seconds),
            seconds(r.train_and_eval_seconds),
            r.process_seconds,
            r.accuracies
                .iter()
                .map(|a| format!("{:.2}%", 100.0 * a))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}
