//! `sidemesh inject`: adds the proxy to every pod template of some Kubernetes manifests.
//!
//! Each pod template (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, and
//! the items of a `List`) gets:
//! - the `sidemesh-init` init container, which runs `sidemesh-proxy init` (only NET_ADMIN and
//!   NET_RAW);
//! - the proxy, as a native sidecar (an init container with `restartPolicy: Always`, Kubernetes
//!   1.29+) or, with `legacy_sidecar`, as the first container;
//! - its settings from the downward API (pod name, namespace, service account, pod IP), a
//!   projected service-account token for the mesh audience, probes on the admin port,
//!   resources, and a strict security context (uid 2102, read-only root filesystem).
//!
//! Injecting twice gives the same result as injecting once: anything Sidemesh added before is
//! replaced. `sidemesh.io/inject: disabled` leaves a template alone; other kinds pass through.

use serde_json::{Map, Value, json};

pub const ANNOTATION_INJECT: &str = "sidemesh.io/inject";
pub const ANNOTATION_INJECTED: &str = "sidemesh.io/injected";
pub const ANNOTATION_SKIP_INBOUND: &str = "sidemesh.io/skip-inbound-ports";
pub const ANNOTATION_SKIP_OUTBOUND: &str = "sidemesh.io/skip-outbound-ports";
pub const ANNOTATION_SKIP_CIDRS: &str = "sidemesh.io/skip-outbound-cidrs";
pub const ANNOTATION_PROXY_CPU: &str = "sidemesh.io/proxy-cpu";
pub const ANNOTATION_PROXY_MEMORY: &str = "sidemesh.io/proxy-memory";
pub const ANNOTATION_SERVICE: &str = "sidemesh.io/service";

const INIT_NAME: &str = "sidemesh-init";
const PROXY_NAME: &str = "sidemesh-proxy";
const TOKEN_VOLUME: &str = "sidemesh-token";
const STATE_VOLUME: &str = "sidemesh-state";
const TOKEN_DIR: &str = "/var/run/secrets/sidemesh";
const STATE_DIR: &str = "/var/run/sidemesh";
pub const PROXY_UID: i64 = 2102;

/// What the injected containers point at.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    pub image: String,
    pub control_plane: String,
    /// Put the proxy among the containers (clusters older than 1.29).
    pub legacy_sidecar: bool,
    /// The mesh's trust bundle (PEM), which the proxy pins for the control plane.
    pub trust_bundle: Option<String>,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            image: format!("ghcr.io/sidemesh/proxy:{}", env!("CARGO_PKG_VERSION")),
            control_plane: "http://sidemesh-control-plane.sidemesh-system.svc:15010".into(),
            legacy_sidecar: false,
            trust_bundle: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("input is not YAML: {0}")]
    Yaml(String),
    #[error("cannot write YAML: {0}")]
    Write(String),
}

/// Injects every document of a multi-document YAML text.
pub fn inject_documents(text: &str, config: &InjectConfig) -> Result<String, InjectError> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let mut value =
            Value::deserialize(document).map_err(|e| InjectError::Yaml(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        inject_object(&mut value, config);
        out.push(serde_norway::to_string(&value).map_err(|e| InjectError::Write(e.to_string()))?);
    }
    Ok(out.join("---\n"))
}

/// Injects one object (or the items of a `List`); returns how many pod templates changed.
pub fn inject_object(object: &mut Value, config: &InjectConfig) -> usize {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if kind == "List" || kind.ends_with("List") {
        return object
            .get_mut("items")
            .and_then(Value::as_array_mut)
            .map_or(0, |items| {
                items.iter_mut().map(|i| inject_object(i, config)).sum()
            });
    }
    let owner_name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let owner_disabled = disabled(object.get("metadata"));
    let template = match kind {
        "Pod" => Some(object),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            object.pointer_mut("/spec/template")
        }
        "CronJob" => object.pointer_mut("/spec/jobTemplate/spec/template"),
        _ => None,
    };
    match template {
        Some(template) if !owner_disabled => {
            usize::from(inject_template(template, &owner_name, config))
        }
        _ => 0,
    }
}

