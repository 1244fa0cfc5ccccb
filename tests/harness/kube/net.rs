//! The lab's network: a bridge in the machine's own namespace (the node, where the kubelet's
//! probes come from) and, per pod, a network namespace joined to it by a veth pair, with an
//! address of its own. Service addresses are extra addresses on the pod that backs them.
//! NetworkPolicies become iptables rules in each pod's namespace.
//!
//! Every lab takes a /24 of 10.77.0.0/16 by creating its bridge `lkbrN` (which fails if
//! another lab holds N) and writes its pid into `/run/lockstep-lab/N`; a lab whose process is
//! gone is cleaned up by the next one that wants its N.

use std::{
    fs,
    io::Write,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::Mutex,
};

const STATE_DIR: &str = "/run/lockstep-lab";

/// The first host number given to a pod; below it are the node (1) and Services.
const FIRST_POD_HOST: u8 = 16;

/// A lab network.
#[derive(Debug)]
pub struct Network {
    /// The lab's number: its subnet is 10.77.N.0/24.
    pub n: u8,
    bridge: String,
    state: Mutex<NetState>,
}

#[derive(Debug, Default)]
struct NetState {
    next_pod: u32,
    next_host: u8,
    next_service: u8,
    namespaces: Vec<String>,
}

/// One pod's network namespace.
#[derive(Debug, Clone)]
pub struct PodNet {
    /// The namespace's name, as `ip netns` knows it (`/run/netns/NAME`).
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The host side of its veth pair.
    veth: String,
}

impl Network {
    /// A fresh network, or `None` where this process may not make one (not root).
    pub fn create() -> Option<Network> {
        if !can_manage_network() {
            return None;
        }
        fs::create_dir_all(STATE_DIR).expect("state directory");
        for n in 1..=250u8 {
            let bridge = format!("lkbr{n}");
            let owner = PathBuf::from(STATE_DIR).join(n.to_string());
            if let Ok(pid) = fs::read_to_string(&owner)
                && !process_alive(pid.trim().parse().unwrap_or(0))
            {
                clean_up_lab(n);
            }
            if !ip(&["link", "add", &bridge, "type", "bridge"]).success() {
                continue;
            }
            fs::write(&owner, std::process::id().to_string()).expect("owner file");
            run(&[
                "ip",
                "addr",
                "add",
                &format!("10.77.{n}.1/24"),
                "dev",
                &bridge,
            ]);
            run(&["ip", "link", "set", &bridge, "up"]);
            return Some(Network {
                n,
                bridge,
                state: Mutex::new(NetState {
                    next_host: FIRST_POD_HOST,
                    next_service: 2,
                    ..NetState::default()
                }),
            });
        }
        panic!("no free lab network among 10.77.1-250.0/24");
    }

