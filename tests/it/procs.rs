//! The real binaries as processes under a test's control: every output line captured with the
//! instant it arrived, bounded waits for log lines, signals by pid, and a guard that leaves no
//! process behind. Also the fault-free baseline run that fault tests compare against.

use crate::support::{binary, mnist_dir};
use std::{
    ffi::OsString,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant, UNIX_EPOCH},
};
pub use tests::log::{Line, Log, TAIL, WAIT, field};

/// Seed of every fault test and its baseline.
pub const SEED: u64 = 42;

/// A process started by the test.
#[derive(Clone)]
pub struct Proc {
    pub name: String,
    pub pid: u32,
    pub log: Log,
}

struct Running {
    proc: Proc,
    child: Child,
    status: Option<ExitStatus>,
}

/// The processes of one test. Dropping it SIGKILLs and reaps every one still running (stopped
/// ones are continued first), and when the test is failing, shows the end of every log.
#[derive(Default)]
pub struct Procs {
    running: Vec<Running>,
}

impl Procs {
    pub fn new() -> Procs {
        Procs::default()
    }

    /// Starts `command` with its stdout and stderr captured.
    pub fn spawn(&mut self, name: &str, mut command: Command) -> Proc {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let log = Log::new(name, 2);
        log.capture(child.stdout.take().expect("piped stdout"));
        log.capture(child.stderr.take().expect("piped stderr"));
        let proc = Proc {
            name: name.to_owned(),
            pid: child.id(),
            log,
        };
        self.running.push(Running {
            proc: proc.clone(),
            child,
            status: None,
        });
        proc
    }

    /// Starts the coordinator binary with `args`, logging every step.
    pub fn coordinator(&mut self, name: &str, args: &[OsString]) -> Proc {
        let mut command = Command::new(binary("coordinator"));
        command.args(args).env("RUST_LOG", "info,coordinator=debug");
        self.spawn(name, command)
    }

    /// Starts a worker of the coordinator at `url` on the shared MNIST, with one thread.
    pub fn worker(&mut self, name: &str, url: &str, extra: &[&str]) -> Proc {
        let mut command = Command::new(binary("worker"));
        command
            .args(["--coordinator", url, "--threads", "1", "--data-dir"])
            .arg(mnist_dir())
            .args(extra)
            .env("RUST_LOG", "info");
        self.spawn(name, command)
    }

    /// Starts a coordinator waiting for `job.workers` external workers on `addr`, writing to
    /// `run_dir`, with `extra` flags; `--resume` in `extra` replaces the job's own flags.
    pub fn external_coordinator(
        &mut self,
        name: &str,
        job: &Job,
        addr: SocketAddr,
        run_dir: &Path,
        extra: &[&str],
    ) -> Proc {
        let mut args: Vec<OsString> = vec![
            "--external-workers".into(),
            "--workers".into(),
            job.workers.to_string().into(),
            "--listen".into(),
            addr.to_string().into(),
            "--data-dir".into(),
            mnist_dir().into(),
        ];
        if !extra.contains(&"--resume") {
            args.push("--run-dir".into());
            args.push(run_dir.into());
            args.extend(job.args().into_iter().map(OsString::from));
        }
        // A cluster setting, not the job's: a resumed job needs it too.
        args.extend(["--allreduce".into(), job.allreduce.into()]);
        args.extend(extra.iter().map(OsString::from));
        self.coordinator(name, &args)
    }

    /// A coordinator as in [`Procs::external_coordinator`] on a free port, and its
    /// `job.workers` workers, each given `worker_flags`.
    pub fn cluster(
        &mut self,
        job: &Job,
        run_dir: &Path,
        extra: &[&str],
        worker_flags: &[&str],
    ) -> Cluster {
        let addr = free_addr();
        let url = format!("http://{addr}");
        let coordinator = self.external_coordinator("coordinator", job, addr, run_dir, extra);
        let workers = (0..job.workers)
            .map(|i| self.worker(&format!("worker#{i}"), &url, worker_flags))
            .collect();
        Cluster {
            coordinator,
            addr,
            url,
            run_dir: run_dir.to_path_buf(),
            workers,
        }
    }