fn disabled(metadata: Option<&Value>) -> bool {
    metadata
        .and_then(|m| {
            m.pointer(&format!(
                "/annotations/{}",
                ANNOTATION_INJECT.replace('/', "~1")
            ))
        })
        .and_then(Value::as_str)
        .is_some_and(|v| matches!(v, "disabled" | "false"))
}

fn annotation<'a>(template: &'a Value, key: &str) -> Option<&'a str> {
    template
        .pointer(&format!("/metadata/annotations/{}", key.replace('/', "~1")))
        .and_then(Value::as_str)
}

/// Injects a pod template (`metadata` + `spec`); false when it opted out or has no spec.
pub fn inject_template(template: &mut Value, owner: &str, config: &InjectConfig) -> bool {
    if disabled(template.get("metadata")) || !template.get("spec").is_some_and(Value::is_object) {
        return false;
    }
    let service = annotation(template, ANNOTATION_SERVICE)
        .or_else(|| {
            template
                .pointer("/metadata/labels/app.kubernetes.io~1name")
                .and_then(Value::as_str)
        })
        .or_else(|| {
            template
                .pointer("/metadata/labels/app")
                .and_then(Value::as_str)
        })
        .unwrap_or(owner)
        .to_string();
    let skip = |key| annotation(template, key).map(str::to_string);
    let (skip_in, skip_out, skip_cidrs) = (
        skip(ANNOTATION_SKIP_INBOUND),
        skip(ANNOTATION_SKIP_OUTBOUND),
        skip(ANNOTATION_SKIP_CIDRS),
    );
    let cpu = skip(ANNOTATION_PROXY_CPU).unwrap_or_else(|| "50m".into());
    let memory = skip(ANNOTATION_PROXY_MEMORY).unwrap_or_else(|| "32Mi".into());

    let spec = template
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .expect("checked above: the template has a spec object");
    let probes = rewrite_probes(spec);
    // Anything injected before goes first, so injecting again changes nothing.
    for list in ["initContainers", "containers"] {
        if let Some(Value::Array(containers)) = spec.get_mut(list) {
            containers.retain(|c| !matches!(c["name"].as_str(), Some(INIT_NAME | PROXY_NAME)));
        }
    }
    if let Some(Value::Array(volumes)) = spec.get_mut("volumes") {
        volumes.retain(|v| !matches!(v["name"].as_str(), Some(TOKEN_VOLUME | STATE_VOLUME)));
    }
    let app_port = spec
        .get("containers")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find_map(|c| c.pointer("/ports/0/containerPort")))
        .and_then(Value::as_u64);

    let init = init_container(
        config,
        skip_in.as_deref(),
        skip_out.as_deref(),
        skip_cidrs.as_deref(),
    );
    let mut proxy = proxy_container(config, &service, app_port, &cpu, &memory);
    if !probes.is_empty() {
        if let Some(env) = proxy["env"].as_array_mut() {
            env.push(json!({
                "name": "SIDEMESH_APP_PROBES",
                "value": serde_json::to_string(&probes).unwrap_or_default(),
            }));
        }
    }
    let init_containers = spec
        .entry("initContainers")
        .or_insert_with(|| Value::Array(Vec::new()));
    if !init_containers.is_array() {
        *init_containers = Value::Array(Vec::new());
    }
    let init_containers = init_containers.as_array_mut().expect("made an array above");
    init_containers.insert(0, init);
    if config.legacy_sidecar {
        let containers = spec
            .entry("containers")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Some(containers) = containers.as_array_mut() {
            containers.insert(0, proxy);
        }
    } else {
        proxy["restartPolicy"] = json!("Always");
        init_containers.insert(1, proxy);
    }
    let volumes = spec
        .entry("volumes")
        .or_insert_with(|| Value::Array(Vec::new()));
    if let Some(volumes) = volumes.as_array_mut() {
        volumes.push(json!({
            "name": TOKEN_VOLUME,
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": "sidemesh", "expirationSeconds": 3600, "path": "token"
            }}]}
        }));
        volumes.push(json!({"name": STATE_VOLUME, "emptyDir": {}}));
    }
    let metadata = template
        .as_object_mut()
        .expect("a template with a spec is an object")
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(metadata) = metadata.as_object_mut() {
        let annotations = metadata
            .entry("annotations")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(annotations) = annotations.as_object_mut() {
            annotations.insert(ANNOTATION_INJECTED.into(), json!("true"));
        }
    }
    true
}

