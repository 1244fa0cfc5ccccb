//! A lab that runs the deployment's manifests for real, without a Kubernetes cluster.
//!
//! No API server can run here and none may be faked, so the lab is not one: it reads the
//! rendered manifests (`kubectl kustomize`) and the generated Secrets, and does what the
//! kubelet and the Job controller would do with them, on this machine:
//!
//! - every pod is a real process of the real binary its container names (from the lab's
//!   image directory), in a network namespace of its own with its own address on a bridge,
//!   resolving Service names (`/etc/hosts`) to a Service address that moves to whichever pod
//!   backs the Service; see [`pod`] for volumes, environment, users and mounts;
//! - NetworkPolicies become iptables rules in each pod's namespace ([`policy`]);
//! - Jobs get their pods as the Job controller makes them: names, the completion index
//!   (label, annotation, `JOB_COMPLETION_INDEX`), replacement of failed pods with the
//!   exponential backoff, `podFailurePolicy` (exit codes and the `DisruptionTarget`
//!   condition), `backoffLimit`, `backoffLimitPerIndex`, `successPolicy`, and elastic
//!   Indexed Jobs (changing completions and parallelism together);
//! - the kubelet's probes run as it runs them (period, timeout, thresholds, startup before
//!   the others), from the node's address; a liveness probe that fails its threshold kills
//!   the container (SIGTERM, the grace period, SIGKILL).
//!
//! What it does not do: schedule onto several nodes (every pod shares this machine's cores),
//! enforce memory limits or seccomp, pull images, or gate Service endpoints on readiness.

pub mod manifest;
pub mod net;
pub mod pod;
pub mod policy;

use crate::log::{Log, TAIL};
use manifest::{Manifests, match_labels, selects};
use net::{Network, PodNet};
use pod::{PodContext, PodPlan, Probe, ProbeAction};
use serde_json::{Map, Value};
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Child,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// How often the controller looks at its pods.
const TICK: Duration = Duration::from_millis(50);

/// The Job controller's first delay before replacing a failed pod, doubled after each
/// counted failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(360);

/// Where the lab keeps its directories: outside `/tmp`, which pods mount over, and
/// traversable by the pods' non-root users.
const LAB_ROOT: &str = "/var/tmp";

/// What the lab is started with.
#[derive(Debug, Clone, Default)]
pub struct LabOptions {
    /// ConfigMap values to change, `(configmap, key, value)`, as an overlay would.
    pub config: Vec<(String, String, String)>,
    /// Environment set on every container of a Job, `(job, key, value)`, as a patch would
    /// (`RUST_LOG`, to follow steps in the coordinator's log).
    pub env: Vec<(String, String, String)>,
    /// Values to set in objects, `(kind, name, JSON pointer, value)`, as a kustomize patch
    /// would (a Job's `/spec/completions`, say).
    pub patches: Vec<(String, String, String, Value)>,
    /// Files to put into a PersistentVolumeClaim before anything runs, `(claim, path in the
    /// claim, file)`: hard links (or copies) of the files, as a pre-populated volume.
    pub seed: Vec<(String, PathBuf, PathBuf)>,
}

/// The state of a Job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    Running,
    Complete,
    Failed(String),
}

/// A pod as the tests see it.
#[derive(Debug, Clone)]
pub struct PodRef {
    pub name: String,
    pub job: String,
    pub index: Option<u32>,
    pub pid: u32,
    pub ip: Ipv4Addr,
    pub log: Log,
    pub started: Instant,
    /// The container's exit code as Kubernetes reports it (128 + signal when killed), once
    /// it has exited.
    pub exit_code: Option<i32>,
    /// When it exited.
    pub exited: Option<Instant>,
    /// Killed because its liveness probe failed.
    pub killed_by_liveness: bool,
}

/// One recorded action of the controller or kubelet, for the test's output.
#[derive(Debug, Clone)]
pub struct LabEvent {
    pub at: Instant,
    pub text: String,
}

/// A running lab; dropping it kills every pod and removes the namespaces.
pub struct Lab {
    inner: Arc<Inner>,
    controller: Option<JoinHandle<()>>,
}

struct Inner {
    manifests: Manifests,
    net: Network,
    root: PathBuf,
    image_root: PathBuf,
    claims: BTreeMap<String, PathBuf>,
    namespace: String,
    namespace_labels: Map<String, Value>,
    services: Vec<Service>,
    options: LabOptions,
    started: Instant,
    stopping: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Clone)]
struct Service {
    name: String,
    ip: Ipv4Addr,
    selector: Vec<(String, String)>,
}

#[derive(Default)]
struct State {
    jobs: Vec<JobState>,
    pods: Vec<PodState>,
    events: Vec<LabEvent>,
    next_suffix: u64,
    /// Per Service, the pod whose namespace holds its address now.
    backends: BTreeMap<String, String>,
}

