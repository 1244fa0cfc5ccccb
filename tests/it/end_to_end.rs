//! The real binaries as separate processes, as a user runs them.

use crate::support::{binary, init_logging, mnist_dir};
use std::{process::Command, time::Instant};
use tracing::info;

/// `coordinator --workers 2` spawns two worker processes, trains the MLP over gRPC on real
/// MNIST, writes metrics and checkpoints, and logs its progress in plain lines.
#[test]
fn two_worker_processes_train_mlp_past_95_percent() -> anyhow::Result<()> {
    init_logging();
    let run_dir = tempfile::tempdir()?;
    let started = Instant::now();
    let output = Command::new(binary("coordinator"))
        .args(["--workers", "2", "--model", "mlp", "--epochs", "2"])
        .args(["--progress-every", "0.2"])
        .arg("--data-dir")
        .arg(mnist_dir())
        .arg("--run-dir")
        .arg(run_dir.path())
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "coordinator failed:\n{stderr}");
    println!("{stdout}wall time {:.1} s", started.elapsed().as_secs_f64());
    // Piped stderr is no terminal: plain progress lines instead of a bar.
    let progress = stderr
        .lines()
        .filter(|line| line.contains("progress: epoch ") && line.contains(" images/s"))
        .count();
    assert!(progress > 0, "no progress line:\n{stderr}");

    let metrics = std::fs::read_to_string(run_dir.path().join("metrics.jsonl"))?;
    let records: Vec<serde_json::Value> = metrics
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(records.len(), 2);
    for record in &records {
        assert_eq!(record["samples"], 60_000, "{record}");
        assert_eq!(record["workers"], 2);
        for field in ["train_loss", "test_loss", "images_per_sec", "seconds"] {
            assert!(
                record[field].as_f64().is_some_and(f64::is_finite),
                "{field}"
            );
        }
    }
    let accuracy = records[1]["test_accuracy"].as_f64().expect("a number");
    assert!(accuracy >= 0.95, "test accuracy {accuracy}");
    for epoch in 1..=2 {
        let stem = run_dir.path().join(format!("checkpoints/epoch-{epoch:04}"));
        assert!(stem.with_extension("safetensors").is_file());
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(stem.with_extension("json"))?)?;
        assert_eq!(meta["epoch"], epoch);
        assert_eq!(meta["model"], "mlp");
    }
    assert!(run_dir.path().join("summary.json").is_file());
    Ok(())
}

