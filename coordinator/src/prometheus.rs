//! `--metrics-listen`: the job's figures in the Prometheus text exposition format (0.0.4) at
//! `GET /metrics`, rendered from the latest [`JobStatus`] snapshot on every scrape.

use crate::status::{JobStatus, Phase, WorkerState, WorkerStatus};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::TokioIo;
use std::{convert::Infallible, fmt::Write};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// What Prometheus expects of the text format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics` on `listener` until `stop` is cancelled.
pub fn spawn(
    listener: TcpListener,
    status: watch::Receiver<JobStatus>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        debug!("metrics listener: {e}");
                        continue;
                    }
                },
                () = stop.cancelled() => return,
            };
            let status = status.clone();
            let service = hyper::service::service_fn(move |request| {
                let response = respond(&request, &status);
                async move { Ok::<_, Infallible>(response) }
            });
            let stop = stop.clone();
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    result = connection => if let Err(e) = result {
                        debug!("metrics connection: {e}");
                    },
                    () = stop.cancelled() => {}
                }
            });
        }
    })
}

fn respond(
    request: &Request<Incoming>,
    status: &watch::Receiver<JobStatus>,
) -> Response<Full<Bytes>> {
    let (code, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            let snapshot = status.borrow().clone();
            (StatusCode::OK, render(&snapshot))
        }
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET /metrics\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "metrics are at /metrics\n".to_string(),
        ),
    };
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, CONTENT_TYPE)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

/// The text exposition of `s`: every family with its `# HELP` and `# TYPE` lines.
pub fn render(s: &JobStatus) -> String {
    let mut out = Exposition::default();
    out.family(
        "lockstep_info",
        "gauge",
        "The job: id, model and how gradients are averaged (always 1).",
    );
    out.sample(
        "lockstep_info",
        &[
            ("job_id", &s.job_id),
            ("model", &s.model),
            ("allreduce", &s.allreduce),
        ],
        1.0,
    );
    out.family(
        "lockstep_phase",
        "gauge",
        "1 for the job's current phase, else 0.",
    );
    for phase in Phase::ALL {
        out.sample(
            "lockstep_phase",
            &[("phase", phase.name())],
            f64::from(u8::from(s.phase == phase)),
        );
    }
    let plain: [(&str, &str, &str, f64); 17] = [
        (
            "lockstep_epoch",
            "gauge",
            "Current epoch, 1-based.",
            f64::from(s.epoch),
        ),
        (
            "lockstep_epochs",
            "gauge",
            "Epochs the job trains.",
            f64::from(s.epochs),
        ),
        (
            "lockstep_epoch_step",
            "gauge",
            "Steps done in the current epoch.",
            s.step as f64,
        ),
        (
            "lockstep_epoch_steps",
            "gauge",
            "Steps an epoch takes without failures.",
            s.steps_per_epoch as f64,
        ),
        (
            "lockstep_steps_total",
            "counter",
            "Steps done since the job started.",
            s.global_step as f64,
        ),
        (
            "lockstep_job_steps",
            "gauge",
            "Steps the whole job takes.",
            s.total_steps as f64,
        ),
        (
            "lockstep_images_trained_total",
            "counter",
            "Training images used since the job started.",
            s.images_trained as f64,
        ),
        (
            "lockstep_train_loss",
            "gauge",
            "Mean training loss of the current epoch so far.",
            s.train_loss,
        ),
        (
            "lockstep_images_per_second",
            "gauge",
            "Training images per second in the current epoch (training time only).",
            s.images_per_sec,
        ),
        (
            "lockstep_step_seconds",
            "gauge",
            "Wall time of the last step.",
            s.last_step_seconds,
        ),
        (
            "lockstep_step_compute_seconds",
            "gauge",
            "Part of the last step the slowest worker spent computing.",
            s.last_compute_seconds,
        ),
        (
            "lockstep_step_comm_seconds",
            "gauge",
            "Part of the last step spent communicating.",
            s.last_comm_seconds,
        ),
        (
            "lockstep_train_seconds_total",
            "counter",
            "Wall time of all steps.",
            s.train_seconds,
        ),
        (
            "lockstep_compute_seconds_total",
            "counter",
            "Per step the slowest worker's computing time, summed.",
            s.compute_seconds,
        ),
        (
            "lockstep_comm_seconds_total",
            "counter",
            "Per step the time communicating, summed.",
            s.comm_seconds,
        ),
        (
            "lockstep_elapsed_seconds",
            "gauge",
            "Seconds since this coordinator started the job.",
            s.elapsed_seconds,
        ),
        (
            "lockstep_evaluated",
            "gauge",
            "1 once an epoch has been evaluated (the test figures are then present).",
            f64::from(u8::from(s.last_test.is_some())),
        ),
    ];
    for (name, kind, help, value) in plain {
        out.family(name, kind, help);
        out.sample(name, &[], value);
    }
    if let Some((accuracy, loss)) = s.last_test {
        out.family(
            "lockstep_test_accuracy",
            "gauge",
            "Test accuracy after the last completed epoch (fraction).",
        );
        out.sample("lockstep_test_accuracy", &[], accuracy);
        out.family(
            "lockstep_test_loss",
            "gauge",
            "Test loss after the last completed epoch.",
        );
        out.sample("lockstep_test_loss", &[], loss);
    }
    out.family(
        "lockstep_workers",
        "gauge",
        "Workers by state (departures: the most recent ones).",
    );
    for state in WorkerState::ALL {
        out.sample(
            "lockstep_workers",
            &[("state", state.name())],
            s.count(state) as f64,
        );
    }
    out.family(
        "lockstep_worker_state",
        "gauge",
        "1 for each listed worker's state.",
    );
    for w in &s.workers {
        let id = w.id.to_string();
        out.sample(
            "lockstep_worker_state",
            &[
                ("worker", &id),
                ("address", &w.address),
                ("state", w.state.name()),
            ],
            1.0,
        );
    }
    let per_worker: [(&str, &str, &str, WorkerFigure); 3] = [
        (
            "lockstep_worker_images_per_second",
            "gauge",
            "A worker's images per second of computing in the last step it took part in.",
            |w| w.images_per_sec,
        ),
        (
            "lockstep_worker_step_seconds",
            "gauge",
            "A worker's computing time in the last step it took part in.",
            |w| w.last_step_seconds,
        ),
        (
            "lockstep_worker_images_total",
            "counter",
            "Training images a worker computed gradients of.",
            |w| w.images as f64,
        ),
    ];
    for (name, kind, help, value) in per_worker {
        out.family(name, kind, help);
        for w in &s.workers {
            out.sample(name, &[("worker", &w.id.to_string())], value(w));
        }
    }
    out.text
}

