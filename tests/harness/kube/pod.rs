//! One pod of a pod template as a real process: its container's command from the lab's image
//! directory, its environment resolved as the kubelet resolves it (ConfigMaps, Secrets, the
//! downward API, `$(VAR)`), its volumes as directories, in a network namespace of its own, a
//! mount namespace with a private `/dev/shm` of the declared size and a read-only root, its
//! own host name, as the user and group its security context names.
//!
//! Volumes are directories of the lab. A mount path that exists on the machine (`/tmp`,
//! `/dev/shm`) is mounted over for real inside the pod's mount namespace; any other (the
//! image's own `/data`, `/etc/lockstep/...`) is written into the pod's arguments and
//! environment as the directory that stands for it, since the lab has no image root to mount
//! into.

use super::manifest::Manifests;
use super::net::PodNet;
use crate::log::Log;
use serde_json::{Map, Value};
use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt, fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

/// The size of `/dev/shm` in a container that declares none (Docker's and containerd's).
const DEFAULT_SHM_BYTES: u64 = 64 << 20;

/// A probe as the pod declares it.
#[derive(Debug, Clone)]
pub struct Probe {
    pub action: ProbeAction,
    pub initial_delay_seconds: f64,
    pub period_seconds: f64,
    pub timeout_seconds: f64,
    pub failure_threshold: u32,
}

/// What a probe does.
#[derive(Debug, Clone)]
pub enum ProbeAction {
    Grpc { port: u16, service: String },
    Tcp { port: u16 },
    Http { port: u16, path: String },
}

/// Everything needed to start a pod, resolved from its template.
#[derive(Debug, Clone)]
pub struct PodPlan {
    pub name: String,
    pub labels: Map<String, Value>,
    pub container: String,
    /// The program on this machine and its arguments.
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `(name, number, protocol)` of the container's ports.
    pub ports: Vec<(String, u16, String)>,
    pub startup: Option<Probe>,
    pub readiness: Option<Probe>,
    pub liveness: Option<Probe>,
    pub grace_seconds: f64,
    pub uid: u32,
    pub gid: u32,
    pub fs_group: u32,
    /// Host directories mounted over existing paths, `(dir, mount path)`.
    real_mounts: Vec<(PathBuf, PathBuf)>,
    /// Host directories that stand for a mount path: written into args and env.
    rewritten: Vec<(PathBuf, String)>,
    shm_bytes: u64,
    /// The pod's own files: volumes, /etc/hosts.
    pub dir: PathBuf,
}

/// What a pod template is started with, besides the manifests.
pub struct PodContext<'a> {
    pub manifests: &'a Manifests,
    pub name: String,
    pub namespace: &'a str,
    /// Labels and annotations the Job controller adds.
    pub extra_labels: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
    /// Extra environment the controller sets (`JOB_COMPLETION_INDEX`).
    pub extra_env: Vec<(String, String)>,
    /// Where `persistentVolumeClaim` volumes live, by claim name.
    pub claims: &'a BTreeMap<String, PathBuf>,
    /// The image's root: `/usr/local/bin/coordinator` is `image_root/usr/local/bin/coordinator`.
    pub image_root: &'a Path,
    pub dir: PathBuf,
    pub ip: std::net::Ipv4Addr,
    /// Environment the test sets on top (e.g. `RUST_LOG`), as a patch would.
    pub env_overrides: &'a [(String, String)],
    /// Cores of the node, for `limits.cpu` when a container has none.
    pub node_cores: usize,
}

