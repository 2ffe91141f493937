//! `sidemesh inject`: adds the proxy to every pod template of some Kubernetes manifests (and,
//! as a JSONPatch, to pods the admission webhook sees).
//!
//! - `mod.rs`: documents and objects; which templates are injected, skipped or refused, and
//!   the notes that say why.
//! - `decide`: the checks before a template is touched (opt-out, `hostNetwork`, another mesh).
//! - `containers`: the init container and the proxy container.
//! - `probes`: the application's probes pointed at the proxy's admin port.
//!
//! Each pod template (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet,
//! ReplicationController, Job, CronJob, and the items of a `List`) gets the `sidemesh-init`
//! init container (iptables, NET_ADMIN and NET_RAW only), the proxy as a native sidecar (or,
//! with `legacy_sidecar`, as the first container), its settings from the downward API, a
//! projected service-account token for the mesh audience, the mesh's trust bundle, and a strict
//! security context. Injecting twice gives the same result as injecting once.
//!
//! Manifests are read as Kubernetes reads them (`k8syaml`: YAML 1.1 scalars, anchors, merge
//! keys), so every value keeps its meaning: `defaultMode: 0755` stays the number 493.

mod containers;
mod decide;
mod probes;

use serde_json::{Map, Value, json};

pub use decide::Decision;

pub const ANNOTATION_INJECT: &str = "sidemesh.io/inject";
pub const ANNOTATION_INJECTED: &str = "sidemesh.io/injected";
pub const ANNOTATION_SKIP_INBOUND: &str = "sidemesh.io/skip-inbound-ports";
pub const ANNOTATION_SKIP_OUTBOUND: &str = "sidemesh.io/skip-outbound-ports";
pub const ANNOTATION_SKIP_CIDRS: &str = "sidemesh.io/skip-outbound-cidrs";
pub const ANNOTATION_PROXY_CPU: &str = "sidemesh.io/proxy-cpu";
pub const ANNOTATION_PROXY_MEMORY: &str = "sidemesh.io/proxy-memory";
pub const ANNOTATION_SERVICE: &str = "sidemesh.io/service";

pub const PROXY_UID: i64 = 2102;
/// The proxy's admin port, where the rewritten probes go.
pub const ADMIN_PORT: u64 = 15020;

/// What the injected containers point at.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    pub image: String,
    pub control_plane: String,
    /// Put the proxy among the containers (clusters older than 1.29).
    pub legacy_sidecar: bool,
    /// The mesh's trust bundle (PEM): the proxy pins it for the control plane.
    pub trust_bundle: String,
    /// Inject even pods that already carry another mesh's proxy.
    pub force: bool,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            image: format!("ghcr.io/sidemesh/proxy:{}", env!("CARGO_PKG_VERSION")),
            control_plane: "https://sidemesh-control-plane.sidemesh-system.svc:15010".into(),
            legacy_sidecar: false,
            trust_bundle: String::new(),
            force: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("input is not a Kubernetes manifest: {0}")]
    Yaml(#[from] crate::k8syaml::ReadError),
    #[error("cannot write YAML: {0}")]
    Write(String),
    #[error(
        "no trust bundle: injected proxies need the mesh's root certificates to check the control plane (pass --trust-bundle ca.crt)"
    )]
    NoTrustBundle,
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Refused(Vec<Note>),
}

/// Something an operator should know about one object: why it was left alone, refused, or
/// what to watch out for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// `Deployment demo/web`.
    pub object: String,
    pub message: String,
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// The injected text and the notes about it.
#[derive(Debug)]
pub struct Injected {
    pub text: String,
    pub injected: usize,
    pub notes: Vec<Note>,
}

/// What became of one pod template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected { notes: Vec<String> },
    Skipped(String),
    Refused(String),
}

/// Injects every document of a multi-document YAML text. A refusal (another mesh's proxy)
/// fails the whole text, so nothing is applied half-injected.
pub fn inject_documents(text: &str, config: &InjectConfig) -> Result<Injected, InjectError> {
    if config.trust_bundle.trim().is_empty() {
        return Err(InjectError::NoTrustBundle);
    }
    let mut documents = crate::k8syaml::read_documents(text)?;
    let (mut injected, mut notes, mut refusals) = (0, Vec::new(), Vec::new());
    for document in &mut documents {
        for (object, outcome) in inject_object(document, config) {
            match outcome {
                Outcome::Injected { notes: extra } => {
                    injected += 1;
                    notes.extend(extra.into_iter().map(|message| Note {
                        object: object.clone(),
                        message,
                    }));
                }
                Outcome::Skipped(why) => notes.push(Note {
                    object,
                    message: format!("left alone: {why}"),
                }),
                Outcome::Refused(why) => refusals.push(Note {
                    object,
                    message: format!("refused: {why}"),
                }),
            }
        }
    }
    if !refusals.is_empty() {
        return Err(InjectError::Refused(refusals));
    }
    let text = crate::k8syaml::write_documents(&documents).map_err(InjectError::Write)?;
    Ok(Injected {
        text,
        injected,
        notes,
    })
}