    /// The node's address on the bridge: where probes come from.
    pub fn node_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.n, 1)
    }

    /// A new address for a Service.
    pub fn service_ip(&self) -> Ipv4Addr {
        let mut state = self.state.lock().unwrap();
        assert!(
            state.next_service < FIRST_POD_HOST,
            "too many Services for one lab"
        );
        let host = state.next_service;
        state.next_service += 1;
        Ipv4Addr::new(10, 77, self.n, host)
    }

    /// A namespace for a new pod, with its own address, loopback and a route to the node.
    pub fn add_pod(&self) -> PodNet {
        let (seq, host) = {
            let mut state = self.state.lock().unwrap();
            let seq = state.next_pod;
            state.next_pod += 1;
            assert!(state.next_host < 250, "too many pods for one lab network");
            let host = state.next_host;
            state.next_host += 1;
            (seq, host)
        };
        let n = self.n;
        let netns = format!("lk{n}-{seq}");
        let veth = format!("lk{n}v{seq}");
        let peer = format!("lk{n}p{seq}");
        let ip = Ipv4Addr::new(10, 77, n, host);
        run(&["ip", "netns", "add", &netns]);
        self.state.lock().unwrap().namespaces.push(netns.clone());
        run(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", &peer,
        ]);
        run(&["ip", "link", "set", &peer, "netns", &netns]);
        run(&["ip", "link", "set", &veth, "master", &self.bridge]);
        run(&["ip", "link", "set", &veth, "up"]);
        let exec = |args: &[&str]| {
            let mut full = vec!["ip", "-n", &netns];
            full.extend_from_slice(args);
            run(&full);
        };
        exec(&["link", "set", &peer, "name", "eth0"]);
        exec(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        exec(&["link", "set", "eth0", "up"]);
        exec(&["link", "set", "lo", "up"]);
        exec(&[
            "route",
            "add",
            "default",
            "via",
            &self.node_ip().to_string(),
        ]);
        PodNet { netns, ip, veth }
    }

    /// Gives `pod` another address (a Service's), and makes every other pod forget where
    /// that address was, as a Service's endpoints change.
    pub fn add_address(&self, pod: &PodNet, address: Ipv4Addr) {
        run(&[
            "ip",
            "-n",
            &pod.netns,
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            "eth0",
        ]);
        let namespaces = self.state.lock().unwrap().namespaces.clone();
        for netns in namespaces.iter().filter(|n| **n != pod.netns) {
            let _ = ip(&["-n", netns, "neigh", "flush", "to", &address.to_string()]);
        }
        let _ = ip(&["neigh", "flush", "to", &address.to_string()]);
        // Tell the bridge and the pods the address's new owner (a gratuitous ARP).
        let _ = Command::new("ip")
            .args(["netns", "exec", &pod.netns, "arping", "-U", "-c", "1", "-I"])
            .args(["eth0", &address.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Removes a pod's namespace (its processes must be gone).
    pub fn remove_pod(&self, pod: &PodNet) {
        let _ = ip(&["link", "del", &pod.veth]);
        let _ = ip(&["netns", "del", &pod.netns]);
        let _ = fs::remove_dir_all(format!("/etc/netns/{}", pod.netns));
        self.state
            .lock()
            .unwrap()
            .namespaces
            .retain(|n| *n != pod.netns);
    }

    /// Loads `rules` (`iptables-restore` input) into the pod's namespace.
    pub fn set_rules(&self, pod: &PodNet, rules: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &pod.netns, "iptables-restore"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("iptables-restore runs (apt install iptables)");
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(rules.as_bytes())
            .expect("rules written");
        let output = child.wait_with_output().expect("iptables-restore ends");
        assert!(
            output.status.success(),
            "iptables-restore in {}: {}\n{rules}",
            pod.netns,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        clean_up_lab(self.n);
    }
}

/// Removes everything of lab `n`: its namespaces, their veths, the bridge, the owner file.
fn clean_up_lab(n: u8) {
    let prefix = format!("lk{n}-");
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) {
                let _ = ip(&["netns", "del", &name]);
                let _ = fs::remove_dir_all(format!("/etc/netns/{name}"));
            }
        }
    }
    // Veths die with their namespace's end, unless a process of a lab that was killed still
    // holds the namespace: those are deleted by name. The bridge last.
    if let Ok(output) = Command::new("ip").args(["-o", "link", "show"]).output() {
        let veth = format!("lk{n}v");
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            // "3373: lk1v17@if3372: <BROADCAST,..."
            let name = line.split(": ").nth(1).and_then(|n| n.split('@').next());
            if let Some(name) = name.filter(|name| name.starts_with(&veth)) {
                let _ = ip(&["link", "del", name]);
            }
        }
    }
    let _ = ip(&["link", "del", &format!("lkbr{n}")]);
    let _ = fs::remove_file(PathBuf::from(STATE_DIR).join(n.to_string()));
}

/// Whether this process can make namespaces, bridges and mounts: root with the capabilities.
pub fn can_manage_network() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Command::new("ip")
        .args(["netns", "list"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("iptables-restore")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

fn ip(args: &[&str]) -> std::process::ExitStatus {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("ip (iproute2) runs")
}

fn run(args: &[&str]) {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(
        output.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}
