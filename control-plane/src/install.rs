//! `sidemesh install` and `sidemesh uninstall`: the whole control plane as one manifest, so
//! `sidemesh install | kubectl apply -f -` is the installation, like `linkerd install`.
//!
//! The manifests are the kustomize base under `deploy/control-plane/` (one source for both
//! ways of installing), filled in with what the base cannot know: the CA Secret (generated, or
//! from `--ca-cert`/`--ca-key`), the trust bundle ConfigMap, the webhook's `caBundle`, the
//! images, the namespace and the routing config. The output depends only on its inputs, so
//! running it again with the same CA files gives the same bytes.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{Value, json};

/// The kustomize base, embedded (the routing ConfigMap of the base is the demo's, so install
/// writes its own).
const BASE: &[(&str, &str)] = &[
    (
        "namespace.yaml",
        include_str!("../../deploy/control-plane/namespace.yaml"),
    ),
    (
        "rbac.yaml",
        include_str!("../../deploy/control-plane/rbac.yaml"),
    ),
    (
        "control-plane.yaml",
        include_str!("../../deploy/control-plane/control-plane.yaml"),
    ),
    (
        "webhook.yaml",
        include_str!("../../deploy/control-plane/webhook.yaml"),
    ),
];

const BASE_NAMESPACE: &str = "sidemesh-system";
const BASE_CONTROL_PLANE_IMAGE: &str = "ghcr.io/sidemesh/control-plane:0.1.0";
const BASE_PROXY_IMAGE: &str = "ghcr.io/sidemesh/proxy:0.1.0";
pub const CA_SECRET: &str = "sidemesh-ca";
pub const TRUST_BUNDLE_CONFIG_MAP: &str = "sidemesh-trust-bundle";
pub const MESH_CONFIG_MAP: &str = "sidemesh-mesh-config";

/// The routing config installed when none is given: an empty mesh, mTLS where both sides
/// are meshed and plaintext still accepted (Istio's default), so installing breaks nothing.
pub const DEFAULT_MESH: &str = "# The mesh's routing config: edit it with `kubectl -n sidemesh-system edit configmap sidemesh-mesh-config`,\n# or install with `sidemesh install --config <folder>`. Reference: `sidemesh schema --markdown`.\napiVersion: sidemesh.io/v1\nkind: Mesh\nmesh:\n  trustDomain: cluster.local\n  mtls: permissive\n";

#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// The control plane's namespace.
    #[arg(long, default_value = BASE_NAMESPACE)]
    pub namespace: String,
    /// The CA's signing certificate (PEM): a root, or an intermediate with --ca-roots.
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The CA's private key (PEM).
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// The trust bundle (PEM roots) when --ca-cert is an intermediate.
    #[arg(long, requires = "ca_cert")]
    pub ca_roots: Option<PathBuf>,
    /// Without --ca-cert: write the generated CA (ca.crt, ca.key) to this new folder, so a
    /// later `sidemesh install` (an upgrade) can keep it.
    #[arg(long, conflicts_with = "ca_cert")]
    pub ca_out: Option<PathBuf>,
    /// Routing YAML (a file, or a folder of *.yaml) for the mesh's ConfigMap; checked first.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value = BASE_CONTROL_PLANE_IMAGE)]
    pub control_plane_image: String,
    #[arg(long, default_value = BASE_PROXY_IMAGE)]
    pub proxy_image: String,
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the certificate authority: {0}")]
    Ca(#[from] crate::ca::CaError),
    #[error("{0}")]
    Config(String),
    #[error(
        "--ca-out {0}: the folder already holds a CA; install with --ca-cert {0}/ca.crt --ca-key {0}/ca.key to keep it"
    )]
    CaOutExists(PathBuf),
    #[error("the base manifests: {0}")]
    Base(String),
    #[error("{0}")]
    Namespace(String),
}

/// The installation manifest, and a note for the operator (what was generated).
#[derive(Debug)]
pub struct Rendered {
    pub text: String,
    pub notes: Vec<String>,
}

