//! The deployment's manifests as a reviewer reads them, for every overlay: selectors select
//! the pods they mean, every port a Service, probe or NetworkPolicy names is a container's,
//! every `LOCKSTEP_*` variable is a flag of the program it is given to (checked against the
//! programs' own flag definitions, values parsed as the programs parse them), images are
//! pinned, and every container has limits and the restricted security context.
//!
//! (Schema validation, lint and the Dockerfiles are `scripts/check-deploy.sh`'s, in CI.)

use clap::{ArgAction, Args, Command, FromArgMatches};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tests::kube::manifest::{Manifests, match_labels, selects};

const OVERLAYS: [&str; 2] = ["cpu", "gpu"];

fn overlay(name: &str) -> Manifests {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    Manifests::render(&repo.join("deploy/overlays").join(name))
}

/// Every pod template of the manifests, with the name of its Job.
fn templates(manifests: &Manifests) -> Vec<(String, Value)> {
    manifests
        .of_kind("Job")
        .map(|job| {
            (
                job["metadata"]["name"]
                    .as_str()
                    .expect("a name")
                    .to_string(),
                job["spec"]["template"].clone(),
            )
        })
        .collect()
}

fn containers(template: &Value) -> Vec<Value> {
    template["spec"]["containers"]
        .as_array()
        .cloned()
        .expect("containers")
}

/// Which program a container runs: the last part of its command.
fn program(container: &Value) -> String {
    let command = container["command"][0]
        .as_str()
        .expect("an explicit command");
    PathBuf::from(command)
        .file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

/// The flag definitions of `program`, as its binary parses them.
fn flags(program: &str) -> Command {
    match program {
        "coordinator" => coordinator::Config::augment_args(Command::new("coordinator")),
        "worker" => worker::Config::augment_args(Command::new("worker")),
        other => panic!("a container runs {other}, which is not a program of this project"),
    }
}

/// The environment a container gets, `LOCKSTEP_*` only: ConfigMap keys through `envFrom`,
/// then `env` (values from the downward API stand in as a pod's would).
fn lockstep_env(manifests: &Manifests, container: &Value) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for source in container["envFrom"].as_array().into_iter().flatten() {
        let name = source["configMapRef"]["name"]
            .as_str()
            .expect("envFrom from ConfigMaps");
        let data = manifests
            .config_data("ConfigMap", name)
            .unwrap_or_else(|| panic!("envFrom names ConfigMap {name}, which is not there"));
        for (key, value) in data {
            env.push((key, String::from_utf8(value).expect("UTF-8")));
        }
    }
    for var in container["env"].as_array().into_iter().flatten() {
        let key = var["name"].as_str().expect("a name").to_string();
        let from = &var["valueFrom"];
        let value = if let Some(value) = var["value"].as_str() {
            value.to_string()
        } else if from["fieldRef"]["fieldPath"] == "status.podIP" {
            "10.1.2.3".into()
        } else if from.get("resourceFieldRef").is_some() {
            "2".into()
        } else if let Some(reference) = from.get("configMapKeyRef") {
            String::from_utf8(
                manifests
                    .config_value(
                        "ConfigMap",
                        reference["name"].as_str().expect("name"),
                        reference["key"].as_str().expect("key"),
                    )
                    .expect("the key exists"),
            )
            .expect("UTF-8")
        } else {
            panic!("env {key}: a source this test does not know: {from}")
        };
        env.retain(|(k, _)| *k != key);
        env.push((key, value));
    }
    env.retain(|(k, _)| k.starts_with("LOCKSTEP_"));
    env
}

/// The command line that stands for `env` in `command`'s flags: `--flag=value`, or `--flag`
/// for a switch that is on. Panics naming a variable no flag reads.
fn as_arguments(command: &Command, env: &[(String, String)]) -> Vec<String> {
    let mut args = vec![command.get_name().to_string()];
    for (key, value) in env {
        let arg = command
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == key.as_str()))
            .unwrap_or_else(|| panic!("{key} is not a flag of `{}`", command.get_name()));
        let long = arg.get_long().expect("env flags are long flags");
        match arg.get_action() {
            ArgAction::SetTrue => {
                // clap reads these from the environment as booleans.
                match value.to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" | "on" => args.push(format!("--{long}")),
                    "false" | "0" | "no" | "off" => {}
                    other => panic!("{key}={other} is not a boolean"),
                }
            }
            _ => args.push(format!("--{long}={value}")),
        }
    }
    args
}

