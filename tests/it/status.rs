//! Watching a job from outside while it runs: the `Status` RPC and `coordinator status`, the
//! standard gRPC health service, the Prometheus endpoint, JSON logs with progress lines, and
//! what the run writes (per-class accuracy, the step-time split, progress records).

use crate::{
    procs::{Log, Procs, WAIT},
    support::{binary, init_logging, mnist_dir},
};
use proto::v1::{JobPhase, StatusRequest, WorkerState, coordinator_client::CoordinatorClient};
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tracing::info;

/// Steps of the job: the first epoch (469 steps of 128 images) and part of the second.
const STEPS: u64 = 700;

#[test]
fn a_running_job_reports_status_health_and_metrics() -> anyhow::Result<()> {
    init_logging();
    let run_dir = tempfile::tempdir()?;
    let mut procs = Procs::new();
    let mut command = Command::new(binary("coordinator"));
    command
        .args(["--workers", "2", "--model", "mlp", "--epochs", "2"])
        .args(["--max-steps", &STEPS.to_string(), "--progress-every", "0.2"])
        .args(["--log-format", "json", "--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(mnist_dir())
        .arg("--run-dir")
        .arg(run_dir.path())
        .env("RUST_LOG", "info");
    let coordinator = procs.spawn("coordinator", command);
    let grpc = logged_addr(&coordinator.log, "coordinator listening");
    let metrics = logged_addr(&coordinator.log, "serving Prometheus metrics");
    let url = format!("http://{grpc}");

    // Several threads: the health stream's connection keeps reading while the test waits.
    let runtime = tokio::runtime::Runtime::new()?;
    let mut watch = runtime.block_on(async {
        info!("--- health: SERVING while the job runs");
        let channel = tonic::transport::Endpoint::from_shared(url.clone())?
            .connect()
            .await?;
        let mut health = HealthClient::new(channel);
        let overall = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner();
        assert_eq!(overall.status(), ServingStatus::Serving);
        let mut watch = health
            .watch(HealthCheckRequest {
                service: "lockstep.v1.Coordinator".into(),
            })
            .await?
            .into_inner();
        let first = watch.message().await?.expect("a first status");
        assert_eq!(first.status(), ServingStatus::Serving);
        anyhow::Ok(watch)
    })?;

    info!("--- the Status RPC while training");
    let status = runtime.block_on(async {
        let mut client = CoordinatorClient::connect(url.clone()).await?;
        let deadline = Instant::now() + WAIT;
        loop {
            let status = client.status(StatusRequest {}).await?.into_inner();
            if status.phase() == JobPhase::Training && status.global_step > 0 {
                return anyhow::Ok(status);
            }
            assert!(Instant::now() < deadline, "never training: {status:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })?;
    assert_eq!(
        (status.model.as_str(), status.allreduce.as_str()),
        ("mlp", "ring"),
        "spawned workers sum in a ring by default"
    );
    assert_eq!((status.epochs, status.total_steps), (2, STEPS));
    assert_eq!(status.steps_per_epoch, 469);
    assert!(!status.evaluated, "{status:?}");
    assert_eq!(status.workers.len(), 2, "{status:?}");
    for worker in &status.workers {
        assert_eq!(worker.state(), WorkerState::Active, "{worker:?}");
        assert!(worker.address.starts_with("127.0.0.1:"), "{worker:?}");
        assert!(worker.steps > 0 && worker.images > 0, "{worker:?}");
        assert!(worker.images_per_sec > 0.0, "{worker:?}");
    }

    info!("--- coordinator status, as text and as JSON");
    let text = status_command(&["--coordinator", &url])?;
    assert!(text.contains(" (mlp, ring): "), "{text}");
    assert!(text.contains("/2, step "), "{text}");
    assert_eq!(text.matches(" active ").count(), 2, "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&status_command(&["--coordinator", &url, "--json"])?)?;
    assert_eq!(json["model"], "mlp");
    assert!(json["global_step"].as_u64() >= Some(status.global_step));
    let workers = json["workers"].as_array().expect("a list of workers");
    assert_eq!(workers.len(), 2, "{json}");
    assert!(workers.iter().all(|w| w["state"] == "active"), "{json}");
    let unreachable = Command::new(binary("coordinator"))
        .args(["status", "--coordinator", "http://127.0.0.1:1"])
        .output()?;
    assert!(!unreachable.status.success());
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert!(stderr.contains("http://127.0.0.1:1"), "{stderr}");

    info!("--- Prometheus metrics move while the job trains");
    let first = scrape(&metrics);
    assert_eq!(first.get("lockstep_workers{state=\"active\"}"), Some(&2.0));
    assert_eq!(first.get("lockstep_epochs"), Some(&2.0));
    assert_eq!(first.get("lockstep_phase{phase=\"training\"}"), Some(&1.0));
    let per_worker = first
        .keys()
        .filter(|name| name.starts_with("lockstep_worker_images_per_second{"))
        .count();
    assert_eq!(per_worker, 2, "{first:?}");
    let steps = first["lockstep_steps_total"];
    let deadline = Instant::now() + WAIT;
    loop {
        let later = scrape(&metrics);
        if later["lockstep_steps_total"] > steps {
            assert!(
                later["lockstep_images_trained_total"] > first["lockstep_images_trained_total"]
            );
            break;
        }
        assert!(Instant::now() < deadline, "the step counter never moved");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, _) = http_get(&metrics, "/nothing-here");
    assert_eq!(code, 404);

    info!("--- the job ends: NOT_SERVING");
    let statuses = runtime.block_on(async {
        let mut statuses = Vec::new();
        while let Ok(Some(message)) = watch.message().await {
            statuses.push(message.status());
            if message.status() == ServingStatus::NotServing {
                break;
            }
        }
        statuses
    });
    assert_eq!(
        statuses.last(),
        Some(&ServingStatus::NotServing),
        "{statuses:?}"
    );
    let exit = procs.wait_exit(&coordinator, WAIT);
    assert!(exit.success(), "{exit:?}");

    info!("--- JSON logs, with progress lines");
    let lines = coordinator.log.find_all(|_| true);
    let mut progress_lines = 0;
    for line in &lines {
        // stdout's two summary lines are the only text; workers log JSON too.
        if line.text.starts_with("trained ") || line.text.starts_with("run directory") {
            continue;
        }
        let record: serde_json::Value = serde_json::from_str(&line.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", line.text));
        let fields = &record["fields"];
        if fields["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("progress: epoch "))
        {
            assert!(fields["step"].as_u64().is_some(), "{record}");
            assert!(fields["images_per_sec"].as_f64().is_some(), "{record}");
            progress_lines += 1;
        }
    }
    assert!(progress_lines > 0, "no progress line in the log");

    info!("--- metrics.jsonl: per-class accuracy and the step-time split");
    let records = crate::procs::metrics(run_dir.path());
    assert_eq!(records.len(), 2);
    for record in &records {
        let accuracy = record["test_accuracy"].as_f64().expect("accuracy");
        let per_class = numbers(&record["test_accuracy_per_class"]);
        let samples = numbers(&record["test_samples_per_class"]);
        assert_eq!((per_class.len(), samples.len()), (10, 10), "{record}");
        assert_eq!(samples.iter().sum::<f64>(), 10_000.0);
        let weighted = per_class
            .iter()
            .zip(&samples)
            .map(|(a, n)| a * n)
            .sum::<f64>()
            / 10_000.0;
        assert!(
            (weighted - accuracy).abs() < 1e-9,
            "{weighted} vs {accuracy}"
        );
        let mean = per_class.iter().sum::<f64>() / 10.0;
        assert!((mean - accuracy).abs() < 0.02, "{mean} vs {accuracy}");
        let split = &record["step_time"];
        let parts: f64 = ["compute", "comm", "wait"]
            .iter()
            .map(|part| split[part].as_f64().expect("a number"))
            .sum();
        let seconds = split["seconds"].as_f64().expect("a number");
        assert!(
            seconds > 0.0 && (parts - seconds).abs() < 1e-6 * seconds.max(1.0),
            "{record}"
        );
        assert!(record["wait_seconds"].as_f64() >= Some(0.0), "{record}");
    }

    info!("--- progress.jsonl: running loss every few seconds");
    let progress: Vec<serde_json::Value> =
        std::fs::read_to_string(run_dir.path().join("progress.jsonl"))?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
    // At least the record at the end of each epoch's training.
    assert!(progress.len() >= 2, "{progress:?}");
    let mut last_step = 0;
    for record in &progress {
        assert_eq!(record["kind"], "progress");
        let step = record["global_step"].as_u64().expect("a step");
        assert!(step > last_step, "{progress:?}");
        last_step = step;
        assert!(record["train_loss"].as_f64().is_some_and(f64::is_finite));
    }
    assert_eq!(last_step, STEPS);
    Ok(())
}

/// The address in the `addr` field of the JSON log line whose message starts with `message`.
fn logged_addr(log: &Log, message: &str) -> String {
    let line = log.wait_for(message);
    let record: serde_json::Value = serde_json::from_str(&line.text).expect("a JSON log line");
    record["fields"]["addr"]
        .as_str()
        .unwrap_or_else(|| panic!("no addr in {record}"))
        .to_owned()
}

/// Runs `coordinator status ARGS`, which must succeed, and returns its stdout.
fn status_command(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(binary("coordinator"))
        .arg("status")
        .args(args)
        .output()?;
    let stdout = String::from_utf8(output.stdout)?;
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

/// `GET path` over HTTP/1.1: the status code and the body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("the metrics port accepts");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request sent");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("a response");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers end");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    if code == 200 {
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
    }
    (code, body.to_owned())
}

/// Every sample of a scrape, by name with labels; each must follow its `# TYPE` line.
fn scrape(addr: &str) -> HashMap<String, f64> {
    let (code, body) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    let mut typed = Vec::new();
    let mut samples = HashMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.push(rest.split(' ').next().expect("a name").to_owned());
        } else if !line.starts_with('#') {
            let (series, value) = line.rsplit_once(' ').expect("a value");
            let name = series.split('{').next().expect("a name");
            assert!(typed.iter().any(|t| t == name), "{line} before its TYPE");
            samples.insert(series.to_owned(), value.parse().expect("a number"));
        }
    }
    samples
}

fn numbers(value: &serde_json::Value) -> Vec<f64> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|n| n.as_f64().expect("a number"))
        .collect()
}