/// Points the application containers' HTTP probes at the proxy's admin port
/// (`/app-health/<container>/<readyz|livez|startupz>`): in strict mTLS mode the kubelet's
/// plaintext probe to the application's port would be refused. Returns what the proxy must
/// ask the application for each path. Probes rewritten by an earlier injection keep the
/// target recorded then.
fn rewrite_probes(spec: &mut Map<String, Value>) -> std::collections::BTreeMap<String, Value> {
    let mut earlier: Map<String, Value> = Map::new();
    for list in ["initContainers", "containers"] {
        for c in spec
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if c["name"] != PROXY_NAME {
                continue;
            }
            let recorded = c["env"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["name"] == "SIDEMESH_APP_PROBES")
                .and_then(|e| e["value"].as_str())
                .and_then(|v| serde_json::from_str::<Map<String, Value>>(v).ok());
            earlier.extend(recorded.unwrap_or_default());
        }
    }
    let mut probes = std::collections::BTreeMap::new();
    let Some(containers) = spec.get_mut("containers").and_then(Value::as_array_mut) else {
        return probes;
    };
    for container in containers.iter_mut() {
        let name = container["name"].as_str().unwrap_or_default().to_string();
        if name == PROXY_NAME {
            continue;
        }
        let ports = container["ports"].clone();
        for (field, kind) in [
            ("readinessProbe", "readyz"),
            ("livenessProbe", "livez"),
            ("startupProbe", "startupz"),
        ] {
            let Some(get) = container
                .get_mut(field)
                .and_then(|p| p.get_mut("httpGet"))
                .and_then(Value::as_object_mut)
            else {
                continue;
            };
            if get.get("scheme").and_then(Value::as_str) == Some("HTTPS") {
                continue; // the proxy only asks over plain HTTP
            }
            let key = format!("/app-health/{name}/{kind}");
            if get.get("path").and_then(Value::as_str) == Some(key.as_str()) {
                if let Some(target) = earlier.get(&key) {
                    probes.insert(key, target.clone());
                }
                continue;
            }
            let port = match get.get("port") {
                Some(Value::Number(n)) => n.as_u64(),
                Some(Value::String(named)) => ports
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["name"] == named.as_str())
                    .and_then(|p| p["containerPort"].as_u64()),
                _ => None,
            };
            let Some(port) = port else {
                continue;
            };
            let path = get
                .get("path")
                .and_then(Value::as_str)
                .unwrap_or("/")
                .to_string();
            probes.insert(key.clone(), json!({"port": port, "path": path}));
            get.insert("port".into(), json!(15020));
            get.insert("path".into(), json!(key));
            get.remove("host");
        }
    }
    probes
}