impl PodPlan {
    /// Resolves `template` (a `PodTemplateSpec`) in `cx`.
    pub fn new(template: &Value, cx: &PodContext) -> PodPlan {
        let spec = &template["spec"];
        assert_eq!(
            spec["restartPolicy"], "Never",
            "the lab runs Jobs with restartPolicy Never only"
        );
        let containers = spec["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 1, "the lab runs one container per pod");
        let container = &containers[0];
        let mut labels = template["metadata"]["labels"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for (k, v) in &cx.extra_labels {
            labels.insert(k.clone(), Value::String(v.clone()));
        }
        let dir = cx.dir.clone();
        fs::create_dir_all(&dir).expect("pod directory");

        let security = |key: &str| {
            container["securityContext"][key]
                .as_u64()
                .or_else(|| spec["securityContext"][key].as_u64())
        };
        let uid = security("runAsUser").unwrap_or(0) as u32;
        let gid = security("runAsGroup").unwrap_or(u64::from(uid)) as u32;
        let fs_group = spec["securityContext"]["fsGroup"]
            .as_u64()
            .map_or(gid, |g| g as u32);

        // Volumes.
        let mut volume_dirs: BTreeMap<String, (PathBuf, Option<u64>)> = BTreeMap::new();
        for volume in spec["volumes"].as_array().into_iter().flatten() {
            let name = volume["name"].as_str().expect("volume name").to_string();
            let (path, memory) =
                make_volume(volume, cx, &dir.join("volumes").join(&name), fs_group);
            volume_dirs.insert(name, (path, memory));
        }
        let mut real_mounts = Vec::new();
        let mut rewritten = Vec::new();
        let mut shm_bytes = DEFAULT_SHM_BYTES;
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let name = mount["name"].as_str().expect("mount name");
            let mount_path = mount["mountPath"].as_str().expect("mountPath").to_string();
            let (path, memory) = volume_dirs
                .get(name)
                .unwrap_or_else(|| panic!("volumeMount {name} names no volume"))
                .clone();
            assert!(
                mount.get("subPath").is_none(),
                "subPath is not supported by the lab"
            );
            if mount_path == "/dev/shm" {
                shm_bytes = memory.unwrap_or(DEFAULT_SHM_BYTES);
            } else if Path::new(&mount_path).is_dir() {
                real_mounts.push((path, PathBuf::from(&mount_path)));
            } else {
                rewritten.push((path, mount_path));
            }
        }
        // Longest first, so that /a/b wins over /a.
        rewritten.sort_by_key(|(_, p)| std::cmp::Reverse(p.len()));

        // Environment: envFrom, then env, as the kubelet does; then the controller's.
        let mut env: Vec<(String, String)> = Vec::new();
        let set = |env: &mut Vec<(String, String)>, key: String, value: String| {
            env.retain(|(k, _)| *k != key);
            env.push((key, value));
        };
        for source in container["envFrom"].as_array().into_iter().flatten() {
            let prefix = source["prefix"].as_str().unwrap_or_default();
            let (kind, reference) = if source.get("configMapRef").is_some() {
                ("ConfigMap", &source["configMapRef"])
            } else {
                ("Secret", &source["secretRef"])
            };
            let name = reference["name"].as_str().expect("envFrom name");
            match cx.manifests.config_data(kind, name) {
                Some(data) => {
                    for (key, value) in data {
                        set(&mut env, format!("{prefix}{key}"), utf8(value));
                    }
                }
                None => assert!(
                    reference["optional"] == true,
                    "envFrom names {kind} {name}, which the manifests lack"
                ),
            }
        }
        let limits = &container["resources"]["limits"];
        let requests = &container["resources"]["requests"];
        for (key, value) in &cx.extra_env {
            set(&mut env, key.clone(), value.clone());
        }
        for var in container["env"].as_array().into_iter().flatten() {
            let key = var["name"].as_str().expect("env name").to_string();
            let value = if let Some(value) = var["value"].as_str() {
                expand(value, &env)
            } else {
                let from = &var["valueFrom"];
                if let Some(reference) = from.get("configMapKeyRef") {
                    key_ref(cx, "ConfigMap", reference)
                } else if let Some(reference) = from.get("secretKeyRef") {
                    key_ref(cx, "Secret", reference)
                } else if let Some(field) = from.get("fieldRef") {
                    field_ref(field["fieldPath"].as_str().expect("fieldPath"), cx, &labels)
                } else if let Some(resource) = from.get("resourceFieldRef") {
                    resource_ref(resource, limits, requests, cx.node_cores)
                } else {
                    panic!("env {key}: a source the lab does not know: {from}")
                }
            };
            set(&mut env, key, value);
        }
        for (key, value) in cx.env_overrides {
            set(&mut env, key.clone(), value.clone());
        }
        for (_, value) in env.iter_mut() {
            *value = rewrite(value, &rewritten);
        }

        // Command.
        let command: Vec<String> = strings(&container["command"])
            .iter()
            .map(|c| expand(c, &env))
            .collect();
        let args: Vec<String> = strings(&container["args"])
            .iter()
            .map(|a| rewrite(&expand(a, &env), &rewritten))
            .collect();
        let (program, args) = match command.split_first() {
            Some((program, rest)) => (
                program.clone(),
                rest.iter().cloned().chain(args).collect::<Vec<_>>(),
            ),
            None => {
                panic!("the lab needs an explicit command (the image's entry point is not read)")
            }
        };
        let program = cx.image_root.join(program.trim_start_matches('/'));
        assert!(
            program.is_file(),
            "{} is not in the lab's image",
            program.display()
        );

        let ports = container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or_default().to_string(),
                    p["containerPort"].as_u64().expect("containerPort") as u16,
                    p["protocol"].as_str().unwrap_or("TCP").to_string(),
                )
            })
            .collect::<Vec<_>>();
        let probe = |key: &str| probe(&container[key], &ports);
        PodPlan {
            name: cx.name.clone(),
            labels,
            container: container["name"].as_str().unwrap_or("main").to_string(),
            program,
            args,
            env,
            startup: probe("startupProbe"),
            readiness: probe("readinessProbe"),
            liveness: probe("livenessProbe"),
            ports,
            grace_seconds: spec["terminationGracePeriodSeconds"]
                .as_f64()
                .unwrap_or(30.0),
            uid,
            gid,
            fs_group,
            real_mounts,
            rewritten,
            shm_bytes,
            dir,
        }
    }

    /// The pod's `/etc/hosts`: itself and the Services by every name the cluster's DNS gives
    /// them.
    pub fn write_hosts(
        &self,
        net: &PodNet,
        services: &[(String, std::net::Ipv4Addr)],
        namespace: &str,
    ) {
        let mut text = format!("127.0.0.1\tlocalhost\n{}\t{}\n", net.ip, self.name);
        for (service, ip) in services {
            text += &format!(
                "{ip}\t{service} {service}.{namespace} {service}.{namespace}.svc {service}.{namespace}.svc.cluster.local\n"
            );
        }
        fs::write(self.dir.join("hosts"), &text).expect("hosts file");
        // What `ip netns exec` shows, for looking around by hand.
        let netns_etc = PathBuf::from("/etc/netns").join(&net.netns);
        fs::create_dir_all(&netns_etc).expect("/etc/netns");
        fs::write(netns_etc.join("hosts"), &text).expect("netns hosts file");
        // No DNS server in the lab: names not in the hosts file fail at once.
        fs::write(
            self.dir.join("resolv.conf"),
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )
        .expect("resolv.conf");
    }

    /// Starts the container's process in `net`'s namespace, its output captured into a log
    /// named after the pod.
    pub fn spawn(&self, net: &PodNet) -> (Child, Log) {
        let netns = fs::File::open(format!("/run/netns/{}", net.netns)).expect("the pod's netns");
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("a path without NUL");
        let mut binds: Vec<(CString, CString)> = self
            .real_mounts
            .iter()
            .map(|(dir, at)| (c(dir), c(at)))
            .collect();
        binds.push((c(&self.dir.join("hosts")), c(Path::new("/etc/hosts"))));
        binds.push((
            c(&self.dir.join("resolv.conf")),
            c(Path::new("/etc/resolv.conf")),
        ));
        // Volume directories stay writable when the root goes read-only.
        let keep_writable: Vec<CString> = self.rewritten.iter().map(|(dir, _)| c(dir)).collect();
        let shm_options = CString::new(format!("size={},mode=1777", self.shm_bytes)).unwrap();
        let hostname = self.name.clone().into_bytes();
        let (uid, gid, fs_group) = (self.uid, self.gid, self.fs_group);
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", "/home/nonroot")
            .env("HOSTNAME", &self.name)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        use std::os::fd::AsRawFd;
        let netns_fd = netns.as_raw_fd();
        // SAFETY: between fork and exec only system calls run, on data prepared before the
        // fork; nothing allocates or takes a lock.
        unsafe {
            command.pre_exec(move || {
                let check = |rc: libc::c_int| {
                    if rc == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                };
                let null = std::ptr::null::<libc::c_char>();
                check(libc::setns(netns_fd, libc::CLONE_NEWNET))?;
                check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS))?;
                check(libc::sethostname(hostname.as_ptr().cast(), hostname.len()))?;
                check(libc::mount(
                    null,
                    c"/".as_ptr(),
                    null,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                for (from, to) in &binds {
                    check(libc::mount(
                        from.as_ptr(),
                        to.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ))?;
                }
                for dir in &keep_writable {
                    check(libc::mount(
                        dir.as_ptr(),
                        dir.as_ptr(),
                        null,
                        libc::MS_BIND,
                        std::ptr::null(),
                    ))?;
                }
                check(libc::mount(
                    c"tmpfs".as_ptr(),
                    c"/dev/shm".as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    shm_options.as_ptr().cast(),
                ))?;
                // readOnlyRootFilesystem: the root mount, not the volumes above.
                check(libc::mount(
                    null,
                    c"/".as_ptr(),
                    null,
                    libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                    std::ptr::null(),
                ))?;
                let groups = [fs_group];
                check(libc::setgroups(1, groups.as_ptr()))?;
                check(libc::setresgid(gid, gid, gid))?;
                check(libc::setresuid(uid, uid, uid))?;
                check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start pod {}: {e}", self.name));
        drop(netns);
        let log = Log::new(&self.name, 2);
        log.capture(child.stdout.take().expect("piped"));
        log.capture(child.stderr.take().expect("piped"));
        (child, log)
    }
}

/// Makes the directory of one volume; returns it and, for memory-backed ones, their size.
fn make_volume(
    volume: &Value,
    cx: &PodContext,
    dir: &Path,
    fs_group: u32,
) -> (PathBuf, Option<u64>) {
    let own = |path: &Path, mode: u32| {
        std::os::unix::fs::chown(path, None, Some(fs_group)).expect("chown to the fsGroup");
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    };
    if let Some(empty) = volume.get("emptyDir") {
        fs::create_dir_all(dir).expect("emptyDir");
        own(dir, 0o2775);
        let memory = (empty["medium"] == "Memory").then(|| {
            empty["sizeLimit"]
                .as_str()
                .map(quantity)
                .unwrap_or(DEFAULT_SHM_BYTES as f64) as u64
        });
        return (dir.to_path_buf(), memory);
    }
    if let Some(claim) = volume.get("persistentVolumeClaim") {
        let name = claim["claimName"].as_str().expect("claimName");
        let path = cx
            .claims
            .get(name)
            .unwrap_or_else(|| panic!("no PersistentVolumeClaim {name} in the lab"))
            .clone();
        // The kubelet gives the volume's root to the fsGroup.
        own(&path, 0o2775);
        return (path, None);
    }
    let (kind, source, name_key) = if let Some(secret) = volume.get("secret") {
        ("Secret", secret, "secretName")
    } else if let Some(map) = volume.get("configMap") {
        ("ConfigMap", map, "name")
    } else {
        panic!("a volume the lab does not know: {volume}")
    };
    let name = source[name_key].as_str().expect("volume source name");
    fs::create_dir_all(dir).expect("volume dir");
    own(dir, 0o755);
    let data = cx
        .manifests
        .config_data(kind, name)
        .unwrap_or_else(|| panic!("a volume names {kind} {name}, which the manifests lack"));
    let mode = source["defaultMode"].as_u64().unwrap_or(0o644) as u32;
    let files: Vec<(String, String, u32)> = match source["items"].as_array() {
        Some(items) => items
            .iter()
            .map(|item| {
                (
                    item["key"].as_str().expect("item key").to_string(),
                    item["path"].as_str().expect("item path").to_string(),
                    item["mode"].as_u64().map_or(mode, |m| m as u32),
                )
            })
            .collect(),
        None => data
            .iter()
            .map(|(k, _)| (k.clone(), k.clone(), mode))
            .collect(),
    };
    for (key, path, mode) in files {
        let value = &data
            .iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("{kind} {name} has no key {key}"))
            .1;
        let file = dir.join(&path);
        fs::write(&file, value).expect("volume file");
        own(&file, mode);
    }
    (dir.to_path_buf(), None)
}

fn key_ref(cx: &PodContext, kind: &str, reference: &Value) -> String {
    let name = reference["name"].as_str().expect("name");
    let key = reference["key"].as_str().expect("key");
    utf8(
        cx.manifests
            .config_value(kind, name, key)
            .unwrap_or_else(|| panic!("{kind} {name} has no key {key}")),
    )
}

/// A downward-API field of the pod.
fn field_ref(path: &str, cx: &PodContext, labels: &Map<String, Value>) -> String {
    let quoted = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix("['"))
            .and_then(|rest| rest.strip_suffix("']"))
    };
    match path {
        "status.podIP" => cx.ip.to_string(),
        "status.podIPs" => cx.ip.to_string(),
        "metadata.name" => cx.name.clone(),
        "metadata.namespace" => cx.namespace.to_string(),
        "spec.nodeName" => "lab-node".into(),
        "status.hostIP" => "10.77.0.1".into(),
        "spec.serviceAccountName" => "default".into(),
        _ => {
            if let Some(label) = quoted("metadata.labels") {
                labels
                    .get(label)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            } else if let Some(annotation) = quoted("metadata.annotations") {
                cx.annotations
                    .iter()
                    .find(|(k, _)| k == annotation)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            } else {
                panic!("fieldRef {path} is not known to the lab")
            }
        }
    }
}