#[test]
fn every_lockstep_variable_is_a_flag_the_program_accepts_with_its_value() {
    for name in OVERLAYS {
        let manifests = overlay(name);
        for (job, template) in templates(&manifests) {
            for container in containers(&template) {
                let program = program(&container);
                let command = flags(&program);
                let env = lockstep_env(&manifests, &container);
                assert!(!env.is_empty(), "{name}/{job}: no LOCKSTEP_* settings");
                let args = as_arguments(&command, &env);
                let matches = command
                    .clone()
                    .try_get_matches_from(&args)
                    .unwrap_or_else(|e| panic!("{name}/{job}: {program} refuses {args:?}:\n{e}"));
                match program.as_str() {
                    "coordinator" => {
                        let config = coordinator::Config::from_arg_matches(&matches)
                            .expect("the flags make a configuration");
                        config
                            .job()
                            .validate()
                            .unwrap_or_else(|e| panic!("{name}/{job}: {e}"));
                        assert!(
                            config.external_workers,
                            "{name}/{job}: pods are external workers"
                        );
                        assert!(
                            config.health_listen.is_some(),
                            "{name}/{job}: a health port"
                        );
                    }
                    _ => {
                        let config = worker::Config::from_arg_matches(&matches)
                            .expect("the flags make a configuration");
                        assert_eq!(
                            config.connect_timeout(),
                            None,
                            "{name}/{job}: workers must wait for the coordinator as long as it takes"
                        );
                        assert!(
                            config.health_listen.is_some(),
                            "{name}/{job}: a health port"
                        );
                    }
                }
                println!(
                    "{name}/{job}: {} LOCKSTEP_* settings accepted by {program}",
                    env.len()
                );
            }
        }
    }
}

