//! NetworkPolicies as packet filters: for each pod, the iptables rules that let in (and out)
//! exactly what the policies selecting it allow, as a CNI plugin enforces them.
//!
//! Supported, as the deployment uses them: `podSelector` and `namespaceSelector` by
//! `matchLabels` (the lab is one namespace), `ipBlock`, ports by number or by the name a
//! container declares, and a port rule without a port (every port of the protocol). Traffic
//! from the node (the kubelet's probes) is always let in, as CNI plugins do.

use super::manifest::{match_labels, selects};
use serde_json::{Map, Value};
use std::{fmt::Write, net::Ipv4Addr};

/// A container port: `(name, number, protocol)`.
pub type Port = (String, u16, String);

/// What the rules need to know of a pod.
#[derive(Debug, Clone)]
pub struct PodView {
    pub labels: Map<String, Value>,
    /// Its own address and those of the Services it backs.
    pub addresses: Vec<Ipv4Addr>,
    /// `(name, number, protocol)` of every container port.
    pub ports: Vec<Port>,
    /// Cut off from the network: every packet dropped.
    pub cut: bool,
}

/// The `iptables-restore` input for `pod`, among `pods` (which include it), under `policies`
/// in a namespace labelled `namespace_labels`; `node` is the node's address.
pub fn rules(
    policies: &[&Value],
    pod: &PodView,
    pods: &[PodView],
    namespace_labels: &Map<String, Value>,
    node: Ipv4Addr,
) -> String {
    let selecting: Vec<&Value> = policies
        .iter()
        .copied()
        .filter(|policy| selects(&match_labels(&policy["spec"]["podSelector"]), &pod.labels))
        .collect();
    let has_type = |policy: &Value, kind: &str| match policy["spec"]["policyTypes"].as_array() {
        Some(types) => types.iter().any(|t| t == kind),
        None => kind == "Ingress" || policy["spec"]["egress"].is_array(),
    };
    let mut out =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    if pod.cut {
        out.push_str("-A INPUT -i eth0 -j DROP\n-A OUTPUT -o eth0 -j DROP\n");
    }
    for (chain, kind, rules_key, peers_key, interface) in [
        ("INPUT", "Ingress", "ingress", "from", "-i"),
        ("OUTPUT", "Egress", "egress", "to", "-o"),
    ] {
        let policies: Vec<&Value> = selecting
            .iter()
            .copied()
            .filter(|p| has_type(p, kind))
            .collect();
        if policies.is_empty() {
            continue;
        }
        let _ = writeln!(out, "-A {chain} {interface} lo -j ACCEPT");
        let _ = writeln!(
            out,
            "-A {chain} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
        );
        if chain == "INPUT" {
            let _ = writeln!(out, "-A INPUT -s {node}/32 -j ACCEPT");
        }
        for policy in policies {
            for rule in policy["spec"][rules_key].as_array().into_iter().flatten() {
                let sources = peers(&rule[peers_key], pods, namespace_labels);
                for (peer, peer_ports) in sources {
                    // A named port is the selected pod's on ingress, the peer's on egress.
                    let named_in = if chain == "INPUT" {
                        &pod.ports
                    } else {
                        peer_ports
                    };
                    for (protocol, port) in ports(&rule["ports"], named_in) {
                        let address = match peer.as_str() {
                            "" => String::new(),
                            cidr if chain == "INPUT" => format!(" -s {cidr}"),
                            cidr => format!(" -d {cidr}"),
                        };
                        let port = port.map_or(String::new(), |p| format!(" --dport {p}"));
                        let protocol =
                            protocol.map_or(String::new(), |p| format!(" -p {}", p.to_lowercase()));
                        let _ = writeln!(out, "-A {chain}{address}{protocol}{port} -j ACCEPT");
                    }
                }
            }
        }
        let _ = writeln!(out, "-A {chain} -j DROP");
    }
    out.push_str("COMMIT\n");
    out
}

