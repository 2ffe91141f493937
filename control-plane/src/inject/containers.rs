//! The containers and volumes injection adds.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::{ADMIN_PORT, InjectConfig, PROXY_UID};

const INIT_NAME: &str = "sidemesh-init";
const PROXY_NAME: &str = "sidemesh-proxy";
const TOKEN_VOLUME: &str = "sidemesh-token";
const STATE_VOLUME: &str = "sidemesh-state";
const TOKEN_DIR: &str = "/var/run/secrets/sidemesh";
const STATE_DIR: &str = "/var/run/sidemesh";
/// The env var with the probes the proxy answers for the application (see `probes`).
pub const APP_PROBES_ENV: &str = "SIDEMESH_APP_PROBES";

/// Ports and ranges the init container leaves alone (pod annotations).
#[derive(Debug, Default)]
pub struct Skips {
    pub inbound: Option<String>,
    pub outbound: Option<String>,
    pub cidrs: Option<String>,
}

/// A container injection added (found again on a second injection).
pub fn is_ours(container: &Value) -> bool {
    matches!(
        container.get("name").and_then(Value::as_str),
        Some(INIT_NAME | PROXY_NAME)
    )
}

pub fn is_our_volume(volume: &Value) -> bool {
    matches!(
        volume.get("name").and_then(Value::as_str),
        Some(TOKEN_VOLUME | STATE_VOLUME)
    )
}

/// The proxy's container among `containers` (a legacy sidecar) or `initContainers`.
pub fn find_proxy(spec: &Map<String, Value>) -> Option<&Value> {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|list| spec.get(*list).and_then(Value::as_array))
        .flatten()
        .find(|c| c.get("name").and_then(Value::as_str) == Some(PROXY_NAME))
}

/// The application's first TCP port: callers reach the pod there (UDP ports are not
/// intercepted, so a DNS server's port 53/UDP is not it).
pub fn app_port(spec: &Map<String, Value>) -> Option<u64> {
    spec.get("containers")
        .and_then(Value::as_array)?
        .iter()
        .filter(|c| !is_ours(c))
        .flat_map(|c| {
            c.get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .find(|p| {
            p.get("protocol")
                .and_then(Value::as_str)
                .is_none_or(|proto| proto == "TCP")
        })
        .and_then(|p| p.get("containerPort"))
        .and_then(Value::as_u64)
}

pub fn volumes() -> [Value; 2] {
    [
        json!({
            "name": TOKEN_VOLUME,
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": "sidemesh", "expirationSeconds": 3600, "path": "token"
            }}]}
        }),
        json!({"name": STATE_VOLUME, "emptyDir": {}}),
    ]
}

pub fn init_container(config: &InjectConfig, skips: &Skips) -> Value {
    let mut args = vec![json!("init")];
    for (flag, value) in [
        ("--skip-inbound-ports", &skips.inbound),
        ("--skip-outbound-ports", &skips.outbound),
        ("--skip-outbound-cidrs", &skips.cidrs),
    ] {
        if let Some(value) = value.as_deref().filter(|v| !v.trim().is_empty()) {
            args.push(json!(flag));
            args.push(json!(value.replace(' ', "")));
        }
    }
    json!({
        "name": INIT_NAME,
        "image": config.image,
        "args": args,
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"memory": "64Mi"}
        },
        // iptables needs root in the pod's network namespace, and nothing else.
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": false,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
        }
    })
}

fn field_env(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}})
}

pub fn proxy_container(
    config: &InjectConfig,
    service: &str,
    app_port: Option<u64>,
    cpu: &str,
    memory: &str,
    probes: &BTreeMap<String, Value>,
) -> Value {
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("SIDEMESH_NAMESPACE", "metadata.namespace"),
        field_env("SIDEMESH_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field_env("POD_IP", "status.podIP"),
        json!({"name": "SIDEMESH_PROXY_ID", "value": "$(POD_NAME)"}),
        json!({"name": "SIDEMESH_SERVICE", "value": service}),
        json!({"name": "SIDEMESH_MODE", "value": "transparent"}),
        json!({"name": "SIDEMESH_CONTROL_PLANE", "value": config.control_plane}),
        // The roots the control plane's certificate must chain to (public, like Linkerd's
        // trust anchors in its proxies' environment).
        json!({"name": "SIDEMESH_TRUST_BUNDLE", "value": config.trust_bundle}),
        json!({"name": "SIDEMESH_SERVICE_ACCOUNT_TOKEN_FILE", "value": format!("{TOKEN_DIR}/token")}),
        json!({"name": "SIDEMESH_STATE_DIR", "value": format!("{STATE_DIR}/state")}),
        json!({"name": "SIDEMESH_OUTBOUND_ADDR", "value": "0.0.0.0:15001"}),
        json!({"name": "SIDEMESH_INBOUND_ADDR", "value": "0.0.0.0:15006"}),
        json!({"name": "SIDEMESH_ADMIN_ADDR", "value": format!("0.0.0.0:{ADMIN_PORT}")}),
    ];
    if let Some(port) = app_port {
        // Callers reach the pod at its IP and the application's port; iptables hands those
        // connections to the proxy.
        env.push(json!({"name": "SIDEMESH_ADVERTISE_ADDR", "value": format!("$(POD_IP):{port}")}));
    }
    if !probes.is_empty() {
        env.push(json!({
            "name": APP_PROBES_ENV,
            "value": serde_json::to_string(probes).unwrap_or_default(),
        }));
    }
    json!({
        "name": PROXY_NAME,
        "image": config.image,
        "env": env,
        "ports": [{"name": "sidemesh-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": ADMIN_PORT}, "periodSeconds": 2, "failureThreshold": 30},
        "livenessProbe": {"httpGet": {"path": "/live", "port": ADMIN_PORT}, "periodSeconds": 10},
        "resources": {
            "requests": {"cpu": cpu, "memory": memory},
            "limits": {"memory": "128Mi"}
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
            {"name": STATE_VOLUME, "mountPath": STATE_DIR}
        ],
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}
        }
    })
}