fn read(path: &Path) -> Result<String, InstallError> {
    std::fs::read_to_string(path).map_err(|source| InstallError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The CA's files: (ca.crt, ca.key, roots.crt if separate), and whether it was generated.
fn ca_files(args: &InstallArgs) -> Result<(String, String, Option<String>, bool), InstallError> {
    let (dir, generated, _scratch) = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => {
            let (cert, key) = (read(cert)?, read(key)?);
            let roots = args.ca_roots.as_deref().map(read).transpose()?;
            // Loaded the way the control plane will load it, so a bad CA fails here.
            let scratch = tempfile::tempdir().map_err(|source| InstallError::Read {
                path: std::env::temp_dir(),
                source,
            })?;
            std::fs::write(scratch.path().join("ca.crt"), &cert).map_err(|source| {
                InstallError::Read {
                    path: scratch.path().join("ca.crt"),
                    source,
                }
            })?;
            crate::ca::write_private(&scratch.path().join("ca.key"), key.as_bytes()).map_err(
                |source| InstallError::Read {
                    path: scratch.path().join("ca.key"),
                    source,
                },
            )?;
            if let Some(roots) = &roots {
                std::fs::write(scratch.path().join("roots.crt"), roots).map_err(|source| {
                    InstallError::Read {
                        path: scratch.path().join("roots.crt"),
                        source,
                    }
                })?;
            }
            crate::ca::Authority::load(scratch.path(), std::time::Duration::from_secs(3600))?;
            return Ok((cert, key, roots, false));
        }
        _ => match &args.ca_out {
            Some(dir) => {
                if dir.join("ca.crt").exists() || dir.join("ca.key").exists() {
                    return Err(InstallError::CaOutExists(dir.clone()));
                }
                (dir.clone(), true, None)
            }
            None => {
                let scratch = tempfile::tempdir().map_err(|source| InstallError::Read {
                    path: std::env::temp_dir(),
                    source,
                })?;
                (scratch.path().to_path_buf(), true, Some(scratch))
            }
        },
    };
    crate::ca::Authority::load_or_generate(&dir, std::time::Duration::from_secs(3600))?;
    Ok((
        read(&dir.join("ca.crt"))?,
        read(&dir.join("ca.key"))?,
        None,
        generated,
    ))
}

/// The routing ConfigMap's files: `--config` (checked like `sidemesh validate`) or the default.
fn mesh_files(args: &InstallArgs) -> Result<Vec<(String, String)>, InstallError> {
    let Some(path) = &args.config else {
        return Ok(vec![(
            "mesh.yaml".into(),
            DEFAULT_MESH.replace(BASE_NAMESPACE, &args.namespace),
        )]);
    };
    match sidemesh_config::load(path) {
        Ok(_) => {}
        Err(sidemesh_config::LoadError::Invalid(diagnostics)) => {
            let lines: Vec<String> = diagnostics.0.iter().map(ToString::to_string).collect();
            return Err(InstallError::Config(format!(
                "--config {} is not a valid mesh:\n{}",
                path.display(),
                lines.join("\n")
            )));
        }
        Err(other) => {
            return Err(InstallError::Config(format!(
                "--config {}: {other}",
                path.display()
            )));
        }
    }
    let sources = sidemesh_config::read_sources(path)
        .map_err(|e| InstallError::Config(format!("--config {}: {e}", path.display())))?;
    Ok(sources
        .into_iter()
        .map(|s| {
            let name = s
                .file
                .file_name()
                .map_or_else(|| "mesh.yaml".into(), |n| n.to_string_lossy().into_owned());
            (name, s.text)
        })
        .collect())
}

/// Replaces `from` with `to` in every string of `value`.
fn replace_strings(value: &mut Value, from: &str, to: &str) {
    match value {
        Value::String(s) if s.contains(from) => *s = s.replace(from, to),
        Value::Array(items) => items.iter_mut().for_each(|v| replace_strings(v, from, to)),
        Value::Object(map) => map.values_mut().for_each(|v| replace_strings(v, from, to)),
        _ => {}
    }
}

fn labels() -> Value {
    json!({"app.kubernetes.io/part-of": "sidemesh"})
}

/// A short, stable digest of the CA, as a pod-template annotation: a new CA restarts the
/// control plane so it serves with it.
fn digest(parts: &[&str]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p.as_bytes());
    }
    ctx.finish().as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn render(args: &InstallArgs) -> Result<Rendered, InstallError> {
    let ns = args.namespace.as_str();
    if ns.is_empty()
        || ns.len() > 63
        || !ns
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        || ns.starts_with('-')
        || ns.ends_with('-')
    {
        return Err(InstallError::Namespace(format!(
            "--namespace `{ns}` is not a valid namespace name (lowercase letters, digits and `-`, at most 63)"
        )));
    }
    let (cert, key, roots, generated) = ca_files(args)?;
    let bundle = roots.clone().unwrap_or_else(|| cert.clone());
    let mesh = mesh_files(args)?;

    let mut base = Vec::new();
    for (name, text) in BASE {
        let docs = crate::k8syaml::read_documents(text)
            .map_err(|e| InstallError::Base(format!("{name}: {e}")))?;
        base.extend(docs);
    }
    for doc in &mut base {
        replace_strings(doc, BASE_NAMESPACE, ns);
        replace_strings(doc, BASE_CONTROL_PLANE_IMAGE, &args.control_plane_image);
        replace_strings(doc, BASE_PROXY_IMAGE, &args.proxy_image);
    }
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut secret_data = serde_json::Map::new();
    secret_data.insert("ca.crt".into(), json!(b64(&cert)));
    secret_data.insert("ca.key".into(), json!(b64(&key)));
    if let Some(roots) = &roots {
        secret_data.insert("roots.crt".into(), json!(b64(roots)));
    }
    let mesh_data: serde_json::Map<String, Value> = mesh
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let extra = [
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": MESH_CONFIG_MAP, "namespace": ns, "labels": labels()},
            "data": mesh_data,
        }),
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": TRUST_BUNDLE_CONFIG_MAP, "namespace": ns, "labels": labels(),
                "annotations": {"sidemesh.io/description": "The mesh's root certificates: what proxies and the API server trust. Give it to `sidemesh inject --trust-bundle`."}},
            "data": {"ca.crt": bundle},
        }),
        json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": CA_SECRET, "namespace": ns, "labels": labels()},
            "data": secret_data,
        }),
    ];
    let ca_digest = digest(&[&cert, &bundle]);
    let mut out = Vec::new();
    for mut doc in base {
        match doc["kind"].as_str() {
            Some("Deployment") => {
                doc["spec"]["replicas"] = json!(args.replicas);
                doc["spec"]["template"]["metadata"]["annotations"] =
                    json!({"sidemesh.io/ca-digest": ca_digest});
            }
            Some("MutatingWebhookConfiguration") => {
                for hook in doc["webhooks"].as_array_mut().into_iter().flatten() {
                    hook["clientConfig"]["caBundle"] = json!(b64(&bundle));
                }
            }
            _ => {}
        }
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        out.push(doc);
        // The ConfigMaps and the Secret go after the RBAC, before the Deployment that mounts
        // them.
        if kind == "ClusterRoleBinding" {
            out.extend(extra.iter().cloned());
        }
    }
    let text = crate::k8syaml::write_documents(&out).map_err(InstallError::Base)?;
    let mut notes = Vec::new();
    if generated {
        notes.push(match &args.ca_out {
            Some(dir) => format!(
                "generated a new root CA in {}: keep it, and upgrade with `sidemesh install --ca-cert {0}/ca.crt --ca-key {0}/ca.key`",
                dir.display()
            ),
            None => "generated a new root CA. Applying this over an existing installation replaces its CA (workloads would need new certificates); to keep one, pass --ca-out <folder> now and --ca-cert/--ca-key later".into(),
        });
    }
    Ok(Rendered { text, notes })
}

/// What `sidemesh uninstall` prints: the installed objects by name, for `kubectl delete -f -`.
/// The webhook goes first, so pod creation is never sent to a control plane being removed.
pub fn uninstall(namespace: &str) -> Result<String, InstallError> {
    let docs = vec![
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration", "metadata": {"name": "sidemesh-injector"}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "sidemesh-control-plane"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "sidemesh-control-plane"}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "sidemesh-control-plane"}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
    ];
    crate::k8syaml::write_documents(&docs).map_err(InstallError::Base)
}
