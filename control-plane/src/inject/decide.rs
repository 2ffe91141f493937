//! Whether a pod template may be injected at all.
//!
//! - opted out (`sidemesh.io/inject: disabled` as an annotation or a label): left alone;
//! - `hostNetwork: true`: left alone, because the pod shares the node's network namespace and
//!   the init container would rewrite the node's iptables (Istio and Linkerd skip them too);
//! - already carrying another mesh's proxy (Linkerd, Istio, Consul, Kuma), or asking that
//!   mesh's injector for one: refused unless forced, because two proxies would intercept each
//!   other's traffic.

use serde_json::Value;

use super::{ANNOTATION_INJECT, InjectConfig};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Inject,
    /// Injected although another mesh is there (`--force`); the note says so.
    Forced(String),
    Skip(String),
    Refuse(String),
}

/// Containers other meshes inject, and whose they are.
const OTHER_MESH_CONTAINERS: &[(&str, &str)] = &[
    ("linkerd-proxy", "Linkerd"),
    ("linkerd-init", "Linkerd"),
    ("linkerd-network-validator", "Linkerd"),
    ("istio-proxy", "Istio"),
    ("istio-init", "Istio"),
    ("istio-validation", "Istio"),
    ("consul-dataplane", "Consul"),
    ("consul-connect-inject-init", "Consul"),
    ("envoy-sidecar", "Consul"),
    ("kuma-sidecar", "Kuma"),
    ("kuma-init", "Kuma"),
];

/// Annotations or labels by which a pod asks another mesh's injector for its proxy (or shows
/// it has one).
const OTHER_MESH_MARKS: &[(&str, &str, &str)] = &[
    ("linkerd.io/inject", "enabled", "Linkerd"),
    ("linkerd.io/proxy-version", "", "Linkerd"),
    ("sidecar.istio.io/inject", "true", "Istio"),
    ("sidecar.istio.io/status", "", "Istio"),
    ("consul.hashicorp.com/connect-inject", "true", "Consul"),
    ("kuma.io/sidecar-injection", "enabled", "Kuma"),
];

fn value_of<'a>(metadata: Option<&'a Value>, field: &str, key: &str) -> Option<&'a str> {
    metadata?.get(field)?.get(key)?.as_str()
}

/// `sidemesh.io/inject: disabled` (or `false`) as an annotation or a label.
pub fn opted_out(metadata: Option<&Value>) -> bool {
    ["annotations", "labels"].iter().any(|field| {
        value_of(metadata, field, ANNOTATION_INJECT)
            .is_some_and(|v| matches!(v, "disabled" | "false"))
    })
}

/// Another mesh this template belongs to, with the evidence.
fn other_mesh(template: &Value) -> Option<(String, &'static str)> {
    let spec = template.get("spec")?;
    for list in ["initContainers", "containers"] {
        for container in spec
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = container
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if let Some((_, mesh)) = OTHER_MESH_CONTAINERS.iter().find(|(n, _)| *n == name) {
                return Some((format!("container `{name}`"), mesh));
            }
        }
    }
    let metadata = template.get("metadata");
    for field in ["annotations", "labels"] {
        for (key, wanted, mesh) in OTHER_MESH_MARKS {
            if let Some(value) = value_of(metadata, field, key) {
                if wanted.is_empty() || value == *wanted {
                    return Some((format!("{key}: {value}"), mesh));
                }
            }
        }
    }
    None
}

pub fn decide(template: &Value, config: &InjectConfig) -> Decision {
    if opted_out(template.get("metadata")) {
        return Decision::Skip(format!("opted out ({ANNOTATION_INJECT}: disabled)"));
    }
    if template.pointer("/spec/hostNetwork") == Some(&Value::Bool(true)) {
        return Decision::Skip(
            "hostNetwork: true — the pod shares the node's network, so the init container would rewrite the node's iptables".into(),
        );
    }
    if let Some((evidence, mesh)) = other_mesh(template) {
        let why = format!(
            "it already belongs to {mesh} ({evidence}); two meshes' proxies in one pod would intercept each other's traffic. Remove {mesh}'s injection first, or pass --force"
        );
        return if config.force {
            Decision::Forced(format!(
                "injected despite {mesh} ({evidence}), as --force asked"
            ))
        } else {
            Decision::Refuse(why)
        };
    }
    Decision::Inject
}