    fn find(&mut self, proc: &Proc) -> &mut Running {
        self.running
            .iter_mut()
            .find(|r| r.proc.pid == proc.pid)
            .expect("a process of this test")
    }

    /// Sends `signal` (e.g. `libc::SIGKILL`) to a process that has not been reaped (so its pid
    /// is still its own); returns when it was sent.
    pub fn signal(&mut self, proc: &Proc, signal: i32) -> Instant {
        let running = self.find(proc);
        assert!(
            running.status.is_none(),
            "{} already exited ({:?})",
            proc.name,
            running.status
        );
        let sent = Instant::now();
        // SAFETY: kill has no memory effects; the pid is our unreaped child.
        let rc = unsafe { libc::kill(proc.pid as libc::pid_t, signal) };
        assert_eq!(
            rc,
            0,
            "kill({}, {signal}): {}",
            proc.pid,
            std::io::Error::last_os_error()
        );
        sent
    }

    /// Whether the process is still running (not exited; a stopped one counts as running).
    pub fn is_running(&mut self, proc: &Proc) -> bool {
        let running = self.find(proc);
        if running.status.is_none() {
            running.status = running.child.try_wait().expect("try_wait");
        }
        running.status.is_none()
    }

    /// Waits up to `timeout` (at most [`WAIT`]) for the process to exit, and reaps it.
    pub fn wait_exit(&mut self, proc: &Proc, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout.min(WAIT);
        loop {
            if !self.is_running(proc) {
                return self.find(proc).status.expect("exited");
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} still running after {:.0} s; last lines:\n{}",
                    proc.name,
                    timeout.min(WAIT).as_secs_f64(),
                    proc.log.tail(TAIL)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Prints the end of every log.
    pub fn dump(&self) {
        for running in &self.running {
            eprintln!(
                "===== {} (pid {}), last {TAIL} lines:\n{}",
                running.proc.name,
                running.proc.pid,
                running.proc.log.tail(TAIL)
            );
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        if thread::panicking() {
            self.dump();
        }
        for running in &mut self.running {
            if running.status.is_some() || !matches!(running.child.try_wait(), Ok(None)) {
                continue;
            }
            let pid = running.proc.pid as libc::pid_t;
            // SAFETY: as in `signal`: our own child, not yet reaped.
            unsafe {
                libc::kill(pid, libc::SIGCONT);
                libc::kill(pid, libc::SIGKILL);
            }
            let _ = running.child.wait();
        }
    }
}

/// A coordinator with external workers, as [`Procs::cluster`] started it.
pub struct Cluster {
    pub coordinator: Proc,
    pub addr: SocketAddr,
    pub url: String,
    pub run_dir: PathBuf,
    pub workers: Vec<Proc>,
}

impl Cluster {
    /// The coordinator's name for the worker process `worker` (`w3`), from its registration.
    pub fn worker_id(&self, worker: &Proc) -> String {
        worker_id(&self.coordinator.log, 0, worker.pid)
    }
}

/// The id that the coordinator writing `log` gave the process `pid` when it registered, the
/// first time at or after line `from` (a process registers again after an eviction).
pub fn worker_id(log: &Log, from: usize, pid: u32) -> String {
    let pid_field = format!(" pid={pid} ");
    let line = log.wait_for_line(
        from,
        &format!("worker registered ...{pid_field}"),
        |line| line.contains("worker registered") && line.contains(&pid_field),
        WAIT,
    );
    field(&line.text, "worker")
        .expect("a worker field")
        .to_owned()
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
}

/// What is trained: the flags that decide the result.
#[derive(Debug, Clone)]
pub struct Job {
    pub model: &'static str,
    pub workers: usize,
    pub epochs: u32,
    pub seed: u64,
    /// `--allreduce`: `ps`, `ring` or `nccl`.
    pub allreduce: &'static str,
}

impl Job {
    /// The MLP with `workers` workers for `epochs` epochs, seeded with [`SEED`].
    pub fn mlp(workers: usize, epochs: u32) -> Job {
        Job {
            model: "mlp",
            workers,
            epochs,
            seed: SEED,
            allreduce: "ps",
        }
    }

    /// The same job with the workers averaging over a ring.
    pub fn ring(self) -> Job {
        Job {
            allreduce: "ring",
            ..self
        }
    }

    /// The coordinator flags of this job, but for `--workers`.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--model".into(),
            self.model.into(),
            "--epochs".into(),
            self.epochs.to_string(),
            "--seed".into(),
            self.seed.to_string(),
        ]
    }
}

/// The records of `run_dir/metrics.jsonl`, one per epoch.
pub fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .map(|line| serde_json::from_str(line).expect("a JSON record"))
        .collect()
}