struct JobState {
    name: String,
    spec: Value,
    indexed: bool,
    completions: u32,
    parallelism: u32,
    /// Counted failures: the whole Job's, and each index's.
    failures: u32,
    index_failures: BTreeMap<u32, u32>,
    succeeded: BTreeSet<u32>,
    failed_indexes: BTreeSet<u32>,
    succeeded_pods: u32,
    outcome: JobOutcome,
    /// Pods to create: `(index, not before)`.
    pending: Vec<(Option<u32>, Instant)>,
}

struct PodState {
    pod: PodRef,
    plan: PodPlan,
    net: PodNet,
    child: Option<Child>,
    /// Marked for deletion: SIGTERM sent, SIGKILL at the deadline. `disruption` gives the
    /// pod the `DisruptionTarget` condition (an eviction or drain).
    deleting: Option<Instant>,
    disruption: bool,
    /// Removed by the controller (scale-down, a finished Job): its exit decides nothing.
    removed: bool,
    cut: bool,
    /// The kubelet's view: ready (readiness probe passed) and the probe thread.
    ready: Arc<AtomicBool>,
    kubelet_stop: Arc<AtomicBool>,
    liveness_killed: Arc<AtomicBool>,
}

impl PodState {
    /// The pod as the tests see it now.
    fn view(&self) -> PodRef {
        PodRef {
            killed_by_liveness: self.liveness_killed.load(Ordering::Relaxed),
            ..self.pod.clone()
        }
    }
}

impl Lab {
    /// Renders `overlay` (a directory of `deploy/overlays/`), generates the Secrets, creates
    /// the namespace-level objects (Services, claims) and waits for Jobs to be created with
    /// [`Lab::create_job`]. `None` where this process cannot make network namespaces (not
    /// root), after saying so.
    pub fn start(repo: &Path, overlay: &str, options: LabOptions) -> Option<Lab> {
        let Some(net) = Network::create() else {
            eprintln!(
                "the Kubernetes lab needs root (network namespaces, mounts) and iptables: not run"
            );
            return None;
        };
        let mut manifests = Manifests::render(&repo.join("deploy/overlays").join(overlay)).with(
            Manifests::generate_secrets(&repo.join("deploy/generate-secrets.sh")),
        );
        for (map, key, value) in &options.config {
            let object = manifests.get_mut("ConfigMap", map);
            object["data"][key.as_str()] = Value::String(value.clone());
        }
        for (kind, name, pointer, value) in &options.patches {
            let object = manifests.get_mut(kind, name);
            *object
                .pointer_mut(pointer)
                .unwrap_or_else(|| panic!("{kind} {name} has no {pointer}")) = value.clone();
        }
        let namespace = manifests
            .of_kind("Namespace")
            .next()
            .and_then(|ns| ns["metadata"]["name"].as_str())
            .unwrap_or("default")
            .to_string();
        let mut namespace_labels = manifests
            .of_kind("Namespace")
            .next()
            .and_then(|ns| ns["metadata"]["labels"].as_object().cloned())
            .unwrap_or_default();
        namespace_labels.insert(
            "kubernetes.io/metadata.name".into(),
            Value::String(namespace.clone()),
        );

        let root =
            PathBuf::from(LAB_ROOT).join(format!("lockstep-lab-{}-{}", std::process::id(), net.n));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).expect("lab directory");
        set_mode(&root, 0o755);
        let image_root = root.join("image");
        let bin = image_root.join("usr/local/bin");
        fs::create_dir_all(&bin).expect("image directory");
        for dir in [
            &image_root,
            &image_root.join("usr"),
            &image_root.join("usr/local"),
            &bin,
        ] {
            set_mode(dir, 0o755);
        }
        for program in ["coordinator", "worker"] {
            link_or_copy(&crate::binaries::binary(program), &bin.join(program));
        }

