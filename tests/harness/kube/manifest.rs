//! The deployment's objects as a cluster would receive them: `kubectl kustomize` of an
//! overlay, plus the Secrets `deploy/generate-secrets.sh` writes, parsed into JSON values.

use base64::Engine;
use serde_json::{Map, Value};
use std::{path::Path, process::Command};
use yaml_rust2::{Yaml, YamlLoader};

/// Every object of a rendered deployment.
#[derive(Debug, Clone)]
pub struct Manifests {
    pub objects: Vec<Value>,
}

impl Manifests {
    /// `kubectl kustomize OVERLAY` (kubectl with its built-in kustomize must be on the PATH).
    pub fn render(overlay: &Path) -> Manifests {
        let mut kubectl = Command::new("kubectl");
        kubectl.arg("kustomize").arg(overlay);
        Manifests::from_output(kubectl, "kubectl (with its built-in kustomize)")
    }

    /// The Secrets of `deploy/generate-secrets.sh`, run with its defaults.
    pub fn generate_secrets(script: &Path) -> Manifests {
        let mut bash = Command::new("bash");
        bash.arg(script);
        Manifests::from_output(bash, &script.display().to_string())
    }

    /// The objects `command` writes to stdout as YAML; panics naming `what` when it fails.
    fn from_output(mut command: Command, what: &str) -> Manifests {
        let output = command
            .output()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        assert!(
            output.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Manifests::parse(&String::from_utf8(output.stdout).expect("UTF-8 YAML"))
    }

    /// The objects of a multi-document YAML text; empty documents are skipped.
    pub fn parse(text: &str) -> Manifests {
        let documents = YamlLoader::load_from_str(text).expect("the manifests are valid YAML");
        Manifests {
            objects: documents
                .iter()
                .map(to_json)
                .filter(|object| !object.is_null())
                .collect(),
        }
    }

    /// These objects and `other`'s.
    pub fn with(mut self, other: Manifests) -> Manifests {
        self.objects.extend(other.objects);
        self
    }

    /// Every object of `kind`.
    pub fn of_kind<'a>(&'a self, kind: &str) -> impl Iterator<Item = &'a Value> + 'a {
        let kind = kind.to_string();
        self.objects
            .iter()
            .filter(move |o| o["kind"] == kind.as_str())
    }

    /// The object of `kind` named `name`.
    pub fn get(&self, kind: &str, name: &str) -> &Value {
        self.find(kind, name)
            .unwrap_or_else(|| panic!("the manifests have no {kind} {name}"))
    }

    /// The object of `kind` named `name`, if there is one.
    pub fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.of_kind(kind).find(|o| o["metadata"]["name"] == name)
    }

    /// The object of `kind` named `name`, to change before the lab uses it (as an overlay
    /// would).
    pub fn get_mut(&mut self, kind: &str, name: &str) -> &mut Value {
        self.objects
            .iter_mut()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("the manifests have no {kind} {name}"))
    }

    /// The value of `key` in ConfigMap `name` (`data`) or Secret `name` (`data`, decoded, or
    /// `stringData`).
    pub fn config_value(&self, kind: &str, name: &str, key: &str) -> Option<Vec<u8>> {
        let object = self.find(kind, name)?;
        data(object).remove(key)
    }

    /// Every key and value of ConfigMap or Secret `name`.
    pub fn config_data(&self, kind: &str, name: &str) -> Option<Vec<(String, Vec<u8>)>> {
        self.find(kind, name)
            .map(|object| data(object).into_iter().collect())
    }
}

/// The data of a ConfigMap or Secret, values as bytes (Secret `data` decoded from base64).
fn data(object: &Value) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let secret = object["kind"] == "Secret";
    if let Some(data) = object["data"].as_object() {
        for (key, value) in data {
            let text = value.as_str().unwrap_or_default();
            let bytes = if secret {
                base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .unwrap_or_else(|e| panic!("Secret key {key} is not base64: {e}"))
            } else {
                text.as_bytes().to_vec()
            };
            out.insert(key.clone(), bytes);
        }
    }
    for field in ["stringData", "binaryData"] {
        if let Some(data) = object[field].as_object() {
            for (key, value) in data {
                let text = value.as_str().unwrap_or_default();
                let bytes = if field == "binaryData" {
                    base64::engine::general_purpose::STANDARD
                        .decode(text.trim())
                        .unwrap_or_else(|e| panic!("binaryData {key} is not base64: {e}"))
                } else {
                    text.as_bytes().to_vec()
                };
                out.insert(key.clone(), bytes);
            }
        }
    }
    out
}

/// A YAML value as JSON: what the API server would store. Keys are strings; numbers and
/// booleans keep their type, as Kubernetes' YAML (1.2 core schema) reads them.
fn to_json(yaml: &Yaml) -> Value {
    match yaml {
        Yaml::Real(text) => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| Value::String(text.clone()), Value::Number),
        Yaml::Integer(n) => Value::from(*n),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Yaml::Hash(hash) => {
            let mut map = Map::new();
            for (key, value) in hash {
                let key = match key {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(n) => n.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    Yaml::Real(r) => r.clone(),
                    other => panic!("a mapping key that is not a scalar: {other:?}"),
                };
                map.insert(key, to_json(value));
            }
            Value::Object(map)
        }
        Yaml::Null | Yaml::BadValue => Value::Null,
        Yaml::Alias(_) => panic!("YAML aliases are not used in manifests"),
    }
}

/// The labels of `selector.matchLabels` (or a plain label map) as pairs.
pub fn match_labels(selector: &Value) -> Vec<(String, String)> {
    let labels = if selector.get("matchLabels").is_some() {
        &selector["matchLabels"]
    } else {
        selector
    };
    assert!(
        selector.get("matchExpressions").is_none(),
        "matchExpressions are not supported by the lab: {selector}"
    );
    labels
        .as_object()
        .map(|map| {
            map.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `labels` has every pair of `selector`.
pub fn selects(selector: &[(String, String)], labels: &Map<String, Value>) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.get(key).and_then(Value::as_str) == Some(value.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_documents_become_objects_with_typed_scalars() {
        let manifests = Manifests::parse(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata:\n  LOCKSTEP_EPOCHS: \"3\"\n---\n---\nkind: Service\nspec:\n  ports: [{port: 50051, name: grpc}]\n  flag: true\n",
        );
        assert_eq!(manifests.objects.len(), 2);
        assert_eq!(
            manifests.config_value("ConfigMap", "a", "LOCKSTEP_EPOCHS"),
            Some(b"3".to_vec())
        );
        let service = &manifests.objects[1];
        assert_eq!(service["spec"]["ports"][0]["port"], 50051);
        assert_eq!(service["spec"]["flag"], true);
    }

    #[test]
    fn secret_data_is_decoded() {
        let manifests = Manifests::parse(
            "kind: Secret\nmetadata: {name: s}\ndata: {token: aGVsbG8=}\nstringData: {plain: hi}\n",
        );
        assert_eq!(
            manifests.config_value("Secret", "s", "token"),
            Some(b"hello".to_vec())
        );
        assert_eq!(
            manifests.config_value("Secret", "s", "plain"),
            Some(b"hi".to_vec())
        );
    }
}
