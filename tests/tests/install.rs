//! `sidemesh install` / `uninstall`: the control-plane manifest validates strictly, is the
//! same bytes when run again with the same CA, carries the CA, trust bundle and `caBundle`
//! consistently, refuses a bad routing config with its position, and works: the rendered
//! Deployment's own arguments and volumes (materialised the way the kubelet mounts them)
//! start a control plane whose webhook is trusted through the rendered `caBundle` and whose
//! proxies' API is trusted through the rendered trust bundle.

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use serde_json::Value;
use sidemesh_tests::pki::TestCa;
use sidemesh_tests::{Proc, bin, kubernetes_validate, workspace_root};

fn sidemesh(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("sidemesh"))
        .args(args)
        .output()
        .expect("run sidemesh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).expect("utf-8"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn documents(text: &str) -> Vec<Value> {
    sidemesh_control_plane::k8syaml::read_documents(text).expect("YAML")
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn unb64(value: &Value) -> String {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.as_str().expect("base64 text"))
        .expect("base64");
    String::from_utf8(bytes).expect("utf-8")
}

fn validate(text: &str, dir: &Path, name: &str) {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    if let Some((passed, report)) = kubernetes_validate(&[&path]) {
        assert!(passed, "{report}\n---\n{text}");
    }
}

/// An operator's CA, written as files.
fn ca_files(dir: &Path) -> (TestCa, String, String) {
    let ca = TestCa::root("operator root");
    let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    std::fs::write(&cert, &ca.pem).expect("write");
    std::fs::write(&key, ca.key_pem()).expect("write");
    (
        ca,
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
    )
}

#[test]
fn the_manifest_is_valid_complete_and_stable_with_the_same_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = ca_files(dir.path());
    let args = ["install", "--ca-cert", &cert, "--ca-key", &key];
    let (code, once, err) = sidemesh(&args);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.is_empty(),
        "nothing to say with the operator's CA: {err}"
    );
    let (_, twice, _) = sidemesh(&args);
    assert_eq!(once, twice, "the same inputs give the same bytes");
    validate(&once, dir.path(), "install.yaml");

    let docs = documents(&once);
    let kinds: Vec<String> = docs
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or_default(),
                d["metadata"]["name"].as_str().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "Namespace/sidemesh-system",
            "ServiceAccount/sidemesh-control-plane",
            "ClusterRole/sidemesh-control-plane",
            "ClusterRoleBinding/sidemesh-control-plane",
            "ConfigMap/sidemesh-mesh-config",
            "ConfigMap/sidemesh-trust-bundle",
            "Secret/sidemesh-ca",
            "Deployment/sidemesh-control-plane",
            "Service/sidemesh-control-plane",
            "MutatingWebhookConfiguration/sidemesh-injector",
        ],
        "everything, in an order kubectl can apply"
    );
    let secret = find(&docs, "Secret", "sidemesh-ca");
    assert_eq!(unb64(&secret["data"]["ca.crt"]), ca.pem);
    assert_eq!(unb64(&secret["data"]["ca.key"]), ca.key_pem());
    assert_eq!(
        find(&docs, "ConfigMap", "sidemesh-trust-bundle")["data"]["ca.crt"],
        ca.pem
    );
    let webhook = find(&docs, "MutatingWebhookConfiguration", "sidemesh-injector");
    assert_eq!(
        webhook["webhooks"][0]["clientConfig"]["caBundle"],
        b64(&ca.pem)
    );
    let mesh = find(&docs, "ConfigMap", "sidemesh-mesh-config")["data"]["mesh.yaml"]
        .as_str()
        .expect("mesh.yaml");
    sidemesh_config::parse_str("mesh.yaml", mesh).expect("the default routing config is valid");

    // Another namespace, images and replicas go everywhere they belong.
    let (code, other, err) = sidemesh(&[
        "install",
        "--ca-cert",
        &cert,
        "--ca-key",
        &key,
        "--namespace",
        "mesh-ops",
        "--control-plane-image",
        "registry.example/cp:9",
        "--proxy-image",
        "registry.example/proxy:9",
        "--replicas",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(!other.contains("sidemesh-system"), "{other}");
    validate(&other, dir.path(), "other.yaml");
    let docs = documents(&other);
    let deployment = find(&docs, "Deployment", "sidemesh-control-plane");
    assert_eq!(deployment["metadata"]["namespace"], "mesh-ops");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "registry.example/cp:9");
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.contains(&"--proxy-image=registry.example/proxy:9"),
        "{args:?}"
    );
    assert!(
        args.contains(&"--control-plane-url=https://sidemesh-control-plane.mesh-ops.svc:15010"),
        "{args:?}"
    );
    let webhook = find(&docs, "MutatingWebhookConfiguration", "sidemesh-injector");
    assert_eq!(
        webhook["webhooks"][0]["clientConfig"]["service"]["namespace"],
        "mesh-ops"
    );
    let binding = find(&docs, "ClusterRoleBinding", "sidemesh-control-plane");
    assert_eq!(binding["subjects"][0]["namespace"], "mesh-ops");

    let (code, _, err) = sidemesh(&["install", "--namespace", "Mesh_Ops"]);
    assert_eq!(code, 1);
    assert!(err.contains("not a valid namespace name"), "{err}");
}

