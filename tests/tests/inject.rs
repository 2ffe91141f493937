//! `sidemesh inject` on realistic multi-document manifests: every output validates strictly
//! against the Kubernetes schemas, injecting twice equals injecting once, opted-out pods and
//! other kinds pass through.

use std::io::Write;
use std::process::{Command, Stdio};

use sidemesh_tests::{bin, kubernetes_validate, workspace_root};

fn fixture() -> std::path::PathBuf {
    workspace_root().join("tests/fixtures/k8s/demo-app.yaml")
}

fn inject(args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(bin("sidemesh"))
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sidemesh inject");
    {
        let mut pipe = child.stdin.take().expect("stdin");
        if let Some(text) = stdin {
            pipe.write_all(text.as_bytes()).expect("write stdin");
        }
    }
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "sidemesh inject {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn validate_strictly(yaml: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("injected.yaml");
    std::fs::write(&path, yaml).expect("write");
    let Some((passed, text)) = kubernetes_validate(&[&path]) else {
        return;
    };
    assert!(passed, "{text}\n---\n{yaml}");
    // One line per resource: the List's items are validated one by one.
    for resource in [
        "service/order-service",
        "configmap/order-service-settings",
        "deployment/order-service",
        "cronjob/nightly-report",
    ] {
        assert!(
            text.contains(&format!("resource {resource} ")),
            "{resource} not validated:\n{text}"
        );
    }
}

fn docs(yaml: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| serde_json::Value::deserialize(d).expect("yaml"))
        .collect()
}

#[test]
fn manifests_are_injected_valid_and_idempotent() {
    let path = fixture();
    let once = inject(&["-f", path.to_str().expect("path")], None);
    validate_strictly(&once);

    let docs = docs(&once);
    assert_eq!(docs.len(), 5, "every document is kept");
    let names = |containers: &serde_json::Value| -> Vec<String> {
        containers
            .as_array()
            .map(|cs| {
                cs.iter()
                    .filter_map(|c| c["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let deployment = &docs[2]["spec"]["template"]["spec"];
    assert_eq!(
        names(&deployment["initContainers"]),
        ["sidemesh-init", "sidemesh-proxy"]
    );
    assert_eq!(names(&deployment["containers"]), ["order-service"]);
    let init = &deployment["initContainers"][0];
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW"])
    );
    assert_eq!(
        init["args"],
        serde_json::json!(["init", "--skip-outbound-ports", "5432"])
    );
    let proxy = &deployment["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(proxy["securityContext"]["runAsUser"], 2102);
    assert_eq!(proxy["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        proxy["resources"]["requests"]["cpu"], "100m",
        "annotation override"
    );
    assert_eq!(proxy["readinessProbe"]["httpGet"]["port"], 15020);
    // The app's HTTP probe goes through the proxy's admin port (strict mTLS would refuse the
    // kubelet's plaintext probe on the app's port); the proxy is told where to forward it.
    let app_probe = &deployment["containers"][0]["readinessProbe"]["httpGet"];
    assert_eq!(app_probe["port"], 15020);
    assert_eq!(app_probe["path"], "/app-health/order-service/readyz");
    let probes_env = proxy["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == "SIDEMESH_APP_PROBES"))
        .and_then(|e| e["value"].as_str())
        .expect("SIDEMESH_APP_PROBES");
    let probes: serde_json::Value = serde_json::from_str(probes_env).expect("JSON");
    assert_eq!(
        probes["/app-health/order-service/readyz"],
        serde_json::json!({"port": 8082, "path": "/healthz"})
    );
    let cronjob = &docs[3]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_eq!(
        names(&cronjob["initContainers"]),
        ["sidemesh-init", "sidemesh-proxy"]
    );
    let statefulset = &docs[4]["items"][0]["spec"]["template"]["spec"];
    assert_eq!(
        names(&statefulset["initContainers"]),
        ["sidemesh-init", "sidemesh-proxy"]
    );
    let opted_out = &docs[4]["items"][1]["spec"];
    assert!(
        opted_out.get("initContainers").is_none(),
        "sidemesh.io/inject: disabled"
    );
    // Non-pod kinds pass through untouched.
    let original = self::docs(&std::fs::read_to_string(&path).expect("fixture"));
    assert_eq!(docs[0], original[0]);
    assert_eq!(docs[1], original[1]);

    // Twice equals once; stdin works like a file.
    let twice = inject(&["-f", "-"], Some(&once));
    assert_eq!(twice, once);

    // Older clusters: the proxy among the containers.
    let legacy = inject(
        &["-f", path.to_str().expect("path"), "--legacy-sidecar"],
        None,
    );
    validate_strictly(&legacy);
    let legacy = self::docs(&legacy);
    assert_eq!(
        names(&legacy[2]["spec"]["template"]["spec"]["containers"]),
        ["sidemesh-proxy", "order-service"]
    );
}