/// Bad flags and bad data end the coordinator with an error that names the problem.
#[test]
fn bad_flags_and_corrupt_data_are_named() -> anyhow::Result<()> {
    init_logging();
    let run = |args: &[&str]| -> anyhow::Result<(bool, String)> {
        let output = Command::new(binary("coordinator")).args(args).output()?;
        Ok((
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    };

    info!("--- unknown model");
    let (ok, stderr) = run(&["--model", "resnet"])?;
    assert!(!ok);
    assert!(
        stderr.contains("resnet") && stderr.contains("lenet"),
        "{stderr}"
    );

    info!("--- zero batch");
    let (ok, stderr) = run(&["--batch-size", "0", "--workers", "1"])?;
    assert!(!ok);
    assert!(stderr.contains("batch-size"), "{stderr}");

    info!("--- membership flags that contradict each other");
    for (args, named) in [
        (&["--min-workers", "0"][..], "--min-workers"),
        (
            &["--workers", "2", "--min-workers", "3"][..],
            "--min-workers",
        ),
        (
            &["--workers", "3", "--max-workers", "2"][..],
            "--max-workers",
        ),
        (&["--worker-timeout=-1"][..], "--worker-timeout"),
        (&["--pause-timeout", "nan"][..], "--pause-timeout"),
    ] {
        let (ok, stderr) = run(args)?;
        assert!(!ok, "{args:?} was accepted");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }

    info!("--- resuming a directory without a checkpoint");
    let empty = tempfile::tempdir()?;
    let (ok, stderr) = run(&["--resume", &empty.path().to_string_lossy()])?;
    assert!(!ok);
    assert!(stderr.contains("resume.safetensors"), "{stderr}");

    info!("--- truncated images file");
    let data = tempfile::tempdir()?;
    for name in common::dataset::FILE_NAMES {
        std::fs::copy(mnist_dir().join(name), data.path().join(name)).or_else(|_| {
            std::fs::copy(
                mnist_dir().join(format!("{name}.gz")),
                data.path().join(format!("{name}.gz")),
            )
        })?;
    }
    let images = common::dataset::dataset_files(data.path())?[2].clone();
    let bytes = std::fs::read(&images)?;
    std::fs::write(&images, &bytes[..bytes.len() / 2])?;
    let data_dir = data.path().to_string_lossy().into_owned();
    let runs = tempfile::tempdir()?;
    let run_dir = runs.path().to_string_lossy().into_owned();
    let (ok, stderr) = run(&[
        "--workers",
        "1",
        "--data-dir",
        &data_dir,
        "--run-dir",
        &run_dir,
    ])?;
    assert!(!ok);
    let file_name = images.file_name().unwrap().to_string_lossy().into_owned();
    assert!(stderr.contains(&file_name), "{stderr}");
    Ok(())
}

/// Starts `coordinator --workers 2` on a long job, sends it `signal` once training has
/// started, and returns its exit status, what it logged after the signal and its workers'
/// pids, once it has exited.
fn signal_local_job(signal: &str) -> anyhow::Result<(std::process::ExitStatus, String, Vec<u32>)> {
    use std::io::{BufRead, BufReader};
    init_logging();
    let run_dir = tempfile::tempdir()?;
    let mut coordinator = Command::new(binary("coordinator"))
        .args(["--workers", "2", "--epochs", "50"])
        .arg("--data-dir")
        .arg(mnist_dir())
        .arg("--run-dir")
        .arg(run_dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(coordinator.stderr.take().expect("piped")).lines();
    let mut worker_pids = Vec::new();
    for line in lines.by_ref() {
        let line = line?;
        if line.contains("spawned worker process") {
            let pid = line.rsplit("pid=").next().expect("pid field").trim();
            worker_pids.push(pid.parse::<u32>()?);
        }
        if line.contains("training starts") {
            break;
        }
    }
    assert_eq!(worker_pids.len(), 2);

    info!("--- SIG{signal}");
    let signalled = Instant::now();
    let kill = Command::new("kill")
        .args([&format!("-{signal}"), &coordinator.id().to_string()])
        .status()?;
    assert!(kill.success());
    // Keep draining stderr so the coordinator never blocks on a full pipe.
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let status = coordinator.wait()?;
    let log = drain.join().expect("drain thread").join("\n");
    println!(
        "stopped {:.2} s after SIG{signal}",
        signalled.elapsed().as_secs_f64()
    );
    assert!(
        run_dir
            .path()
            .join("checkpoints/resume.safetensors")
            .is_file(),
        "no resume checkpoint\n{log}"
    );
    // The workers belong to this coordinator: none is left behind.
    for &pid in &worker_pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "worker process {pid} still exists"
        );
    }
    Ok((status, log, worker_pids))
}

/// Ctrl-C ends the job: the coordinator writes the resume checkpoint, dismisses its
/// workers, which leave by themselves, and exits 130.
#[test]
fn ctrl_c_stops_coordinator_and_its_workers() -> anyhow::Result<()> {
    let (status, log, _) = signal_local_job("INT")?;
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("interrupted"), "{log}");
    assert!(log.contains("resume checkpoint written"), "{log}");
    // `log` holds what came after the signal. Dismissed workers leave by themselves: none
    // registers again, none has to be killed.
    assert!(!log.contains("worker registered"), "{log}");
    assert!(!log.contains("killing them"), "{log}");
    Ok(())
}

/// SIGTERM (what Kubernetes sends a pod it stops) to a coordinator that spawned its workers:
/// the resume checkpoint is written and the job stopped with 143; the spawned workers, which
/// no other coordinator would reach, are stopped with it. (External workers are left to
/// wait for the next coordinator: `kubernetes.rs`.)
#[test]
fn sigterm_stops_coordinator_and_its_workers() -> anyhow::Result<()> {
    let (status, log, _) = signal_local_job("TERM")?;
    assert_eq!(status.code(), Some(143), "{log}");
    assert!(log.contains("stopped by SIGTERM"), "{log}");
    assert!(log.contains("resume checkpoint written"), "{log}");
    assert!(!log.contains("worker registered"), "{log}");
    Ok(())
}
