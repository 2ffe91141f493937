//! The kubelet's probes of the application, pointed at the proxy's admin port
//! (`/app-health/<container>/<readyz|livez|startupz>`), which makes them on its behalf over
//! loopback. Without it, in strict mTLS the kubelet's plaintext HTTP and gRPC probes would be
//! refused by the inbound listener, and a TCP probe would only ever test the proxy.
//!
//! - `httpGet` (HTTP or HTTPS, headers kept) and `grpc` probes become the proxy's HTTP probe;
//! - `tcpSocket` probes too: the proxy connects to the application's port;
//! - `exec` probes, and probes with a `host` of their own (which the kubelet sends elsewhere,
//!   not through the pod), are left as they are.
//!
//! Probes rewritten by an earlier injection keep the target recorded then, so injecting twice
//! changes nothing.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::ADMIN_PORT;
use super::containers::{APP_PROBES_ENV, find_proxy, is_ours};

/// What the proxy must ask the application for each admin path.
pub fn rewrite(spec: &mut Map<String, Value>) -> BTreeMap<String, Value> {
    let earlier: Map<String, Value> = find_proxy(spec)
        .and_then(|proxy| proxy.get("env").and_then(Value::as_array))
        .into_iter()
        .flatten()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(APP_PROBES_ENV))
        .and_then(|e| e.get("value").and_then(Value::as_str))
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default();
    let mut probes = BTreeMap::new();
    for list in ["containers", "initContainers"] {
        let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for container in containers.iter_mut() {
            if is_ours(container) {
                continue;
            }
            // Among init containers only native sidecars run beside the app and are probed.
            if list == "initContainers"
                && container.get("restartPolicy").and_then(Value::as_str) != Some("Always")
            {
                continue;
            }
            rewrite_container(container, &earlier, &mut probes);
        }
    }
    probes
}

fn rewrite_container(
    container: &mut Value,
    earlier: &Map<String, Value>,
    probes: &mut BTreeMap<String, Value>,
) {
    let name = container
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let ports = container.get("ports").cloned().unwrap_or(Value::Null);
    for (field, kind) in [
        ("readinessProbe", "readyz"),
        ("livenessProbe", "livez"),
        ("startupProbe", "startupz"),
    ] {
        let Some(probe) = container.get_mut(field).and_then(Value::as_object_mut) else {
            continue;
        };
        let key = format!("/app-health/{name}/{kind}");
        let already = probe
            .get("httpGet")
            .is_some_and(|get| get.get("path").and_then(Value::as_str) == Some(key.as_str()));
        if already {
            if let Some(target) = earlier.get(&key) {
                probes.insert(key, target.clone());
            }
            continue;
        }
        let Some(target) = target(probe, &ports) else {
            continue;
        };
        for handler in ["httpGet", "tcpSocket", "grpc"] {
            probe.remove(handler);
        }
        probe.insert("httpGet".into(), json!({"path": key, "port": ADMIN_PORT}));
        probes.insert(key, target);
    }
}

/// The application port a probe names, by number or by container port name.
fn port(port: Option<&Value>, ports: &Value) -> Option<u64> {
    match port? {
        Value::Number(n) => n.as_u64(),
        Value::String(named) => ports
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(named.as_str()))
            .and_then(|p| p.get("containerPort"))
            .and_then(Value::as_u64),
        _ => None,
    }
}

/// What the proxy asks for this probe; `None` leaves the probe as it is.
fn target(probe: &Map<String, Value>, ports: &Value) -> Option<Value> {
    let has_host = |handler: &Value| {
        handler
            .get("host")
            .and_then(Value::as_str)
            .is_some_and(|h| !h.is_empty())
    };
    if let Some(get) = probe.get("httpGet") {
        if has_host(get) {
            return None;
        }
        let mut target = json!({
            "port": port(get.get("port"), ports)?,
            "path": get.get("path").and_then(Value::as_str).unwrap_or("/"),
        });
        if get.get("scheme").and_then(Value::as_str) == Some("HTTPS") {
            target["kind"] = json!("https");
        }
        let headers: Vec<Value> = get
            .get("httpHeaders")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|h| {
                Some(json!({
                    "name": h.get("name")?.as_str()?,
                    "value": h.get("value").and_then(Value::as_str).unwrap_or_default(),
                }))
            })
            .collect();
        if !headers.is_empty() {
            target["headers"] = Value::Array(headers);
        }
        return Some(target);
    }
    if let Some(tcp) = probe.get("tcpSocket") {
        if has_host(tcp) {
            return None;
        }
        return Some(json!({"port": port(tcp.get("port"), ports)?, "kind": "tcp"}));
    }
    if let Some(grpc) = probe.get("grpc") {
        let mut target = json!({"port": grpc.get("port").and_then(Value::as_u64)?, "kind": "grpc"});
        if let Some(service) = grpc.get("service").and_then(Value::as_str) {
            target["service"] = json!(service);
        }
        return Some(target);
    }
    None
}