/// A `resourceFieldRef`: CPU rounded up to whole units of the divisor, memory in bytes over
/// it, as the kubelet gives them.
fn resource_ref(resource: &Value, limits: &Value, requests: &Value, node_cores: usize) -> String {
    let name = resource["resource"].as_str().expect("resource");
    let divisor = resource["divisor"]
        .as_str()
        .map(quantity)
        .or_else(|| resource["divisor"].as_f64())
        .unwrap_or(1.0);
    let (source, key) = name.split_once('.').expect("limits.cpu or the like");
    let declared = match source {
        "limits" => &limits[key],
        "requests" => &requests[key],
        _ => panic!("resourceFieldRef {name}"),
    };
    let value = declared
        .as_str()
        .map(quantity)
        .or_else(|| declared.as_f64())
        .unwrap_or(if key == "cpu" { node_cores as f64 } else { 0.0 });
    ((value / divisor).ceil() as u64).to_string()
}

/// A Kubernetes quantity (`500m`, `2`, `64Mi`, `1G`) as a number.
pub fn quantity(text: &str) -> f64 {
    let suffixes: [(&str, f64); 12] = [
        ("Ki", 1024.0),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("n", 1e-9),
        ("u", 1e-6),
        ("", 1.0),
    ];
    for (suffix, factor) in suffixes {
        if let Some(number) = text.strip_suffix(suffix)
            && let Ok(n) = number.parse::<f64>()
        {
            return n * factor;
        }
    }
    panic!("not a quantity: {text}")
}