#[test]
fn selectors_select_and_every_port_named_is_a_containers() {
    for name in OVERLAYS {
        let manifests = overlay(name);
        let pods: Vec<(String, Value)> = templates(&manifests);
        let labels = |template: &Value| {
            template["metadata"]["labels"]
                .as_object()
                .cloned()
                .unwrap_or_default()
        };
        let ports = |template: &Value| -> Vec<(String, u64)> {
            containers(template)
                .iter()
                .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
                .map(|p| {
                    (
                        p["name"].as_str().unwrap_or_default().to_string(),
                        p["containerPort"].as_u64().expect("a number"),
                    )
                })
                .collect()
        };
        let has_port = |template: &Value, port: &Value| match port {
            Value::String(n) => ports(template).iter().any(|(name, _)| name == n),
            Value::Number(n) => ports(template).iter().any(|(_, p)| Some(*p) == n.as_u64()),
            _ => false,
        };

        for service in manifests.of_kind("Service") {
            let selector = match_labels(&service["spec"]["selector"]);
            let selected: Vec<&(String, Value)> = pods
                .iter()
                .filter(|(_, t)| selects(&selector, &labels(t)))
                .collect();
            assert_eq!(
                selected.len(),
                1,
                "{name}: Service {} selects {selected:?}",
                service["metadata"]["name"]
            );
            for port in service["spec"]["ports"].as_array().expect("ports") {
                let target = if port["targetPort"].is_null() {
                    &port["port"]
                } else {
                    &port["targetPort"]
                };
                assert!(
                    has_port(&selected[0].1, target),
                    "{name}: Service port {port} is no container's"
                );
            }
        }
        for (job, template) in &pods {
            for container in containers(template) {
                for kind in ["startupProbe", "readinessProbe", "livenessProbe"] {
                    let probe = &container[kind];
                    if probe.is_null() {
                        continue;
                    }
                    let port = ["grpc", "httpGet", "tcpSocket"]
                        .iter()
                        .find_map(|action| probe.get(*action).map(|a| &a["port"]))
                        .unwrap_or_else(|| panic!("{name}/{job}: {kind} runs no port check"));
                    assert!(
                        has_port(template, port),
                        "{name}/{job}: {kind} port {port} is no container's"
                    );
                }
            }
            let job_object = manifests.get("Job", job);
            assert!(
                job_object["spec"]["selector"].is_null(),
                "{name}/{job}: the Job controller picks its selector"
            );
        }
        for policy in manifests.of_kind("NetworkPolicy") {
            let policy_name = &policy["metadata"]["name"];
            let selector = match_labels(&policy["spec"]["podSelector"]);
            let selected: Vec<&Value> = pods
                .iter()
                .map(|(_, t)| t)
                .filter(|t| selects(&selector, &labels(t)))
                .collect();
            assert!(
                !selected.is_empty(),
                "{name}: NetworkPolicy {policy_name} selects no pod"
            );
            for (rules, peers) in [("ingress", "from"), ("egress", "to")] {
                for rule in policy["spec"][rules].as_array().into_iter().flatten() {
                    // A pod peer must be one of ours, and a port one the right side declares.
                    let peer_pods: Vec<&Value> = rule[peers]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|p| {
                            p.get("podSelector").is_some() && p.get("namespaceSelector").is_none()
                        })
                        .flat_map(|p| {
                            let selector = match_labels(&p["podSelector"]);
                            let found: Vec<&Value> = pods
                                .iter()
                                .map(|(_, t)| t)
                                .filter(|t| selects(&selector, &labels(t)))
                                .collect();
                            assert!(
                                !found.is_empty(),
                                "{name}: {policy_name} {rules} peer {p} selects no pod"
                            );
                            found
                        })
                        .collect();
                    for port in rule["ports"].as_array().into_iter().flatten() {
                        let number = &port["port"];
                        if number.is_null() {
                            continue;
                        }
                        let owners: &[&Value] = if rules == "ingress" {
                            &selected
                        } else {
                            &peer_pods
                        };
                        if owners.is_empty() {
                            continue; // outside the namespace (DNS, the internet)
                        }
                        assert!(
                            owners.iter().any(|t| has_port(t, number)),
                            "{name}: {policy_name} {rules} port {number} is no container's"
                        );
                    }
                }
            }
        }
        println!("{name}: selectors and ports agree");
    }
}

#[test]
fn every_container_has_a_pinned_image_limits_and_the_restricted_profile() {
    for name in OVERLAYS {
        let manifests = overlay(name);
        for (job, template) in templates(&manifests) {
            let spec = &template["spec"];
            assert_eq!(spec["automountServiceAccountToken"], false, "{name}/{job}");
            assert_eq!(
                spec["securityContext"]["runAsNonRoot"], true,
                "{name}/{job}"
            );
            assert_eq!(
                spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
                "{name}/{job}"
            );
            for container in containers(&template) {
                let image = container["image"].as_str().expect("an image");
                let pinned = image.contains('@')
                    || image
                        .rsplit_once(':')
                        .is_some_and(|(_, tag)| !tag.contains('/') && tag != "latest");
                assert!(pinned, "{name}/{job}: image {image} is not pinned");
                for kind in ["requests", "limits"] {
                    for resource in ["cpu", "memory"] {
                        assert!(
                            container["resources"][kind][resource].is_string(),
                            "{name}/{job}: no {kind}.{resource}"
                        );
                    }
                }
                let security = &container["securityContext"];
                assert_eq!(security["allowPrivilegeEscalation"], false, "{name}/{job}");
                assert_eq!(security["readOnlyRootFilesystem"], true, "{name}/{job}");
                assert_eq!(
                    security["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{name}/{job}"
                );
                let user = security["runAsUser"]
                    .as_u64()
                    .or_else(|| spec["securityContext"]["runAsUser"].as_u64());
                assert!(
                    user.is_some_and(|u| u > 0),
                    "{name}/{job}: a numeric non-root user"
                );
            }
        }
        assert!(
            manifests.of_kind("Secret").next().is_none(),
            "{name}: a Secret is committed"
        );
        println!("{name}: images pinned, limits and security set on every container");
    }
}
