//! `sidemesh inject` on realistic multi-document manifests: every output validates strictly
//! against the Kubernetes schemas, injecting twice equals injecting once, opted-out pods and
//! other kinds pass through.

use std::io::Write;
use std::process::{Command, Stdio};

use sidemesh_tests::{bin, kubernetes_validate, workspace_root};

fn fixture() -> std::path::PathBuf {
    workspace_root().join("tests/fixtures/k8s/demo-app.yaml")
}

/// A trust bundle for the injected proxies (its content is only passed through).
const BUNDLE: &str = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";

/// Runs `sidemesh inject` (with a trust bundle) and returns (exit code, stdout, stderr).
fn run_inject(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = dir.path().join("ca.crt");
    std::fs::write(&bundle, BUNDLE).expect("write bundle");
    let mut child = Command::new(bin("sidemesh"))
        .arg("inject")
        .args(args)
        .arg("--trust-bundle")
        .arg(&bundle)
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
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).expect("utf-8"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn inject(args: &[&str], stdin: Option<&str>) -> String {
    let (code, out, err) = run_inject(args, stdin);
    assert_eq!(code, 0, "sidemesh inject {args:?} failed: {err}");
    out
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

/// The documents of `text` as PyYAML (YAML 1.1, like Kubernetes) reads them.
fn yaml11(text: &str) -> Option<serde_json::Value> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("doc.yaml");
    std::fs::write(&path, text).expect("write");
    let out = Command::new("python3")
        .arg(workspace_root().join("tests/scripts/yaml11.py"))
        .arg(&path)
        .output();
    match out {
        Ok(out) if out.status.success() => Some(serde_json::from_slice(&out.stdout).expect("json")),
        Ok(out) => panic!(
            "PyYAML could not read:\n{}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => {
            sidemesh_tests::skip(&format!("python3 with PyYAML is needed: {e}"));
            None
        }
    }
}

/// A document with what injection adds taken out again (its containers, volumes, the
/// `injected` annotation, the probes it points at the proxy, emptied lists), so the rest can
/// be compared with the input.
fn without_sidemesh(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    fn strip(v: &mut Value) {
        match v {
            Value::Object(map) => {
                for list in ["initContainers", "containers", "volumes"] {
                    if let Some(Value::Array(items)) = map.get_mut(list) {
                        items.retain(|c| {
                            !c["name"]
                                .as_str()
                                .is_some_and(|n| n.starts_with("sidemesh-"))
                        });
                        if items.is_empty() {
                            map.remove(list);
                        }
                    }
                }
                for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
                    map.remove(probe);
                }
                if let Some(Value::Object(annotations)) = map.get_mut("annotations") {
                    annotations.remove("sidemesh.io/injected");
                    if annotations.is_empty() {
                        map.remove("annotations");
                    }
                }
                map.values_mut().for_each(strip);
                if map
                    .get("metadata")
                    .is_some_and(|m| m.as_object().is_some_and(|m| m.is_empty()))
                {
                    map.remove("metadata");
                }
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v = value.clone();
    strip(&mut v);
    v
}

/// What a corpus manifest must become.
enum Expect {
    /// This many pod templates injected, and notes (stderr) containing these.
    Injected(usize, &'static [&'static str]),
    /// Refused: exit code 1, nothing printed, stderr containing this.
    Refused(&'static str),
}

#[test]
fn a_corpus_of_real_world_shapes_is_injected_safely() {
    let corpus = workspace_root().join("tests/fixtures/k8s/corpus");
    let cases: &[(&str, &[&str], Expect)] = &[
        ("web-deployment.yaml", &[], Expect::Injected(1, &[])),
        ("dns-deployment.yaml", &[], Expect::Injected(1, &[])),
        (
            "node-exporter-daemonset.yaml",
            &[],
            Expect::Injected(
                0,
                &["DaemonSet monitoring/node-exporter: left alone: hostNetwork: true"],
            ),
        ),
        ("cache-statefulset.yaml", &[], Expect::Injected(1, &[])),
        ("database-statefulset.yaml", &[], Expect::Injected(1, &[])),
        ("grpc-server.yaml", &[], Expect::Injected(1, &[])),
        ("jobs.yaml", &[], Expect::Injected(2, &[])),
        (
            "jobs.yaml",
            &["--legacy-sidecar"],
            Expect::Injected(
                2,
                &[
                    "Job batch/pi: its init containers run before the proxy",
                    "POST http://127.0.0.1:15020/shutdown",
                ],
            ),
        ),
        (
            "linkerd-meshed.yaml",
            &[],
            Expect::Refused("Deployment emojivoto/emoji: refused: it already belongs to Linkerd"),
        ),
        (
            "linkerd-meshed.yaml",
            &["--force"],
            Expect::Injected(1, &["injected despite Linkerd"]),
        ),
        (
            "istio-labelled.yaml",
            &[],
            Expect::Refused(
                "Pod bookinfo/reviews: refused: it already belongs to Istio (sidecar.istio.io/inject: true)",
            ),
        ),
        (
            "opted-out.yaml",
            &[],
            Expect::Injected(
                0,
                &[
                    "Deployment shop/legacy-billing: left alone: opted out",
                    "Pod shop/debug: left alone: opted out",
                ],
            ),
        ),
        ("sidecars-and-init.yaml", &[], Expect::Injected(1, &[])),
        ("yaml11-values.yaml", &[], Expect::Injected(1, &[])),
    ];
    for (file, args, expect) in cases {
        let path = corpus.join(file);
        let path = path.to_str().expect("utf-8");
        let mut all_args = vec!["-f", path];
        all_args.extend_from_slice(args);
        let (code, out, err) = run_inject(&all_args, None);
        match expect {
            Expect::Refused(why) => {
                assert_eq!(code, 1, "{file} {args:?} must be refused:\n{err}");
                assert!(
                    out.is_empty(),
                    "{file}: nothing is printed on a refusal:\n{out}"
                );
                assert!(err.contains(why), "{file}: {why}\n{err}");
                assert!(
                    err.contains("--force"),
                    "{file}: says how to go on anyway:\n{err}"
                );
                continue;
            }
            Expect::Injected(count, notes) => {
                assert_eq!(code, 0, "{file} {args:?}:\n{err}");
                let injected = out.matches("sidemesh.io/injected: \"true\"").count();
                assert_eq!(
                    injected, *count,
                    "{file} {args:?}: pod templates injected:\n{out}"
                );
                for note in *notes {
                    assert!(err.contains(note), "{file} {args:?}: note `{note}`:\n{err}");
                }
                if notes.is_empty() {
                    assert!(err.is_empty(), "{file} {args:?}: no notes expected:\n{err}");
                }
            }
        }
        // Strictly valid, idempotent, and every value the operator wrote means the same.
        let dir = tempfile::tempdir().expect("tempdir");
        let injected_path = dir.path().join(file);
        std::fs::write(&injected_path, &out).expect("write");
        if let Some((passed, report)) = kubernetes_validate(&[&injected_path]) {
            assert!(
                passed,
                "{file} {args:?} is not strictly valid:\n{report}\n---\n{out}"
            );
        }
        let mut again_args = vec!["-f", "-"];
        again_args.extend_from_slice(args);
        let again = inject(&again_args, Some(&out));
        assert_eq!(
            again, out,
            "{file} {args:?}: injecting twice equals injecting once"
        );
        let original = std::fs::read_to_string(corpus.join(file)).expect("read");
        if let (Some(before), Some(after)) = (yaml11(&original), yaml11(&out)) {
            assert_eq!(
                without_sidemesh(&before),
                without_sidemesh(&after),
                "{file} {args:?}: a value changed meaning\n---\n{out}"
            );
        }
    }
}

/// The proxy's probe table of the first injected pod template in `out`.
fn recorded_probes(out: &str) -> serde_json::Value {
    let docs = yaml11(out).unwrap_or_default();
    let proxy = docs
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|d| {
            let spec = d
                .pointer("/spec/template/spec")
                .or_else(|| d.pointer("/spec"))?;
            ["initContainers", "containers"].iter().find_map(|list| {
                spec[*list]
                    .as_array()?
                    .iter()
                    .find(|c| c["name"] == "sidemesh-proxy")
                    .cloned()
            })
        })
        .expect("an injected proxy");
    let value = proxy["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == "SIDEMESH_APP_PROBES"))
        .and_then(|e| e["value"].as_str())
        .expect("SIDEMESH_APP_PROBES");
    serde_json::from_str(value).expect("json")
}

#[test]
fn probes_ports_and_values_in_the_corpus_come_out_right() {
    let corpus = workspace_root().join("tests/fixtures/k8s/corpus");
    let file = |name: &str| corpus.join(name).to_string_lossy().into_owned();

    // CoreDNS-like: the first TCP port is advertised, not UDP 53.
    let dns = inject(&["-f", &file("dns-deployment.yaml")], None);
    assert!(dns.contains("value: $(POD_IP):53\n"), "{dns}");
    assert_eq!(
        recorded_probes(&dns),
        serde_json::json!({
            "/app-health/dns/livez": {"port": 8080, "path": "/health"},
            "/app-health/dns/readyz": {"port": 8181, "path": "/ready"},
        })
    );
    // Redis-like: the TCP probe by port name goes through the proxy; the exec one stays.
    let cache = inject(&["-f", &file("cache-statefulset.yaml")], None);
    assert_eq!(
        recorded_probes(&cache),
        serde_json::json!({"/app-health/redis/livez": {"port": 6379, "kind": "tcp"}})
    );
    assert!(
        cache.contains("defaultMode: 493"),
        "0755 is the number 493:\n{cache}"
    );
    assert!(
        cache.contains("- sh\n") && cache.contains("redis-cli ping | grep PONG"),
        "{cache}"
    );
    // etcd-like: gRPC probes, with and without a service name.
    let kv = inject(&["-f", &file("grpc-server.yaml")], None);
    assert_eq!(
        recorded_probes(&kv),
        serde_json::json!({
            "/app-health/kv/livez": {"port": 2379, "kind": "grpc"},
            "/app-health/kv/readyz": {"port": 2379, "kind": "grpc", "service": "etcd.ready"},
        })
    );
    // The web server's header is passed on.
    let web = inject(&["-f", &file("web-deployment.yaml")], None);
    assert_eq!(
        recorded_probes(&web)["/app-health/web/livez"],
        serde_json::json!({"port": 8080, "path": "/healthz", "headers": [{"name": "Host", "value": "web.internal"}]})
    );
    // A native sidecar of the application's keeps its place after ours, and its probe is
    // rewritten like the app's.
    let api = inject(&["-f", &file("sidecars-and-init.yaml")], None);
    let docs = yaml11(&api).unwrap_or_default();
    let names: Vec<&str> = docs[0]["spec"]["initContainers"]
        .as_array()
        .expect("init containers")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["sidemesh-init", "sidemesh-proxy", "migrate", "log-shipper"]
    );
    assert_eq!(
        recorded_probes(&api)["/app-health/log-shipper/readyz"],
        serde_json::json!({"port": 2020, "path": "/api/v1/health"})
    );
    assert_eq!(
        docs[0]["spec"]["containers"][0]["ports"][0]["hostPort"],
        30080
    );
    // Large integers and octal and hex numbers keep their value (PyYAML agrees above).
    let values = inject(&["-f", &file("yaml11-values.yaml")], None);
    for expected in [
        "activeDeadlineSeconds: 9007199254740993\n",
        "replicas: 2\n",
        "minReadySeconds: 8\n",
        "defaultMode: 256\n",
        "quoted-octal: \"0755\"\n",
        "automountServiceAccountToken: true\n",
        "value: \"yes\"\n",
    ] {
        assert!(values.contains(expected), "`{expected}` in:\n{values}");
    }
}