        let mut claims = BTreeMap::new();
        for claim in manifests.of_kind("PersistentVolumeClaim") {
            let name = claim["metadata"]["name"].as_str().expect("claim name");
            let dir = root.join("claims").join(name);
            fs::create_dir_all(&dir).expect("claim directory");
            set_mode(&root.join("claims"), 0o755);
            claims.insert(name.to_string(), dir);
        }
        for (claim, path, file) in &options.seed {
            let dir = claims
                .get(claim)
                .unwrap_or_else(|| panic!("no claim {claim} to seed"));
            let target = dir.join(path);
            fs::create_dir_all(target.parent().expect("a file in the claim")).expect("seed dir");
            link_or_copy(file, &target);
        }
        let services = manifests
            .of_kind("Service")
            .map(|service| {
                for port in service["spec"]["ports"].as_array().into_iter().flatten() {
                    let target = &port["targetPort"];
                    assert!(
                        target.is_null() || target.is_string() || *target == port["port"],
                        "the lab maps a Service port to the same container port only: {port}"
                    );
                }
                Service {
                    name: service["metadata"]["name"]
                        .as_str()
                        .expect("name")
                        .to_string(),
                    ip: net.service_ip(),
                    selector: match_labels(&service["spec"]["selector"]),
                }
            })
            .collect();
        let inner = Arc::new(Inner {
            manifests,
            net,
            root,
            image_root,
            claims,
            namespace,
            namespace_labels,
            services,
            options,
            started: Instant::now(),
            stopping: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let controller = {
            let inner = Arc::clone(&inner);
            thread::spawn(move || inner.control())
        };
        Some(Lab {
            inner,
            controller: Some(controller),
        })
    }

    /// The manifests the lab runs (rendered, Secrets included, ConfigMaps changed as asked).
    pub fn manifests(&self) -> &Manifests {
        &self.inner.manifests
    }

    /// Creates Job `name`: its first pods start at once.
    pub fn create_job(&self, name: &str) {
        let spec = self.inner.manifests.get("Job", name).clone();
        let indexed = spec["spec"]["completionMode"] == "Indexed";
        let completions = spec["spec"]["completions"].as_u64().unwrap_or(1) as u32;
        let parallelism = spec["spec"]["parallelism"].as_u64().unwrap_or(1) as u32;
        let now = Instant::now();
        let pending = if indexed {
            (0..completions.min(parallelism))
                .map(|i| (Some(i), now))
                .collect()
        } else {
            (0..parallelism.min(completions))
                .map(|_| (None, now))
                .collect()
        };
        let mut state = self.inner.lock();
        state.jobs.push(JobState {
            name: name.to_string(),
            spec,
            indexed,
            completions,
            parallelism,
            failures: 0,
            index_failures: BTreeMap::new(),
            succeeded: BTreeSet::new(),
            failed_indexes: BTreeSet::new(),
            succeeded_pods: 0,
            outcome: JobOutcome::Running,
            pending,
        });
        self.inner.event(&mut state, format!("job {name} created"));
    }

    /// Waits up to `timeout` for Job `name` to complete or fail.
    pub fn wait_for_job(&self, name: &str, timeout: Duration) -> JobOutcome {
        let deadline = Instant::now() + timeout;
        let mut state = self.inner.lock();
        loop {
            let outcome = state
                .jobs
                .iter()
                .find(|j| j.name == name)
                .map(|j| j.outcome.clone())
                .unwrap_or_else(|| panic!("no job {name}"));
            if outcome != JobOutcome::Running {
                return outcome;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(state);
                self.dump();
                panic!(
                    "job {name} still running after {:.0} s",
                    timeout.as_secs_f64()
                );
            }
            state = self
                .inner
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The running pods of Job `name`, by index (then age).
    pub fn pods(&self, job: &str) -> Vec<PodRef> {
        let state = self.inner.lock();
        let mut pods: Vec<PodRef> = state
            .pods
            .iter()
            .filter(|p| p.pod.job == job && p.pod.exit_code.is_none())
            .map(PodState::view)
            .collect();
        pods.sort_by_key(|p| (p.index, p.started));
        pods
    }

    /// Every pod Job `name` has had, in the order they were created.
    pub fn pod_history(&self, job: &str) -> Vec<PodRef> {
        let state = self.inner.lock();
        state
            .pods
            .iter()
            .filter(|p| p.pod.job == job)
            .map(PodState::view)
            .collect()
    }

    /// Waits up to `timeout` for a running pod of `job` (at `index`, if given) other than
    /// those in `not`: the replacement the controller makes.
    pub fn wait_for_pod(
        &self,
        job: &str,
        index: Option<u32>,
        not: &[&PodRef],
        timeout: Duration,
    ) -> PodRef {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pod) = self.pods(job).into_iter().find(|p| {
                (index.is_none() || p.index == index) && not.iter().all(|n| n.name != p.name)
            }) {
                return pod;
            }
            if Instant::now() >= deadline {
                self.dump();
                panic!(
                    "no new pod of {job} (index {index:?}) after {:.0} s",
                    timeout.as_secs_f64()
                );
            }
            thread::sleep(TICK);
        }
    }

    /// Sends `signal` to the pod's process, as a crash or the kernel's OOM killer would.
    pub fn signal(&self, pod: &PodRef, signal: i32) {
        let state = self.inner.lock();
        let alive = state
            .pods
            .iter()
            .any(|p| p.pod.name == pod.name && p.pod.exit_code.is_none());
        assert!(alive, "pod {} has exited", pod.name);
        // SAFETY: kill has no memory effects; under the lock the controller cannot reap the
        // process, so the pid is still the pod's.
        let rc = unsafe { libc::kill(pod.pid as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill {} {signal}", pod.pid);
        drop(state);
        self.inner
            .event_now(format!("signal {signal} sent to pod {}", pod.name));
    }

    /// Deletes the pod as `kubectl delete pod` does (`disruption`: as an eviction or a node
    /// drain does, which gives it the `DisruptionTarget` condition): SIGTERM, and SIGKILL
    /// after its grace period. The Job replaces it as its failure policy says.
    pub fn delete_pod(&self, pod: &PodRef, disruption: bool) {
        let mut state = self.inner.lock();
        let entry = state
            .pods
            .iter_mut()
            .find(|p| p.pod.name == pod.name)
            .expect("a pod of the lab");
        entry.disruption = disruption;
        Inner::terminate(entry);
        let what = if disruption { "evicted" } else { "deleted" };
        self.inner
            .event(&mut state, format!("pod {} {what}", pod.name));
    }

    /// Cuts the pod off the network (every packet in and out dropped), or joins it again.
    pub fn set_cut(&self, pod: &PodRef, cut: bool) {
        let mut state = self.inner.lock();
        if let Some(entry) = state.pods.iter_mut().find(|p| p.pod.name == pod.name) {
            entry.cut = cut;
        }
        self.inner.apply_policies(&state);
        let what = if cut {
            "cut off the network"
        } else {
            "back on the network"
        };
        self.inner
            .event(&mut state, format!("pod {} {what}", pod.name));
    }

    /// Changes an Indexed Job's completions and parallelism together, as `kubectl patch`
    /// does to an elastic Indexed Job: new indexes get pods, removed ones lose theirs.
    pub fn scale(&self, job: &str, count: u32) {
        let mut state = self.inner.lock();
        let State { jobs, pods, .. } = &mut *state;
        let job_state = jobs.iter_mut().find(|j| j.name == job).expect("a job");
        assert!(job_state.indexed, "only Indexed Jobs are elastic");
        let before = job_state.completions;
        job_state.completions = count;
        job_state.parallelism = count;
        let now = Instant::now();
        for index in before..count {
            job_state.pending.push((Some(index), now));
        }
        job_state
            .pending
            .retain(|(i, _)| i.is_none_or(|i| i < count));
        job_state.succeeded.retain(|&i| i < count);
        for pod in pods.iter_mut().filter(|p| {
            p.pod.job == job && p.pod.exit_code.is_none() && p.pod.index.is_some_and(|i| i >= count)
        }) {
            pod.removed = true;
            Inner::terminate(pod);
        }
        self.inner.event(
            &mut state,
            format!("job {job} scaled from {before} to {count}"),
        );
    }

    /// Runs the pod's `kind` probe (`startup`, `readiness`, `liveness`) once, as the kubelet
    /// calls it: `Ok` when it passes, else why not.
    pub fn probe(&self, pod: &PodRef, kind: &str) -> Result<(), String> {
        let probe = {
            let state = self.inner.lock();
            let entry = state
                .pods
                .iter()
                .find(|p| p.pod.name == pod.name)
                .expect("a pod of the lab");
            match kind {
                "startup" => entry.plan.startup.clone(),
                "readiness" => entry.plan.readiness.clone(),
                "liveness" => entry.plan.liveness.clone(),
                other => panic!("no {other} probe"),
            }
        };
        let probe = probe.unwrap_or_else(|| panic!("pod {} declares no {kind} probe", pod.name));
        run_probe(&probe, pod.ip)
    }

    /// Whether the kubelet counts the pod ready (its readiness probe passes).
    pub fn is_ready(&self, pod: &PodRef) -> bool {
        let state = self.inner.lock();
        state
            .pods
            .iter()
            .find(|p| p.pod.name == pod.name)
            .is_some_and(|p| p.ready.load(Ordering::Relaxed))
    }

    /// The directory of claim `name`.
    pub fn claim_dir(&self, name: &str) -> PathBuf {
        self.inner.claims[name].clone()
    }

    /// The address of Service `name`.
    pub fn service_ip(&self, name: &str) -> Ipv4Addr {
        self.inner
            .services
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no Service {name}"))
            .ip
    }

    /// The node's address, where probes and port-forwards come from.
    pub fn node_ip(&self) -> Ipv4Addr {
        self.inner.net.node_ip()
    }

    /// What the controller and kubelet did, with the time since the lab started.
    pub fn events(&self) -> Vec<String> {
        let state = self.inner.lock();
        state
            .events
            .iter()
            .map(|e| {
                format!(
                    "{:7.2} s  {}",
                    (e.at - self.inner.started).as_secs_f64(),
                    e.text
                )
            })
            .collect()
    }

    /// Prints the lab's events and the end of every pod's log.
    pub fn dump(&self) {
        eprintln!("===== lab events:\n{}", self.events().join("\n"));
        let state = self.inner.lock();
        for pod in &state.pods {
            eprintln!(
                "===== pod {} (pid {}, exit {:?}), last {TAIL} lines:\n{}",
                pod.pod.name,
                pod.pod.pid,
                pod.pod.exit_code,
                pod.pod.log.tail(TAIL)
            );
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if thread::panicking() {
            self.dump();
        }
        self.inner.stopping.store(true, Ordering::Relaxed);
        if let Some(controller) = self.controller.take() {
            let _ = controller.join();
        }
        let mut state = self.inner.lock();
        for pod in &mut state.pods {
            pod.kubelet_stop.store(true, Ordering::Relaxed);
            if let Some(mut child) = pod.child.take() {
                // SAFETY: our own unreaped child.
                unsafe {
                    libc::kill(child.id() as libc::pid_t, libc::SIGCONT);
                    libc::kill(child.id() as libc::pid_t, libc::SIGKILL);
                }
                let _ = child.wait();
            }
            self.inner.net.remove_pod(&pod.net);
        }
        drop(state);
        let _ = fs::remove_dir_all(&self.inner.root);
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn event(&self, state: &mut State, text: String) {
        state.events.push(LabEvent {
            at: Instant::now(),
            text,
        });
        self.changed.notify_all();
    }

    fn event_now(&self, text: String) {
        let mut state = self.lock();
        self.event(&mut state, text);
    }

    /// The controller's loop: reaps pods, applies the Jobs' policies, makes pods.
    fn control(self: Arc<Self>) {
        while !self.stopping.load(Ordering::Relaxed) {
            let mut state = self.lock();
            let mut changed = false;
            // Exits.
            let mut exits = Vec::new();
            for (i, pod) in state.pods.iter_mut().enumerate() {
                let Some(child) = pod.child.as_mut() else {
                    continue;
                };
                if let Some(deadline) = pod.deleting
                    && Instant::now() >= deadline
                {
                    // SAFETY: our own unreaped child.
                    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
                    pod.deleting = None;
                }
                if let Ok(Some(status)) = child.try_wait() {
                    use std::os::unix::process::ExitStatusExt;
                    let code = status
                        .code()
                        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
                    pod.pod.exit_code = Some(code);
                    pod.pod.exited = Some(Instant::now());
                    pod.child = None;
                    pod.kubelet_stop.store(true, Ordering::Relaxed);
                    exits.push(i);
                }
            }
            for i in exits {
                changed = true;
                self.on_exit(&mut state, i);
            }
            // Pods to make.
            let now = Instant::now();
            let mut to_start = Vec::new();
            for job in &mut state.jobs {
                if job.outcome != JobOutcome::Running {
                    job.pending.clear();
                    continue;
                }
                let (due, later): (Vec<_>, Vec<_>) =
                    job.pending.drain(..).partition(|(_, at)| *at <= now);
                job.pending = later;
                to_start.extend(due.into_iter().map(|(index, _)| (job.name.clone(), index)));
            }
            for (job, index) in to_start {
                changed = true;
                self.start_pod(&mut state, &job, index);
            }
            if changed {
                self.move_services(&mut state);
                self.apply_policies(&state);
                self.changed.notify_all();
            }
            drop(state);
            thread::sleep(TICK);
        }
    }

    /// What the Job makes of pod `i`'s exit.
    fn on_exit(&self, state: &mut State, i: usize) {
        let pod = &state.pods[i];
        let (name, job_name, index, code) = (
            pod.pod.name.clone(),
            pod.pod.job.clone(),
            pod.pod.index,
            pod.pod.exit_code.expect("exited"),
        );
        let disruption = pod.disruption;
        let container = pod.plan.container.clone();
        self.net.remove_pod(&state.pods[i].net);
        if pod.removed {
            self.event(
                state,
                format!("pod {name} exited {code} (removed by the controller)"),
            );
            return;
        }
        let Some(job) = state.jobs.iter_mut().find(|j| j.name == job_name) else {
            return;
        };
        if job.outcome != JobOutcome::Running {
            let text = format!("pod {name} exited {code} after job {job_name} ended");
            self.event(state, text);
            return;
        }
        let mut notes = Vec::new();
        if code == 0 {
            job.succeeded_pods += 1;
            if let Some(index) = index {
                job.succeeded.insert(index);
            }
            notes.push("succeeded".to_string());
            if job_succeeded(job) {
                job.outcome = JobOutcome::Complete;
                notes.push(format!("job {job_name} complete"));
            }
        } else {
            let action = failure_action(&job.spec, &container, code, disruption);
            notes.push(format!("failed; podFailurePolicy: {action}"));
            match action.as_str() {
                "FailJob" => {
                    job.outcome = JobOutcome::Failed(format!("pod {name} exited {code}: FailJob"));
                }
                "Ignore" => job.pending.push((index, Instant::now())),
                "FailIndex" => {
                    job.failed_indexes
                        .insert(index.expect("FailIndex in an Indexed Job"));
                }
                _ => {
                    let per_index = job.spec["spec"]["backoffLimitPerIndex"].as_u64();
                    let failures = match (per_index, index) {
                        (Some(_), Some(index)) => {
                            let n = job.index_failures.entry(index).or_default();
                            *n += 1;
                            *n
                        }
                        _ => {
                            job.failures += 1;
                            job.failures
                        }
                    };
                    let limit = per_index
                        .or_else(|| job.spec["spec"]["backoffLimit"].as_u64())
                        .unwrap_or(6) as u32;
                    if failures > limit {
                        match (per_index, index) {
                            (Some(_), Some(index)) => {
                                job.failed_indexes.insert(index);
                                notes.push(format!("index {index} failed ({failures} failures)"));
                            }
                            _ => {
                                job.outcome = JobOutcome::Failed(format!(
                                    "{failures} failures, more than backoffLimit {limit}"
                                ));
                            }
                        }
                    } else {
                        let delay = (FIRST_BACKOFF * 2u32.pow(failures - 1)).min(MAX_BACKOFF);
                        notes.push(format!(
                            "counted ({failures} of {limit}); replaced in {:.0} s",
                            delay.as_secs_f64()
                        ));
                        job.pending.push((index, Instant::now() + delay));
                    }
                }
            }
            if job.outcome == JobOutcome::Running
                && job.indexed
                && (0..job.completions)
                    .all(|i| job.succeeded.contains(&i) || job.failed_indexes.contains(&i))
                && !job.failed_indexes.is_empty()
            {
                job.outcome =
                    JobOutcome::Failed(format!("indexes {:?} failed", job.failed_indexes));
            }
        }
        let finished = job.outcome != JobOutcome::Running;
        if let JobOutcome::Failed(why) = &job.outcome {
            notes.push(format!("job {job_name} failed: {why}"));
        }
        self.event(
            state,
            format!("pod {name} exited {code}: {}", notes.join("; ")),
        );
        if finished {
            // The Job winds up its other pods.
            for pod in state
                .pods
                .iter_mut()
                .filter(|p| p.pod.job == job_name && p.child.is_some())
            {
                pod.removed = true;
                Inner::terminate(pod);
            }
        }
    }

    /// SIGTERM now, SIGKILL after the pod's grace period.
    fn terminate(pod: &mut PodState) {
        if let Some(child) = &pod.child
            && pod.deleting.is_none()
        {
            // SAFETY: our own unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            pod.deleting = Some(Instant::now() + Duration::from_secs_f64(pod.plan.grace_seconds));
        }
    }

    /// Makes one pod of Job `job_name`.
    fn start_pod(&self, state: &mut State, job_name: &str, index: Option<u32>) {
        state.next_suffix += 1;
        let suffix = format!("{:05x}", (state.next_suffix * 0x9e37) & 0xfffff);
        let job = state
            .jobs
            .iter()
            .find(|j| j.name == job_name)
            .expect("a job");
        let name = match index {
            Some(i) => format!("{job_name}-{i}-{suffix}"),
            None => format!("{job_name}-{suffix}"),
        };
        let template = &job.spec["spec"]["template"];
        let mut extra_labels = vec![
            (
                "batch.kubernetes.io/job-name".to_string(),
                job_name.to_string(),
            ),
            ("job-name".to_string(), job_name.to_string()),
        ];
        let mut annotations = Vec::new();
        let mut extra_env = Vec::new();
        if let Some(i) = index {
            extra_labels.push((
                "batch.kubernetes.io/job-completion-index".into(),
                i.to_string(),
            ));
            annotations.push((
                "batch.kubernetes.io/job-completion-index".into(),
                i.to_string(),
            ));
            extra_env.push(("JOB_COMPLETION_INDEX".into(), i.to_string()));
        }
        let env_overrides: Vec<(String, String)> = self
            .options
            .env
            .iter()
            .filter(|(job, _, _)| job == job_name)
            .map(|(_, k, v)| (k.clone(), v.clone()))
            .collect();
        let net = self.net.add_pod();
        let plan = PodPlan::new(
            template,
            &PodContext {
                manifests: &self.manifests,
                name: name.clone(),
                namespace: &self.namespace,
                extra_labels,
                annotations,
                extra_env,
                claims: &self.claims,
                image_root: &self.image_root,
                dir: self.root.join("pods").join(&name),
                ip: net.ip,
                env_overrides: &env_overrides,
                node_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            },
        );
        set_mode(&self.root.join("pods"), 0o755);
        set_mode(&plan.dir, 0o755);
        let services: Vec<(String, Ipv4Addr)> = self
            .services
            .iter()
            .map(|s| (s.name.clone(), s.ip))
            .collect();
        plan.write_hosts(&net, &services, &self.namespace);
        // The policies must hold before the process sends its first packet.
        let mut pending_view = self.pod_views(state);
        pending_view.push(policy::PodView {
            labels: plan.labels.clone(),
            addresses: vec![net.ip],
            ports: plan.ports.clone(),
            cut: false,
        });
        let policies: Vec<&Value> = self.manifests.of_kind("NetworkPolicy").collect();
        let own = pending_view.last().expect("just pushed").clone();
        self.net.set_rules(
            &net,
            &policy::rules(
                &policies,
                &own,
                &pending_view,
                &self.namespace_labels,
                self.net.node_ip(),
            ),
        );
        let (child, log) = plan.spawn(&net);
        let ready = Arc::new(AtomicBool::new(false));
        let kubelet_stop = Arc::new(AtomicBool::new(false));
        let pod = PodRef {
            name: name.clone(),
            job: job_name.to_string(),
            index,
            pid: child.id(),
            ip: net.ip,
            log,
            started: Instant::now(),
            exit_code: None,
            exited: None,
            killed_by_liveness: false,
        };
        let liveness_killed = Arc::new(AtomicBool::new(false));
        spawn_kubelet(
            pod.clone(),
            plan.clone(),
            Kubelet {
                ready: Arc::clone(&ready),
                stop: Arc::clone(&kubelet_stop),
                killed: Arc::clone(&liveness_killed),
            },
        );
        state.pods.push(PodState {
            pod,
            plan,
            net,
            child: Some(child),
            deleting: None,
            disruption: false,
            removed: false,
            cut: false,
            ready,
            kubelet_stop,
            liveness_killed,
        });
        let text = format!(
            "pod {name} started{}",
            index.map_or(String::new(), |i| format!(" (index {i})"))
        );
        self.event(state, text);
    }

    /// Gives every Service's address to the newest running pod it selects, when the pod
    /// that held it is gone.
    fn move_services(&self, state: &mut State) {
        for service in &self.services {
            let held = state.backends.get(&service.name).is_some_and(|name| {
                state
                    .pods
                    .iter()
                    .any(|p| p.pod.name == *name && p.child.is_some())
            });
            if held {
                continue;
            }
            let Some(backend) = state
                .pods
                .iter()
                .filter(|p| p.child.is_some() && selects(&service.selector, &p.plan.labels))
                .max_by_key(|p| p.pod.started)
            else {
                continue;
            };
            let (pod, net) = (backend.pod.name.clone(), backend.net.clone());
            self.net.add_address(&net, service.ip);
            state.backends.insert(service.name.clone(), pod.clone());
            self.event(state, format!("service {} now at pod {pod}", service.name));
        }
    }

    fn pod_views(&self, state: &State) -> Vec<policy::PodView> {
        state
            .pods
            .iter()
            .filter(|p| p.child.is_some())
            .map(|p| {
                let mut addresses = vec![p.net.ip];
                for service in &self.services {
                    if state.backends.get(&service.name) == Some(&p.pod.name) {
                        addresses.push(service.ip);
                    }
                }
                policy::PodView {
                    labels: p.plan.labels.clone(),
                    addresses,
                    ports: p.plan.ports.clone(),
                    cut: p.cut,
                }
            })
            .collect()
    }

    /// Rewrites every running pod's packet filter for the pods there are now.
    fn apply_policies(&self, state: &State) {
        let views = self.pod_views(state);
        let policies: Vec<&Value> = self.manifests.of_kind("NetworkPolicy").collect();
        let running = state.pods.iter().filter(|p| p.child.is_some());
        for (pod, view) in running.zip(&views) {
            self.net.set_rules(
                &pod.net,
                &policy::rules(
                    &policies,
                    view,
                    &views,
                    &self.namespace_labels,
                    self.net.node_ip(),
                ),
            );
        }
    }
}

/// What the kubelet's thread for a pod shares with the controller.
struct Kubelet {
    /// Whether the readiness probe passes.
    ready: Arc<AtomicBool>,
    /// Set when the pod is gone.
    stop: Arc<AtomicBool>,
    /// Set when the kubelet killed the container for failing its probe.
    killed: Arc<AtomicBool>,
}

/// The kubelet's probes of one pod, on a thread of their own until the pod is gone: the
/// startup probe until it passes, then readiness and liveness, each on its own period. A
/// liveness (or startup) probe that fails `failureThreshold` times in a row kills the
/// container: SIGTERM, then SIGKILL after the grace period.
fn spawn_kubelet(pod: PodRef, plan: PodPlan, kubelet: Kubelet) {
    thread::spawn(move || {
        let Kubelet {
            ready,
            stop,
            killed,
        } = kubelet;
        let begun = Instant::now();
        let mut started = plan.startup.is_none();
        let mut next: BTreeMap<&str, Instant> = BTreeMap::new();
        let mut failures: BTreeMap<&str, u32> = BTreeMap::new();
        let probes: Vec<(&str, &Probe)> = [
            ("startup", plan.startup.as_ref()),
            ("readiness", plan.readiness.as_ref()),
            ("liveness", plan.liveness.as_ref()),
        ]
        .into_iter()
        .filter_map(|(k, p)| p.map(|p| (k, p)))
        .collect();
        for (kind, probe) in &probes {
            next.insert(
                kind,
                begun + Duration::from_secs_f64(probe.initial_delay_seconds),
            );
        }
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            for (kind, probe) in &probes {
                let active = if *kind == "startup" {
                    !started
                } else {
                    started
                };
                if !active || now < next[kind] {
                    continue;
                }
                next.insert(kind, now + Duration::from_secs_f64(probe.period_seconds));
                let passed = run_probe(probe, pod.ip).is_ok();
                let count = failures.entry(kind).or_default();
                *count = if passed { 0 } else { *count + 1 };
                match *kind {
                    "startup" if passed => started = true,
                    "readiness" => ready.store(
                        passed || *count < probe.failure_threshold,
                        Ordering::Relaxed,
                    ),
                    _ => {}
                }
                if (*kind == "liveness" || *kind == "startup") && *count >= probe.failure_threshold
                {
                    eprintln!(
                        "kubelet: {} probe of {} failed {count} times: killing the container",
                        kind, pod.name
                    );
                    killed.store(true, Ordering::Relaxed);
                    // SAFETY: signals to the pod's process, which only the controller reaps
                    // (after setting `stop`).
                    unsafe { libc::kill(pod.pid as libc::pid_t, libc::SIGCONT) };
                    unsafe { libc::kill(pod.pid as libc::pid_t, libc::SIGTERM) };
                    let deadline = Instant::now() + Duration::from_secs_f64(plan.grace_seconds);
                    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                        thread::sleep(TICK);
                    }
                    if !stop.load(Ordering::Relaxed) {
                        // SAFETY: as above.
                        unsafe { libc::kill(pod.pid as libc::pid_t, libc::SIGKILL) };
                    }
                    return;
                }
            }
            thread::sleep(Duration::from_millis(100));
        }
    });
}

/// One probe call from the node, as the kubelet makes it.
pub fn run_probe(probe: &Probe, ip: Ipv4Addr) -> Result<(), String> {
    let timeout = Duration::from_secs_f64(probe.timeout_seconds);
    match &probe.action {
        ProbeAction::Grpc { port, service } => {
            grpc_health(SocketAddr::new(ip.into(), *port), service, timeout)
        }
        ProbeAction::Tcp { port } => {
            std::net::TcpStream::connect_timeout(&SocketAddr::new(ip.into(), *port), timeout)
                .map(drop)
                .map_err(|e| e.to_string())
        }
        ProbeAction::Http { port, path } => {
            http_get(SocketAddr::new(ip.into(), *port), path, timeout)
        }
    }
}

/// `grpc.health.v1.Health/Check` for `service`, in plaintext: SERVING passes.
pub fn grpc_health(addr: SocketAddr, service: &str, timeout: Duration) -> Result<(), String> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the probe");
    runtime.block_on(async {
        let call = async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| e.to_string())?
                .connect_timeout(timeout)
                .connect()
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let reply = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: service.to_string(),
                })
                .await
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
            let status = reply.into_inner().status;
            if status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                Ok(())
            } else {
                Err(format!("status {status} (not SERVING)"))
            }
        };
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
    })
}