#[test]
fn a_generated_ca_is_said_so_and_can_be_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, first, err) = sidemesh(&["install"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("generated a new root CA") && err.contains("--ca-out"),
        "{err}"
    );
    let (_, second, _) = sidemesh(&["install"]);
    assert_ne!(
        first, second,
        "each run without CA files generates a new CA"
    );

    let kept = dir.path().join("ca");
    let kept_s = kept.to_string_lossy().into_owned();
    let (code, with_out, err) = sidemesh(&["install", "--ca-out", &kept_s]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("--ca-cert {kept_s}/ca.crt")), "{err}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(kept.join("ca.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key is private");
    let (cert, key) = (format!("{kept_s}/ca.crt"), format!("{kept_s}/ca.key"));
    let (code, upgrade, err) = sidemesh(&["install", "--ca-cert", &cert, "--ca-key", &key]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        upgrade, with_out,
        "an upgrade with the kept CA changes nothing"
    );
    let (code, _, err) = sidemesh(&["install", "--ca-out", &kept_s]);
    assert_eq!(code, 1, "a kept CA is never overwritten");
    assert!(err.contains("already holds a CA"), "{err}");
    let (code, _, err) = sidemesh(&[
        "install",
        "--ca-cert",
        &cert,
        "--ca-key",
        "/nonexistent/key",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/key"), "{err}");
}

#[test]
fn the_routing_config_is_checked_before_it_is_installed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config");
    std::fs::create_dir_all(&config).expect("mkdir");
    std::fs::write(
        config.join("mesh.yaml"),
        "apiVersion: sidemesh.io/v1\nkind: Mesh\nmesh:\n  mtls: sometimes\n",
    )
    .expect("write");
    let config_s = config.to_string_lossy().into_owned();
    let (code, out, err) = sidemesh(&["install", "--config", &config_s]);
    assert_eq!(code, 1, "{out}");
    assert!(out.is_empty());
    assert!(
        err.contains("mesh.yaml:4:") && err.contains("mtls"),
        "{err}"
    );

    let demo = workspace_root().join("config/examples");
    let demo_s = demo.to_string_lossy().into_owned();
    let (code, out, err) = sidemesh(&["install", "--config", &demo_s]);
    assert_eq!(code, 0, "{err}");
    let docs = documents(&out);
    let data = find(&docs, "ConfigMap", "sidemesh-mesh-config")["data"]
        .as_object()
        .expect("data")
        .clone();
    assert!(!data.is_empty());
    for (name, text) in &data {
        let original = std::fs::read_to_string(demo.join(name)).expect("an example file");
        assert_eq!(
            text.as_str(),
            Some(original.as_str()),
            "{name} is installed as written"
        );
    }
}

#[test]
fn uninstall_names_what_install_made() {
    let (code, out, err) = sidemesh(&["uninstall"]);
    assert_eq!(code, 0, "{err}");
    let names: Vec<String> = documents(&out)
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or_default(),
                d["metadata"]["name"].as_str().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            "MutatingWebhookConfiguration/sidemesh-injector",
            "ClusterRoleBinding/sidemesh-control-plane",
            "ClusterRole/sidemesh-control-plane",
            "Namespace/sidemesh-system",
        ]
    );
    let dir = tempfile::tempdir().expect("tempdir");
    validate(&out, dir.path(), "uninstall.yaml");
}