/// `$(VAR)` replaced by an earlier variable's value, `$$(VAR)` left as `$(VAR)`, unknown
/// references kept as written, as the kubelet expands them.
fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix("$(") {
            out.push_str("$(");
            rest = tail;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, value)) => out.push_str(value),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A value naming a rewritten mount path, naming the directory that stands for it.
fn rewrite(value: &str, rewritten: &[(PathBuf, String)]) -> String {
    for (dir, mount_path) in rewritten {
        if let Some(rest) = value.strip_prefix(mount_path.as_str())
            && (rest.is_empty() || rest.starts_with('/'))
        {
            return format!("{}{rest}", dir.display());
        }
    }
    value.to_string()
}

fn probe(probe: &Value, ports: &[(String, u16, String)]) -> Option<Probe> {
    if probe.is_null() {
        return None;
    }
    let port = |value: &Value| -> u16 {
        match value {
            Value::Number(n) => n.as_u64().expect("a port number") as u16,
            Value::String(name) => {
                ports
                    .iter()
                    .find(|(n, _, _)| n == name)
                    .unwrap_or_else(|| {
                        panic!("a probe names port {name}, which the container lacks")
                    })
                    .1
            }
            other => panic!("probe port {other}"),
        }
    };
    let action = if let Some(grpc) = probe.get("grpc") {
        ProbeAction::Grpc {
            port: port(&grpc["port"]),
            service: grpc["service"].as_str().unwrap_or_default().to_string(),
        }
    } else if let Some(tcp) = probe.get("tcpSocket") {
        ProbeAction::Tcp {
            port: port(&tcp["port"]),
        }
    } else if let Some(http) = probe.get("httpGet") {
        ProbeAction::Http {
            port: port(&http["port"]),
            path: http["path"].as_str().unwrap_or("/").to_string(),
        }
    } else {
        panic!("a probe the lab cannot run (exec?): {probe}")
    };
    let number = |key: &str, default: f64| probe[key].as_f64().unwrap_or(default);
    Some(Probe {
        action,
        initial_delay_seconds: number("initialDelaySeconds", 0.0),
        period_seconds: number("periodSeconds", 10.0),
        timeout_seconds: number("timeoutSeconds", 1.0),
        failure_threshold: number("failureThreshold", 3.0) as u32,
    })
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn utf8(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).expect("a UTF-8 value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_expand_as_the_kubelet_expands_them() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand("x$(A)y", &env), "x1y");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("$(B)", &env), "$(B)");
        assert_eq!(expand("cost $5", &env), "cost $5");
    }

    #[test]
    fn quantities_and_resource_references() {
        assert_eq!(quantity("500m"), 0.5);
        assert_eq!(quantity("64Mi"), 64.0 * 1024.0 * 1024.0);
        assert_eq!(quantity("2"), 2.0);
        let limits = serde_json::json!({"cpu": "1500m"});
        let reference = serde_json::json!({"resource": "limits.cpu", "divisor": "1"});
        assert_eq!(resource_ref(&reference, &limits, &Value::Null, 8), "2");
    }

    #[test]
    fn mount_paths_are_rewritten_at_path_boundaries() {
        let rewritten = vec![(PathBuf::from("/lab/v"), "/data".to_string())];
        assert_eq!(rewrite("/data", &rewritten), "/lab/v");
        assert_eq!(rewrite("/data/x", &rewritten), "/lab/v/x");
        assert_eq!(rewrite("/database", &rewritten), "/database");
    }
}