fn init_container(
    config: &InjectConfig,
    skip_in: Option<&str>,
    skip_out: Option<&str>,
    skip_cidrs: Option<&str>,
) -> Value {
    let mut args = vec![json!("init")];
    for (flag, value) in [
        ("--skip-inbound-ports", skip_in),
        ("--skip-outbound-ports", skip_out),
        ("--skip-outbound-cidrs", skip_cidrs),
    ] {
        if let Some(value) = value.filter(|v| !v.trim().is_empty()) {
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

fn proxy_container(
    config: &InjectConfig,
    service: &str,
    app_port: Option<u64>,
    cpu: &str,
    memory: &str,
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
        json!({"name": "SIDEMESH_SERVICE_ACCOUNT_TOKEN_FILE", "value": format!("{TOKEN_DIR}/token")}),
        json!({"name": "SIDEMESH_STATE_DIR", "value": format!("{STATE_DIR}/state")}),
        json!({"name": "SIDEMESH_OUTBOUND_ADDR", "value": "0.0.0.0:15001"}),
        json!({"name": "SIDEMESH_INBOUND_ADDR", "value": "0.0.0.0:15006"}),
        json!({"name": "SIDEMESH_ADMIN_ADDR", "value": "0.0.0.0:15020"}),
    ];
    if let Some(port) = app_port {
        // Callers reach the pod at its IP and the application's port; iptables hands those
        // connections to the proxy.
        env.push(json!({"name": "SIDEMESH_ADVERTISE_ADDR", "value": format!("$(POD_IP):{port}")}));
    }
    json!({
        "name": PROXY_NAME,
        "image": config.image,
        "env": env,
        "ports": [{"name": "sidemesh-admin", "containerPort": 15020, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 15020}, "periodSeconds": 2, "failureThreshold": 30},
        "livenessProbe": {"httpGet": {"path": "/live", "port": 15020}, "periodSeconds": 10},
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

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: orders}
spec:
  selector: {matchLabels: {app: orders}}
  template:
    metadata:
      labels: {app: order-service}
      annotations: {sidemesh.io/skip-outbound-ports: '5432'}
    spec:
      serviceAccountName: order-service
      containers:
        - name: app
          image: orders:1
          ports: [{containerPort: 8082}]
";

    #[test]
    fn a_deployment_gets_the_init_container_and_a_native_sidecar() {
        let out = inject_documents(DEPLOYMENT, &InjectConfig::default()).expect("inject");
        let v: Value = serde_norway::from_str(&out).expect("yaml");
        let spec = &v["spec"]["template"]["spec"];
        assert_eq!(spec["initContainers"][0]["name"], INIT_NAME);
        assert_eq!(
            spec["initContainers"][0]["args"],
            json!(["init", "--skip-outbound-ports", "5432"])
        );
        let proxy = &spec["initContainers"][1];
        assert_eq!(proxy["name"], PROXY_NAME);
        assert_eq!(proxy["restartPolicy"], "Always");
        assert!(
            out.contains("value: order-service"),
            "service from the app label:\n{out}"
        );
        assert!(out.contains("$(POD_IP):8082"), "{out}");
        assert_eq!(spec["containers"][0]["name"], "app");
        assert_eq!(
            v["spec"]["template"]["metadata"]["annotations"][ANNOTATION_INJECTED],
            "true"
        );
        let again = inject_documents(&out, &InjectConfig::default()).expect("again");
        assert_eq!(again, out, "injecting twice equals injecting once");
    }

    #[test]
    fn opted_out_and_other_kinds_pass_through() {
        let opted_out = DEPLOYMENT.replace(
            "annotations: {sidemesh.io/skip-outbound-ports: '5432'}",
            "annotations: {sidemesh.io/inject: disabled}",
        );
        let out = inject_documents(&opted_out, &InjectConfig::default()).expect("inject");
        assert!(!out.contains(PROXY_NAME), "{out}");
        let service =
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n";
        let out = inject_documents(service, &InjectConfig::default()).expect("inject");
        let back: Value = serde_norway::from_str(&out).expect("yaml");
        let original: Value = serde_norway::from_str(service).expect("yaml");
        assert_eq!(back, original);
    }

    #[test]
    fn legacy_clusters_get_the_proxy_among_the_containers() {
        let config = InjectConfig {
            legacy_sidecar: true,
            ..InjectConfig::default()
        };
        let out = inject_documents(DEPLOYMENT, &config).expect("inject");
        let v: Value = serde_norway::from_str(&out).expect("yaml");
        let spec = &v["spec"]["template"]["spec"];
        assert_eq!(spec["containers"][0]["name"], PROXY_NAME);
        assert!(spec["containers"][0].get("restartPolicy").is_none());
        assert_eq!(spec["initContainers"].as_array().map(Vec::len), Some(1));
    }
}