/// Writes the volumes of `pod` (ConfigMaps and Secrets from `docs`, emptyDirs) under `root`,
/// as the kubelet would mount them; returns (mount path, local folder) pairs.
fn mount(pod: &Value, docs: &[Value], root: &Path) -> Vec<(String, String)> {
    let container = &pod["containers"][0];
    let mut mounts = Vec::new();
    for m in container["volumeMounts"].as_array().expect("mounts") {
        let path = m["mountPath"].as_str().expect("mountPath");
        let local = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(&local).expect("mkdir");
        let volume = pod["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["name"] == m["name"]))
            .expect("volume");
        if let Some(name) = volume["configMap"]["name"].as_str() {
            for (key, text) in find(docs, "ConfigMap", name)["data"]
                .as_object()
                .expect("data")
            {
                std::fs::write(local.join(key), text.as_str().expect("text")).expect("write");
            }
        } else if let Some(name) = volume["secret"]["secretName"].as_str() {
            for (key, data) in find(docs, "Secret", name)["data"]
                .as_object()
                .expect("data")
            {
                std::fs::write(local.join(key), unb64(data)).expect("write");
            }
        }
        mounts.push((path.to_string(), local.to_string_lossy().into_owned()));
    }
    mounts
}

#[tokio::test(flavor = "multi_thread")]
async fn the_installed_control_plane_starts_and_is_trusted_through_the_rendered_bundles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, text, err) = sidemesh(&["install"]);
    assert_eq!(code, 0, "{err}");
    let docs = documents(&text);
    let pod = &find(&docs, "Deployment", "sidemesh-control-plane")["spec"]["template"]["spec"];
    let mounts = mount(pod, &docs, dir.path());
    // The container's own arguments, with its mounts where they were written and its ports
    // picked by the system.
    let args: Vec<String> = pod["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .map(|a| {
            let mut a = a.to_string();
            for (path, local) in &mounts {
                a = a.replace(path.as_str(), local);
            }
            for port in ["15010", "15014", "15017"] {
                a = a.replace(&format!("0.0.0.0:{port}"), "127.0.0.1:0");
            }
            a
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cp = Proc::start_until("sidemesh-control-plane", &args, "ready");

    // The API server's view: the webhook's certificate checks against the rendered caBundle
    // for the Service's name.
    let webhook = find(&docs, "MutatingWebhookConfiguration", "sidemesh-injector");
    let ca_bundle = dir.path().join("ca-bundle.pem");
    std::fs::write(
        &ca_bundle,
        unb64(&webhook["webhooks"][0]["clientConfig"]["caBundle"]),
    )
    .expect("write");
    let port = cp.listener("webhook").port();
    let host = "sidemesh-control-plane.sidemesh-system.svc";
    let review = std::fs::read_to_string(
        workspace_root().join("tests/fixtures/k8s/admissionreview-pod.json"),
    )
    .expect("fixture");
    let out = Command::new("curl")
        .args(["-sS", "--fail-with-body", "--cacert"])
        .arg(&ca_bundle)
        .args([
            "--resolve",
            &format!("{host}:{port}:127.0.0.1"),
            "-H",
            "content-type: application/json",
            "--data-binary",
            &review,
        ])
        .arg(format!("https://{host}:{port}/mutate"))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).expect("json");
    let patch = unb64(&answer["response"]["patch"]);
    let bundle = find(&docs, "ConfigMap", "sidemesh-trust-bundle")["data"]["ca.crt"]
        .as_str()
        .expect("bundle");
    let patch: Value = serde_json::from_str(&patch).expect("patch");
    let injected = patch[0]["value"]["initContainers"][1]["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == "SIDEMESH_TRUST_BUNDLE"))
        .and_then(|e| e["value"].as_str())
        .expect("injected bundle")
        .to_string();
    let ders = |pem: &str| -> Vec<Vec<u8>> {
        pem::parse_many(pem)
            .expect("PEM")
            .into_iter()
            .map(|p| p.into_contents())
            .collect()
    };
    assert_eq!(
        ders(&injected),
        ders(bundle),
        "injected pods get the installed trust bundle"
    );

    // A proxy's view: the proxies' API checks against the trust bundle for the Service name.
    let bundle_file = dir.path().join("bundle.pem");
    std::fs::write(&bundle_file, bundle).expect("write");
    let data_dir = mounts
        .iter()
        .find(|(path, _)| path == "/var/run/sidemesh")
        .map(|(_, local)| local.clone())
        .expect("data dir");
    let proxy = Proc::start_until(
        "sidemesh-proxy",
        &[
            "--control-plane",
            &format!("https://127.0.0.1:{}", cp.listener("grpc").port()),
            "--control-plane-server-name",
            host,
            "--trust-bundle",
            bundle_file.to_str().expect("utf-8"),
            "--join-token-file",
            &format!("{data_dir}/join-token"),
            "--service",
            "web.shop",
            "--outbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        "ready",
    );
    let dump = proxy.config_dump().await.expect("dump");
    assert_eq!(
        dump["identity"]["identity"],
        "spiffe://cluster.local/ns/shop/sa/web"
    );
}
