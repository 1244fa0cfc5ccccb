//! Worker processes that the coordinator starts on its own machine (`--workers N`).

use crate::{Error, Result, event::Event};
use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};
use tokio::{process::Command, sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What to run as a worker.
#[derive(Debug, Clone)]
pub enum WorkerProgram {
    /// This very executable with the `worker` subcommand: a single binary suffices.
    CurrentExe,
    /// A separate `worker` binary.
    Binary(PathBuf),
}

/// How to start the local workers.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub program: WorkerProgram,
    pub coordinator_url: String,
    pub data_dir: PathBuf,
    pub threads: usize,
}

/// The spawned worker processes; each is watched, and killed if still alive at shutdown.
pub struct LocalWorkers {
    watchers: Vec<JoinHandle<()>>,
    kill: CancellationToken,
}

impl LocalWorkers {
    /// Starts `count` workers. Each exit is reported on `events` as
    /// [`Event::ProcessExited`].
    pub fn spawn(
        spec: &LaunchSpec,
        count: usize,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<LocalWorkers> {
        let kill = CancellationToken::new();
        let mut watchers = Vec::with_capacity(count);
        for index in 0..count {
            let mut command = worker_command(spec)?;
            let program = PathBuf::from(command.as_std().get_program());
            let mut child = command
                .spawn()
                .map_err(|source| Error::Spawn { program, source })?;
            info!(index, pid = child.id(), "spawned worker process");
            let events = events.clone();
            let kill = kill.clone();
            watchers.push(tokio::spawn(async move {
                let status = tokio::select! {
                    status = child.wait() => status,
                    () = kill.cancelled() => {
                        let _ = child.start_kill();
                        child.wait().await
                    }
                };
                let status = match status {
                    Ok(status) => status.to_string(),
                    Err(e) => format!("could not be waited for: {e}"),
                };
                let _ = events.send(Event::ProcessExited { index, status });
            }));
        }
        Ok(LocalWorkers { watchers, kill })
    }

    /// Gives the workers `grace` to exit by themselves (they were told to shut down), then
    /// kills those still running.
    pub async fn shutdown(self, grace: Duration) {
        let mut watchers = self.watchers;
        let all_exited = async {
            for watcher in &mut watchers {
                let _ = watcher.await;
            }
        };
        if tokio::time::timeout(grace, all_exited).await.is_err() {
            warn!("worker processes still running after {grace:?}: killing them");
            self.kill.cancel();
            for watcher in watchers {
                let _ = watcher.await;
            }
        }
    }
}

fn worker_command(spec: &LaunchSpec) -> Result<Command> {
    let mut std_command = match &spec.program {
        WorkerProgram::CurrentExe => {
            let exe = std::env::current_exe().map_err(|source| Error::Spawn {
                program: PathBuf::from("<current executable>"),
                source,
            })?;
            let mut command = std::process::Command::new(exe);
            // Show up as `worker` in process listings.
            command.arg0("worker").arg("worker");
            command
        }
        WorkerProgram::Binary(path) => std::process::Command::new(path),
    };
    std_command
        .arg("--coordinator")
        .arg(&spec.coordinator_url)
        .arg("--data-dir")
        .arg(absolute(&spec.data_dir))
        .arg("--threads")
        .arg(spec.threads.to_string())
        .stdin(Stdio::null());
    let mut command = Command::from(std_command);
    command.kill_on_drop(true);
    Ok(command)
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
