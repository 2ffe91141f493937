//! The admission webhook, served by the control plane over TLS, called like the API server
//! calls it (`curl` with the mesh CA as trust root, a real AdmissionReview v1 body): the
//! JSONPatch it returns, applied to the pod, gives a pod that validates strictly and carries
//! the proxy.

use std::process::Command;

use base64::Engine as _;
use serde_json::{Value, json};
use sidemesh_tests::mesh::Mesh;
use sidemesh_tests::{kubernetes_validate, workspace_root};

fn post(url: &str, ca: &std::path::Path, body: &str) -> Value {
    let out = Command::new("curl")
        .args(["-sS", "--fail-with-body", "--cacert"])
        .arg(ca)
        .args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
            url,
        ])
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON answer")
}

/// Applies the two operations the webhook emits (`replace /spec`, `add /metadata/annotations`).
fn apply(pod: &mut Value, patch: &[Value]) {
    for op in patch {
        let path = op["path"].as_str().expect("path");
        let target = pod
            .pointer_mut(path.rsplit_once('/').map_or("", |(p, _)| p))
            .expect("parent");
        let key = path.rsplit('/').next().expect("key");
        match op["op"].as_str() {
            Some("replace" | "add") => target[key] = op["value"].clone(),
            other => panic!("unexpected op {other:?}"),
        }
    }
}

#[test]
fn the_webhook_patches_pods_over_tls() {
    let mesh = Mesh::start(
        "apiVersion: sidemesh.io/v1\nkind: Mesh\n",
        &[
            "--webhook",
            "127.0.0.1:0",
            "--proxy-image",
            "registry.example/sidemesh-proxy:test",
        ],
    );
    let cp = &mesh.cp;
    let port = cp.listener("webhook").port();
    let url = format!("https://localhost:{port}/mutate");
    let ca = mesh.path("cp/ca/ca.crt");
    let body = std::fs::read_to_string(
        workspace_root().join("tests/fixtures/k8s/admissionreview-pod.json"),
    )
    .expect("fixture");

    let answer = post(&url, &ca, &body);
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("patch"))
        .expect("base64");
    let patch: Vec<Value> = serde_json::from_slice(&patch).expect("JSON patch");

    let review: Value = serde_json::from_str(&body).expect("json");
    let mut pod = review["request"]["object"].clone();
    apply(&mut pod, &patch);
    let names: Vec<&str> = pod["spec"]["initContainers"]
        .as_array()
        .expect("init containers")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["sidemesh-init", "sidemesh-proxy"]);
    assert_eq!(
        pod["spec"]["initContainers"][1]["image"],
        "registry.example/sidemesh-proxy:test"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["sidemesh.io/injected"],
        "true"
    );
    assert!(
        pod.to_string().contains("\"value\":\"user-service\""),
        "the service comes from the app label"
    );
    let bundle = pod["spec"]["initContainers"][1]["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == "SIDEMESH_TRUST_BUNDLE"))
        .and_then(|e| e["value"].as_str())
        .expect("the trust bundle is injected");
    assert_eq!(
        bundle,
        std::fs::read_to_string(mesh.trust_bundle()).expect("bundle"),
        "the proxy pins the mesh's own roots"
    );

    // The patched pod is a valid Pod.
    pod["metadata"]["name"] = json!("user-service-5c8d7f9b6d-abcde");
    let file = mesh.path("pod.json");
    std::fs::write(&file, pod.to_string()).expect("write");
    if let Some((passed, text)) = kubernetes_validate(&[&file]) {
        assert!(passed, "{text}");
    }

    // A pod that opted out is allowed unchanged.
    let mut opted: Value = serde_json::from_str(&body).expect("json");
    opted["request"]["object"]["metadata"]["annotations"] =
        json!({"sidemesh.io/inject": "disabled"});
    let answer = post(&url, &ca, &opted.to_string());
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{answer}");

    // Pods injection must not touch are never blocked either: allowed unchanged, with a
    // warning the API server shows the user.
    let mut host: Value = serde_json::from_str(&body).expect("json");
    host["request"]["object"]["spec"]["hostNetwork"] = json!(true);
    let mut meshed: Value = serde_json::from_str(&body).expect("json");
    meshed["request"]["object"]["spec"]["containers"]
        .as_array_mut()
        .expect("containers")
        .push(json!({"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.23.0"}));
    for (review, why) in [
        (host, "hostNetwork: true"),
        (meshed, "already belongs to Istio"),
    ] {
        let answer = post(&url, &ca, &review.to_string());
        assert_eq!(answer["response"]["allowed"], true, "{answer}");
        assert!(answer["response"].get("patch").is_none(), "{answer}");
        let warning = answer["response"]["warnings"][0]
            .as_str()
            .unwrap_or_default();
        assert!(
            warning.starts_with("sidemesh: not injected:") && warning.contains(why),
            "{answer}"
        );
    }

    // Without the mesh CA, a client cannot verify the webhook (it is TLS, with our CA).
    let out = Command::new("curl")
        .args(["-sS", "--data-binary", "{}", &url])
        .output()
        .expect("curl");
    assert_eq!(
        out.status.code(),
        Some(60),
        "curl without the CA must fail certificate verification (exit 60): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
