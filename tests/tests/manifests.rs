//! Every Kubernetes manifest under `deploy/` validates strictly against the Kubernetes schemas
//! (`kubernetes-validate`, from PyPI; `.ci/run` installs it).

use std::path::{Path, PathBuf};
use std::process::Command;

use sidemesh_tests::{kubernetes_validate, skip, workspace_root};

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml")
            && path.file_name().is_some_and(|n| n != "kustomization.yaml")
        {
            out.push(path);
        }
    }
}

#[test]
fn deploy_manifests_validate_strictly() {
    let mut files = Vec::new();
    yaml_files(&workspace_root().join("deploy"), &mut files);
    assert!(!files.is_empty(), "no manifests under deploy/");
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let Some((passed, text)) = kubernetes_validate(&paths) else {
        return;
    };
    assert!(passed, "{text}");
    for file in &files {
        assert!(
            text.contains(&format!("{} passed", file.display())),
            "{} was not validated:\n{text}",
            file.display()
        );
    }
}

fn documents(path: &Path) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path).expect("read manifest");
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde_json::Value::deserialize(d).expect("YAML"))
        .collect()
}

#[test]
fn the_cluster_routing_config_is_valid_and_sends_spans_to_the_deployed_jaeger() {
    let root = workspace_root().join("deploy");
    let config_map = documents(&root.join("control-plane/mesh-config.yaml"));
    let text = config_map[0]["data"]["mesh.yaml"]
        .as_str()
        .expect("mesh.yaml in the ConfigMap");
    let mesh = sidemesh_config::parse_str("deploy/control-plane/mesh-config.yaml", text)
        .unwrap_or_else(|e| panic!("the cluster's routing config is invalid:\n{e}"));
    let endpoint = mesh
        .settings
        .tracing
        .otlp_endpoint
        .clone()
        .expect("an OTLP endpoint");

    // The endpoint is the Jaeger Service of deploy/jaeger, on its OTLP/gRPC port.
    let jaeger = documents(&root.join("jaeger/jaeger.yaml"));
    let service = jaeger
        .iter()
        .find(|d| d["kind"] == "Service")
        .expect("a Jaeger Service");
    let name = service["metadata"]["name"].as_str().expect("name");
    let namespace = service["metadata"]["namespace"]
        .as_str()
        .expect("namespace");
    let grpc_port = service["spec"]["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["targetPort"] == "otlp-grpc"))
        .and_then(|p| p["port"].as_u64())
        .expect("an OTLP/gRPC port");
    assert_eq!(
        endpoint,
        format!("http://{name}.{namespace}.svc.cluster.local:{grpc_port}")
    );
}

#[test]
fn the_kustomize_base_renders_and_validates_strictly() {
    if Command::new("kubectl").arg("--help").output().is_err() {
        skip("`kubectl` is not installed (kubernetes-client from Debian)");
        return;
    }
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(workspace_root().join("deploy"))
        .output()
        .expect("kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/ failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout).expect("utf-8");
    let kinds: Vec<&str> = rendered
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
        "MutatingWebhookConfiguration",
    ] {
        assert!(kinds.contains(&kind), "no {kind} in the render: {kinds:?}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &rendered).expect("write");
    let Some((passed, text)) = kubernetes_validate(&[&file]) else {
        return;
    };
    assert!(passed, "{text}");
    assert_eq!(
        text.matches(" passed for resource ").count(),
        kinds.len(),
        "every rendered resource validated:\n{text}"
    );
}
