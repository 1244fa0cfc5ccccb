//! Worker processes that the coordinator starts on its own machine (`--workers N`).

use crate::{Error, Result, event::Event};
use process::{LogFormat, StopCause};
use proto::security::JoinToken;
use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Pause before a dead worker is started again, so a worker that dies at once does not spin.
const RESTART_DELAY: Duration = Duration::from_millis(500);

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
    /// `--device` of each worker: cpu or cuda:N.
    pub device: String,
    /// CA the workers check the coordinator's certificate with, when it serves TLS.
    pub tls_ca: Option<PathBuf>,
    /// Passed in the environment, not on the command line, where `ps` would show it.
    pub join_token: Option<JoinToken>,
    /// The coordinator's own, so that the job's logs have one format.
    pub log_format: LogFormat,
    /// Pass the workers' log lines through the coordinator's, which writes them around its
    /// progress bar; otherwise the workers write to the coordinator's stderr themselves.
    pub forward_logs: bool,
}

/// The spawned worker processes; each is watched, and killed if still alive at shutdown.
pub struct LocalWorkers {
    watchers: Vec<JoinHandle<()>>,
    kill: CancellationToken,
}

impl LocalWorkers {
    /// Starts `count` workers. A worker that dies (exits with a failure status or by a signal)
    /// while the job runs is started again, up to `max_restarts` times per slot; each exit is
    /// reported on `events` as [`Event::ProcessExited`].
    pub fn spawn(
        spec: &LaunchSpec,
        count: usize,
        max_restarts: u32,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<LocalWorkers> {
        let kill = CancellationToken::new();
        let mut watchers = Vec::with_capacity(count);
        for index in 0..count {
            let first = start(spec, index)?;
            let spec = spec.clone();
            let events = events.clone();
            let kill = kill.clone();
            watchers.push(tokio::spawn(async move {
                let mut child = first;
                let mut restarts = 0;
                loop {
                    let status = tokio::select! {
                        status = child.wait() => status,
                        () = kill.cancelled() => {
                            let _ = child.start_kill();
                            let _ = child.wait().await;
                            return;
                        }
                    };
                    // Exit status 0 means the worker was dismissed, 130 and 143 that it was
                    // asked to stop (Ctrl-C, SIGTERM): it is not restarted.
                    let failed = !status.as_ref().is_ok_and(|s| {
                        s.success()
                            || [StopCause::Interrupt, StopCause::Terminate]
                                .iter()
                                .any(|cause| s.code() == Some(i32::from(cause.exit_status())))
                    });
                    let restarting = failed && restarts < max_restarts && !kill.is_cancelled();
                    let status = match status {
                        Ok(status) => status.to_string(),
                        Err(e) => format!("could not be waited for: {e}"),
                    };
                    let _ = events.send(Event::ProcessExited {
                        index,
                        status,
                        restarting,
                    });
                    if !restarting {
                        return;
                    }
                    restarts += 1;
                    tokio::select! {
                        () = tokio::time::sleep(RESTART_DELAY) => {}
                        () = kill.cancelled() => return,
                    }
                    child = match start(&spec, index) {
                        Ok(child) => child,
                        Err(e) => {
                            warn!(index, "cannot restart worker process: {e}");
                            return;
                        }
                    };
                }
            }));
        }
        Ok(LocalWorkers { watchers, kill })
    }

    /// Kills the workers now (SIGKILL): they were not dismissed, and hold nothing that
    /// needs saving.
    pub async fn kill(self) {
        self.kill.cancel();
        for watcher in self.watchers {
            let _ = watcher.await;
        }
    }

    /// Gives the workers `grace` to exit by themselves (they were told to shut down), then
    /// kills those still running.
    pub async fn shutdown(self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        // A handle is awaited again only if it had not finished: polling a finished
        // `JoinHandle` a second time panics.
        let mut running = Vec::new();
        for mut watcher in self.watchers {
            if tokio::time::timeout_at(deadline, &mut watcher)
                .await
                .is_err()
            {
                running.push(watcher);
            }
        }
        if !running.is_empty() {
            warn!(
                "{} worker processes still running after {grace:?}: killing them",
                running.len()
            );
            self.kill.cancel();
            for watcher in running {
                let _ = watcher.await;
            }
        }
    }
}

/// Starts worker process `index`.
fn start(spec: &LaunchSpec, index: usize) -> Result<Child> {
    let mut command = worker_command(spec)?;
    if spec.forward_logs {
        command.stderr(Stdio::piped());
    }
    let program = PathBuf::from(command.as_std().get_program());
    let mut child = command
        .spawn()
        .map_err(|source| Error::Spawn { program, source })?;
    info!(index, pid = child.id(), "spawned worker process");
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                crate::console::write_line(&line);
            }
        });
    }
    Ok(child)
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
        .arg("--device")
        .arg(&spec.device)
        // Its ring neighbours are on this machine too.
        .args(["--ring-listen", "127.0.0.1:0"])
        .args(["--log-format", spec.log_format.name()])
        .stdin(Stdio::null());
    if let Some(ca) = &spec.tls_ca {
        std_command
            .arg("--tls-ca")
            .arg(absolute(ca))
            .args(["--tls-domain", "localhost"]);
    }
    if let Some(token) = &spec.join_token {
        std_command.env("LOCKSTEP_JOIN_TOKEN", token.expose());
    }
    // The workers belong to this coordinator: if it dies, even by SIGKILL, the kernel sends
    // them SIGTERM rather than leaving them to wait for a coordinator that is gone.
    // SAFETY: prctl is async-signal-safe and touches only the child being set up.
    unsafe {
        std_command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut command = Command::from(std_command);
    command.kill_on_drop(true);
    Ok(command)
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