/// `Kind namespace/name` of an object, for notes.
fn describe(object: &Value, kind: &str) -> String {
    let name = object
        .pointer("/metadata/name")
        .or_else(|| object.pointer("/metadata/generateName"))
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)");
    match object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
    {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Injects one object (or the items of a `List`): what became of each pod template in it.
pub fn inject_object(object: &mut Value, config: &InjectConfig) -> Vec<(String, Outcome)> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if kind == "List" || kind.ends_with("List") {
        return object
            .get_mut("items")
            .and_then(Value::as_array_mut)
            .map(|items| {
                items
                    .iter_mut()
                    .flat_map(|i| inject_object(i, config))
                    .collect()
            })
            .unwrap_or_default();
    }
    let name = describe(object, &kind);
    let owner = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let owner_opted_out = decide::opted_out(object.get("metadata"));
    let runs_to_completion = matches!(kind.as_str(), "Job" | "CronJob");
    let template = match kind.as_str() {
        "Pod" => Some(&mut *object),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => object.pointer_mut("/spec/template"),
        "CronJob" => object.pointer_mut("/spec/jobTemplate/spec/template"),
        _ => None,
    };
    let Some(template) = template else {
        return Vec::new();
    };
    if owner_opted_out {
        return vec![(
            name,
            Outcome::Skipped(format!("opted out ({ANNOTATION_INJECT}: disabled)")),
        )];
    }
    let outcome = inject_template(template, &owner, runs_to_completion, config);
    vec![(name, outcome)]
}

fn annotation<'a>(template: &'a Value, key: &str) -> Option<&'a str> {
    template
        .pointer(&format!("/metadata/annotations/{}", key.replace('/', "~1")))
        .and_then(Value::as_str)
}

/// Injects a pod template (`metadata` + `spec`). `runs_to_completion`: a Job's pods, which
/// must be able to finish.
pub fn inject_template(
    template: &mut Value,
    owner: &str,
    runs_to_completion: bool,
    config: &InjectConfig,
) -> Outcome {
    let forced = match decide::decide(template, config) {
        Decision::Inject => None,
        Decision::Forced(note) => Some(note),
        Decision::Skip(why) => return Outcome::Skipped(why),
        Decision::Refuse(why) => return Outcome::Refused(why),
    };
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
    let setting = |key| annotation(template, key).map(str::to_string);
    let skips = containers::Skips {
        inbound: setting(ANNOTATION_SKIP_INBOUND),
        outbound: setting(ANNOTATION_SKIP_OUTBOUND),
        cidrs: setting(ANNOTATION_SKIP_CIDRS),
    };
    let cpu = setting(ANNOTATION_PROXY_CPU).unwrap_or_else(|| "50m".into());
    let memory = setting(ANNOTATION_PROXY_MEMORY).unwrap_or_else(|| "32Mi".into());
    let restart_never = template
        .pointer("/spec/restartPolicy")
        .and_then(Value::as_str)
        .is_some_and(|p| p != "Always");

    let Some(spec) = template.get_mut("spec").and_then(Value::as_object_mut) else {
        return Outcome::Skipped("the pod template has no spec".into());
    };
    let mut notes: Vec<String> = forced.into_iter().collect();
    let probes = probes::rewrite(spec);
    // Anything injected before goes first, so injecting again changes nothing.
    for list in ["initContainers", "containers"] {
        if let Some(Value::Array(containers)) = spec.get_mut(list) {
            containers.retain(|c| !containers::is_ours(c));
        }
    }
    if let Some(Value::Array(volumes)) = spec.get_mut("volumes") {
        volumes.retain(|v| !containers::is_our_volume(v));
    }
    let app_port = containers::app_port(spec);
    let init = containers::init_container(config, &skips);
    let mut proxy = containers::proxy_container(config, &service, app_port, &cpu, &memory, &probes);

    if !spec.get("initContainers").is_some_and(Value::is_array) {
        spec.insert("initContainers".into(), Value::Array(Vec::new()));
    }
    let had_init = spec["initContainers"]
        .as_array()
        .is_some_and(|list| !list.is_empty());
    let init_containers = spec
        .get_mut("initContainers")
        .and_then(Value::as_array_mut)
        .expect("made an array above");
    // Ours run first: the rules are in place, then (native sidecar) the proxy starts, and the
    // application's own init containers already have it.
    init_containers.insert(0, init);
    if config.legacy_sidecar {
        if had_init {
            notes.push("its init containers run before the proxy (legacy sidecar): their outbound TCP is redirected to a proxy that is not running yet; exclude their ports with sidemesh.io/skip-outbound-ports, or use native sidecars (Kubernetes 1.29+)".into());
        }
        if runs_to_completion || restart_never {
            notes.push("a legacy sidecar keeps the pod running after the job's containers finish: end the job with `curl -X POST http://127.0.0.1:15020/shutdown`, or use native sidecars (Kubernetes 1.29+), which stop with the job".into());
        }
        if !spec.get("containers").is_some_and(Value::is_array) {
            spec.insert("containers".into(), Value::Array(Vec::new()));
        }
        if let Some(containers) = spec.get_mut("containers").and_then(Value::as_array_mut) {
            containers.insert(0, proxy);
        }
    } else {
        proxy["restartPolicy"] = json!("Always");
        // The kubelet starts the application only once the proxy is ready.
        proxy["startupProbe"] = json!({
            "httpGet": {"path": "/ready", "port": ADMIN_PORT},
            "periodSeconds": 1,
            "failureThreshold": 600
        });
        init_containers.insert(1, proxy);
    }
    let volumes = spec
        .entry("volumes")
        .or_insert_with(|| Value::Array(Vec::new()));
    if let Some(volumes) = volumes.as_array_mut() {
        volumes.extend(containers::volumes());
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
    Outcome::Injected { notes }
}

#[cfg(test)]
mod tests;
