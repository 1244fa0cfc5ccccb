//! `coordinator status`: asks a running coordinator what its job is doing and prints it.

use crate::{Error, Result};
use clap::Args;
use proto::{
    client,
    security::ClientAuth,
    v1::{
        JobPhase, StatusReply, StatusRequest, WorkerState, coordinator_client::CoordinatorClient,
    },
};
use serde_json::json;
use std::{fmt::Write, process::ExitCode, time::Duration};

/// Where the coordinator is and how to reach it: the worker's connection flags.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The coordinator's gRPC address, e.g. http://10.0.0.5:50051 (https:// with TLS).
    #[arg(long, env = "LOCKSTEP_COORDINATOR")]
    pub coordinator: String,

    /// Print the status as one JSON object.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub credentials: process::Credentials,
}

/// The `status` command: prints the job's status, exit status 1 when the coordinator cannot
/// be asked.
pub fn status_command(args: StatusArgs) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime starts");
    match runtime.block_on(fetch_status(&args)) {
        Ok(reply) => {
            if args.json {
                println!("{}", status_json(&reply));
            } else {
                print!("{}", status_text(&reply));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Asks the coordinator at `args.coordinator` for its status.
pub async fn fetch_status(args: &StatusArgs) -> Result<StatusReply> {
    let url = &args.coordinator;
    let fail = |reason: String| Error::StatusQuery {
        url: url.clone(),
        reason,
    };
    let endpoint = client::endpoint(url, args.credentials.tls().as_ref())
        .map_err(|e| fail(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    let token = args
        .credentials
        .join_token()
        .map_err(|e| fail(e.to_string()))?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| fail(format!("cannot connect: {e}")))?;
    let mut client = CoordinatorClient::with_interceptor(channel, ClientAuth::new(token));
    let reply = client
        .status(StatusRequest {})
        .await
        .map_err(|status| fail(format!("{:?}: {}", status.code(), status.message())))?;
    Ok(reply.into_inner())
}

/// The phase in words: `training`, `waiting_for_workers`, ...
fn phase_name(reply: &StatusReply) -> String {
    let phase = JobPhase::try_from(reply.phase).unwrap_or(JobPhase::Unspecified);
    phase
        .as_str_name()
        .trim_start_matches("JOB_PHASE_")
        .to_lowercase()
}

fn state_name(state: i32) -> String {
    let state = WorkerState::try_from(state).unwrap_or(WorkerState::Unspecified);
    state
        .as_str_name()
        .trim_start_matches("WORKER_STATE_")
        .to_lowercase()
}

/// The status for people.
pub fn status_text(r: &StatusReply) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "job {} ({}, {}): {}",
        r.job_id,
        r.model,
        r.allreduce,
        phase_name(r).replace('_', " ")
    );
    if !r.error.is_empty() {
        let _ = writeln!(out, "error: {}", r.error);
    }
    let _ = writeln!(
        out,
        "epoch {}/{}, step {}/{} (job step {}/{}), {} images trained, {:.1} s",
        r.epoch,
        r.epochs,
        r.step,
        r.steps_per_epoch,
        r.global_step,
        r.total_steps,
        r.images_trained,
        r.elapsed_seconds
    );
    let _ = writeln!(
        out,
        "train loss {:.4}, {:.0} images/s, last step {:.3} s",
        r.train_loss, r.images_per_sec, r.last_step_seconds
    );
    if r.evaluated {
        let _ = writeln!(
            out,
            "last test accuracy {:.2}% (loss {:.4})",
            r.test_accuracy * 100.0,
            r.test_loss
        );
    } else {
        let _ = writeln!(out, "last test accuracy: not evaluated yet");
    }
    let _ = writeln!(out, "workers:");
    for w in &r.workers {
        let _ = write!(
            out,
            "  w{:<4} {:<8} {:<22} {:>9.0} images/s  last step {:.3} s  {} steps  {} images",
            w.worker_id,
            state_name(w.state),
            w.address,
            w.images_per_sec,
            w.last_step_seconds,
            w.steps,
            w.images
        );
        if !w.reason.is_empty() {
            let _ = write!(out, "  ({})", w.reason);
        }
        out.push('\n');
    }
    out
}

/// The status as JSON, with the field names of the `StatusReply` message.
pub fn status_json(r: &StatusReply) -> serde_json::Value {
    json!({
        "job_id": r.job_id,
        "model": r.model,
        "allreduce": r.allreduce,
        "phase": phase_name(r),
        "epoch": r.epoch,
        "epochs": r.epochs,
        "step": r.step,
        "steps_per_epoch": r.steps_per_epoch,
        "global_step": r.global_step,
        "total_steps": r.total_steps,
        "images_trained": r.images_trained,
        "train_loss": r.train_loss,
        "images_per_sec": r.images_per_sec,
        "last_step_seconds": r.last_step_seconds,
        "elapsed_seconds": r.elapsed_seconds,
        "evaluated": r.evaluated,
        "test_accuracy": r.evaluated.then_some(r.test_accuracy),
        "test_loss": r.evaluated.then_some(r.test_loss),
        "error": r.error,
        "workers": r.workers.iter().map(|w| json!({
            "worker_id": w.worker_id,
            "address": w.address,
            "state": state_name(w.state),
            "reason": w.reason,
            "last_step_seconds": w.last_step_seconds,
            "images_per_sec": w.images_per_sec,
            "steps": w.steps,
            "images": w.images,
        })).collect::<Vec<_>>(),
    })
}