/// One figure of a worker, for a family with a sample per worker.
type WorkerFigure = fn(&WorkerStatus) -> f64;

/// The text being built.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{}\"", escape(value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", number(value));
    }
}

/// Label values escape backslash, double quote and line feed.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::ids::WorkerId;

    #[test]
    fn every_sample_follows_its_help_and_type_and_labels_are_escaped() {
        let status = JobStatus {
            job_id: "a\"b\\c\nd".into(),
            phase: Phase::Training,
            global_step: 12,
            last_test: Some((0.97, 0.1)),
            workers: vec![WorkerStatus {
                id: WorkerId(3),
                address: "127.0.0.1:5".into(),
                state: WorkerState::Active,
                reason: String::new(),
                last_step_seconds: 0.5,
                images_per_sec: 128.0,
                steps: 1,
                images: 64,
            }],
            ..JobStatus::default()
        };
        let text = render(&status);
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["gauge", "counter"].contains(&kind), "{line}");
                assert!(typed.insert(name.to_string()), "{name} typed twice");
            } else if !line.starts_with("# HELP ") {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(typed.contains(name), "{line} has no TYPE before it");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "{line}");
            }
        }
        assert!(text.contains(r#"job_id="a\"b\\c\nd""#), "{text}");
        assert!(text.contains("lockstep_steps_total 12\n"));
        assert!(text.contains("lockstep_phase{phase=\"training\"} 1\n"));
        assert!(text.contains("lockstep_phase{phase=\"done\"} 0\n"));
        assert!(text.contains("lockstep_workers{state=\"active\"} 1\n"));
        assert!(text.contains("lockstep_workers{state=\"evicted\"} 0\n"));
        assert!(text.contains("lockstep_worker_images_per_second{worker=\"w3\"} 128\n"));
        assert!(text.contains("lockstep_test_accuracy 0.97\n"));
        assert_eq!(number(f64::INFINITY), "+Inf");
    }
}