/// The peers of a rule as address specs (`""`: anywhere), each with the container ports of
/// the pod it stands for (for named ports).
fn peers<'a>(
    peers: &Value,
    pods: &'a [PodView],
    namespace_labels: &Map<String, Value>,
) -> Vec<(String, &'a [Port])> {
    // Missing or empty: every source (or destination).
    let Some(peers) = peers.as_array().filter(|p| !p.is_empty()) else {
        return vec![(String::new(), &[])];
    };
    let mut out = Vec::new();
    for peer in peers {
        if let Some(block) = peer.get("ipBlock") {
            assert!(
                block.get("except").is_none(),
                "ipBlock.except is not supported by the lab"
            );
            let cidr = block["cidr"].as_str().expect("ipBlock.cidr");
            // The lab is IPv4 only: an IPv6 block matches nothing there.
            if !cidr.contains(':') {
                out.push((cidr.to_string(), &[][..]));
            }
            continue;
        }
        if let Some(namespaces) = peer.get("namespaceSelector")
            && !selects(&match_labels(namespaces), namespace_labels)
        {
            continue;
        }
        let selector = peer
            .get("podSelector")
            .map(match_labels)
            .unwrap_or_default();
        for pod in pods.iter().filter(|p| selects(&selector, &p.labels)) {
            for address in &pod.addresses {
                out.push((format!("{address}/32"), &pod.ports[..]));
            }
        }
    }
    out
}

/// The `(protocol, port)` pairs of a rule's `ports`; `None` for any.
fn ports(ports: &Value, named: &[Port]) -> Vec<(Option<String>, Option<u16>)> {
    let Some(ports) = ports.as_array().filter(|p| !p.is_empty()) else {
        return vec![(None, None)];
    };
    let mut out = Vec::new();
    for port in ports {
        let protocol = port["protocol"].as_str().unwrap_or("TCP").to_string();
        match &port["port"] {
            Value::Null => out.push((Some(protocol), None)),
            Value::Number(n) => out.push((Some(protocol), n.as_u64().map(|n| n as u16))),
            Value::String(name) => {
                // A name no container of the peer declares lets nothing through.
                for (_, number, _) in named.iter().filter(|(n, _, p)| n == name && *p == protocol) {
                    out.push((Some(protocol.clone()), Some(*number)));
                }
            }
            other => panic!("a NetworkPolicy port the lab does not know: {other}"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(component: &str, ip: u8, ports: &[(&str, u16)]) -> PodView {
        PodView {
            labels: json!({"app": "x", "component": component})
                .as_object()
                .unwrap()
                .clone(),
            addresses: vec![Ipv4Addr::new(10, 0, 0, ip)],
            ports: ports
                .iter()
                .map(|(n, p)| (n.to_string(), *p, "TCP".to_string()))
                .collect(),
            cut: false,
        }
    }

    #[test]
    fn a_selected_pod_lets_in_only_what_a_rule_allows() {
        let policy = json!({
            "kind": "NetworkPolicy",
            "spec": {
                "podSelector": {"matchLabels": {"component": "server"}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"component": "client"}}}],
                             "ports": [{"port": "grpc"}]}]
            }
        });
        let server = pod("server", 2, &[("grpc", 50051)]);
        let client = pod("client", 3, &[]);
        let pods = [server.clone(), client.clone()];
        let rules = rules(
            &[&policy],
            &server,
            &pods,
            &Map::new(),
            Ipv4Addr::new(10, 0, 0, 1),
        );
        assert!(
            rules.contains("-A INPUT -s 10.0.0.3/32 -p tcp --dport 50051 -j ACCEPT"),
            "{rules}"
        );
        assert!(
            rules.contains("-A INPUT -s 10.0.0.1/32 -j ACCEPT"),
            "{rules}"
        );
        assert!(
            rules.trim_end().ends_with("-A INPUT -j DROP\nCOMMIT"),
            "{rules}"
        );
        assert!(!rules.contains("OUTPUT -j DROP"), "{rules}");
        // The client is selected by nothing: no rules at all.
        let open = super::rules(
            &[&policy],
            &client,
            &pods,
            &Map::new(),
            Ipv4Addr::new(10, 0, 0, 1),
        );
        assert!(!open.contains("DROP"), "{open}");
    }
}