/// Path of the checkpoint written at the end of `epoch`.
pub fn epoch_checkpoint(run_dir: &Path, epoch: u32) -> PathBuf {
    run_dir.join(format!("checkpoints/epoch-{epoch:04}.safetensors"))
}

/// A fault-free run of a job.
pub struct Baseline {
    pub test_accuracy: f64,
    /// Its run directory, kept for comparing checkpoints.
    pub run_dir: PathBuf,
}

/// The fault-free run of `job` with external workers. Computed once per set of binaries and
/// flags and kept under the temporary directory, since every test runs in a process of its own.
pub fn baseline(job: &Job) -> Baseline {
    let key = {
        let mut text = format!(
            "v2 workers={} allreduce={} {}",
            job.workers,
            job.allreduce,
            job.args().join(" ")
        );
        for name in ["coordinator", "worker"] {
            // A rebuilt binary may train differently: it gets a baseline of its own.
            let meta = std::fs::metadata(binary(name)).expect("the binary exists");
            let modified = meta.modified().expect("mtime").duration_since(UNIX_EPOCH);
            text += &format!(" {name}:{}:{:?}", meta.len(), modified.expect("after 1970"));
        }
        fnv1a(text.as_bytes())
    };
    let dir = std::env::temp_dir().join(format!("lockstep-baseline-{key:016x}"));
    let accuracy_file = dir.join("test_accuracy");
    if let Ok(text) = std::fs::read_to_string(&accuracy_file) {
        return Baseline {
            test_accuracy: text.trim().parse().expect("a number"),
            run_dir: dir.join("run"),
        };
    }

    tracing::info!("--- baseline run without faults: {job:?}");
    // Built aside and renamed into place whole, so an interrupted or concurrent run never
    // leaves a half-written baseline behind.
    let scratch = tempfile::Builder::new()
        .prefix(&format!("lockstep-baseline-{key:016x}."))
        .tempdir_in(std::env::temp_dir())
        .expect("a temporary directory");
    let test_accuracy = {
        let mut procs = Procs::new();
        let cluster = procs.cluster(job, &scratch.path().join("run"), &[], &[]);
        let status = procs.wait_exit(&cluster.coordinator, WAIT);
        assert!(status.success(), "baseline coordinator: {status}");
        let records = metrics(&cluster.run_dir);
        assert_eq!(records.len(), job.epochs as usize);
        records
            .last()
            .and_then(|r| r["test_accuracy"].as_f64())
            .expect("test accuracy")
    };
    std::fs::write(
        scratch.path().join("test_accuracy"),
        test_accuracy.to_string(),
    )
    .expect("writing the baseline");
    let scratch = scratch.keep();
    if std::fs::rename(&scratch, &dir).is_err() {
        // Another process finished the same baseline first: use that one.
        let _ = std::fs::remove_dir_all(&scratch);
        assert!(
            accuracy_file.is_file(),
            "baseline {} unusable",
            dir.display()
        );
    }
    println!(
        "baseline {job:?}: test accuracy {test_accuracy} ({})",
        dir.display()
    );
    Baseline {
        test_accuracy,
        run_dir: dir.join("run"),
    }
}

/// 64-bit FNV-1a: a hash that stays the same across Rust releases, for file names.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