/// A plain HTTP/1.0 GET: a status from 200 to 399 passes.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).map_err(|e| e.to_string())?;
    let status: u16 = std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("not an HTTP answer")?;
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

/// What a Job's `podFailurePolicy` does with a pod that failed with `code`: the action of the
/// first matching rule, else `Count`.
pub fn failure_action(job: &Value, container: &str, code: i32, disruption: bool) -> String {
    for rule in job["spec"]["podFailurePolicy"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let action = rule["action"]
            .as_str()
            .expect("a rule's action")
            .to_string();
        if let Some(codes) = rule.get("onExitCodes") {
            if codes["containerName"]
                .as_str()
                .is_some_and(|c| c != container)
            {
                continue;
            }
            let values: Vec<i64> = codes["values"]
                .as_array()
                .expect("values")
                .iter()
                .filter_map(Value::as_i64)
                .collect();
            let listed = values.contains(&i64::from(code));
            let matches = match codes["operator"].as_str() {
                Some("In") => listed,
                Some("NotIn") => !listed && code != 0,
                other => panic!("onExitCodes operator {other:?}"),
            };
            if matches {
                return action;
            }
        }
        if let Some(conditions) = rule["onPodConditions"].as_array()
            && conditions.iter().any(|c| {
                c["type"] == "DisruptionTarget" && c["status"].as_str().unwrap_or("True") == "True"
            })
            && disruption
        {
            return action;
        }
    }
    "Count".into()
}

/// Whether a Job has succeeded: its `successPolicy`, else every index (or `completions`
/// pods) succeeded.
fn job_succeeded(job: &JobState) -> bool {
    if let Some(rules) = job.spec["spec"]["successPolicy"]["rules"].as_array() {
        return rules.iter().any(|rule| {
            let count = rule["succeededCount"].as_u64().map(|n| n as usize);
            assert!(
                rule.get("succeededIndexes").is_none(),
                "successPolicy.succeededIndexes is not supported by the lab"
            );
            count.is_some_and(|n| job.succeeded.len() >= n)
        });
    }
    if job.indexed {
        (0..job.completions).all(|i| job.succeeded.contains(&i))
    } else {
        job.succeeded_pods >= job.completions
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A hard link of `from` at `to`, or a copy where no link can be made.
fn link_or_copy(from: &Path, to: &Path) {
    let _ = fs::remove_file(to);
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
    }
}
