use serde_json::{Value, json};

use super::*;

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: orders, namespace: demo}
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

fn config() -> InjectConfig {
    InjectConfig {
        trust_bundle: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        ..InjectConfig::default()
    }
}

fn one(text: &str) -> Value {
    crate::k8syaml::read_documents(text)
        .expect("yaml")
        .remove(0)
}

#[test]
fn a_deployment_gets_the_init_container_and_a_native_sidecar() {
    let out = inject_documents(DEPLOYMENT, &config()).expect("inject");
    assert_eq!(out.injected, 1);
    assert!(out.notes.is_empty(), "{:?}", out.notes);
    let v = one(&out.text);
    let spec = &v["spec"]["template"]["spec"];
    assert_eq!(spec["initContainers"][0]["name"], "sidemesh-init");
    assert_eq!(
        spec["initContainers"][0]["args"],
        json!(["init", "--skip-outbound-ports", "5432"])
    );
    let proxy = &spec["initContainers"][1];
    assert_eq!(proxy["name"], "sidemesh-proxy");
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    let env = |name: &str| {
        proxy["env"]
            .as_array()
            .and_then(|e| e.iter().find(|v| v["name"] == name))
            .map(|v| v["value"].clone())
    };
    assert_eq!(env("SIDEMESH_SERVICE"), Some(json!("order-service")));
    assert_eq!(
        env("SIDEMESH_ADVERTISE_ADDR"),
        Some(json!("$(POD_IP):8082"))
    );
    assert_eq!(
        env("SIDEMESH_TRUST_BUNDLE"),
        Some(json!(config().trust_bundle))
    );
    assert_eq!(
        env("SIDEMESH_CONTROL_PLANE"),
        Some(json!(
            "https://sidemesh-control-plane.sidemesh-system.svc:15010"
        ))
    );
    assert_eq!(spec["containers"][0]["name"], "app");
    assert_eq!(
        v["spec"]["template"]["metadata"]["annotations"][ANNOTATION_INJECTED],
        "true"
    );
    let again = inject_documents(&out.text, &config()).expect("again");
    assert_eq!(
        again.text, out.text,
        "injecting twice equals injecting once"
    );
}

#[test]
fn opted_out_host_network_and_other_kinds_pass_through() {
    for opt_out in [
        "annotations: {sidemesh.io/inject: disabled}",
        "labels: {sidemesh.io/inject: disabled}",
    ] {
        let text = DEPLOYMENT.replace(
            "annotations: {sidemesh.io/skip-outbound-ports: '5432'}",
            opt_out,
        );
        let out = inject_documents(&text, &config()).expect("inject");
        assert_eq!(out.injected, 0);
        assert_eq!(one(&out.text), one(&text), "unchanged");
        assert!(
            out.notes[0].to_string().contains("opted out"),
            "{:?}",
            out.notes
        );
    }
    let host = DEPLOYMENT.replace(
        "serviceAccountName: order-service",
        "serviceAccountName: order-service\n      hostNetwork: true",
    );
    let out = inject_documents(&host, &config()).expect("inject");
    assert_eq!(out.injected, 0);
    assert_eq!(one(&out.text), one(&host));
    assert_eq!(
        out.notes[0].to_string(),
        "Deployment demo/orders: left alone: hostNetwork: true — the pod shares the node's network, so the init container would rewrite the node's iptables"
    );
    let service =
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n";
    let out = inject_documents(service, &config()).expect("inject");
    assert_eq!(one(&out.text), one(service));
}

#[test]
fn another_mesh_is_refused_unless_forced() {
    let linkerd = DEPLOYMENT.replace(
        "        - name: app\n",
        "        - name: linkerd-proxy\n          image: cr.l5d.io/linkerd/proxy:edge\n        - name: app\n",
    );
    let err = inject_documents(&linkerd, &config()).expect_err("refused");
    let text = err.to_string();
    assert!(
        text.starts_with("Deployment demo/orders: refused: it already belongs to Linkerd (container `linkerd-proxy`)"),
        "{text}"
    );
    assert!(text.contains("--force"), "{text}");
    let istio = DEPLOYMENT.replace(
        "labels: {app: order-service}",
        "labels: {app: order-service, sidecar.istio.io/inject: 'true'}",
    );
    let err = inject_documents(&istio, &config()).expect_err("refused");
    assert!(
        err.to_string()
            .contains("Istio (sidecar.istio.io/inject: true)"),
        "{err}"
    );
    let forced = InjectConfig {
        force: true,
        ..config()
    };
    let out = inject_documents(&linkerd, &forced).expect("forced");
    assert_eq!(out.injected, 1);
    assert!(
        out.notes[0].message.contains("despite Linkerd"),
        "{:?}",
        out.notes
    );
}

#[test]
fn legacy_clusters_get_the_proxy_among_the_containers_with_warnings_for_jobs() {
    let legacy = InjectConfig {
        legacy_sidecar: true,
        ..config()
    };
    let out = inject_documents(DEPLOYMENT, &legacy).expect("inject");
    let v = one(&out.text);
    let spec = &v["spec"]["template"]["spec"];
    assert_eq!(spec["containers"][0]["name"], "sidemesh-proxy");
    assert!(spec["containers"][0].get("restartPolicy").is_none());
    assert_eq!(spec["initContainers"].as_array().map(Vec::len), Some(1));
    let job = "apiVersion: batch/v1\nkind: Job\nmetadata: {name: pi}\nspec:\n  template:\n    spec:\n      restartPolicy: Never\n      initContainers: [{name: wait, image: busybox}]\n      containers: [{name: pi, image: perl}]\n";
    let out = inject_documents(job, &legacy).expect("inject");
    let notes: Vec<String> = out.notes.iter().map(ToString::to_string).collect();
    assert!(notes.iter().any(|n| n.contains("/shutdown")), "{notes:?}");
    assert!(
        notes
            .iter()
            .any(|n| n.contains("init containers run before the proxy")),
        "{notes:?}"
    );
    // Native sidecars need no such note: the kubelet stops them when the job is done.
    let out = inject_documents(job, &config()).expect("inject");
    assert!(out.notes.is_empty(), "{:?}", out.notes);
    let v = one(&out.text);
    let names: Vec<&str> = v["spec"]["template"]["spec"]["initContainers"]
        .as_array()
        .expect("init containers")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["sidemesh-init", "sidemesh-proxy", "wait"],
        "ours first, then the app's"
    );
}

#[test]
fn probes_of_every_kind_go_through_the_admin_port() {
    let pod = "apiVersion: v1
kind: Pod
metadata: {name: p}
spec:
  containers:
    - name: web
      image: web:1
      ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}]
      readinessProbe: {httpGet: {path: /healthz?full=1, port: http, httpHeaders: [{name: X-Probe, value: '1'}]}, periodSeconds: 3}
      livenessProbe: {tcpSocket: {port: 8080}}
      startupProbe: {exec: {command: [cat, /tmp/ready]}}
    - name: rpc
      image: rpc:1
      ports: [{containerPort: 9090}]
      readinessProbe: {grpc: {port: 9090, service: rpc.v1}}
      livenessProbe: {httpGet: {path: /, port: 8443, scheme: HTTPS}}
      startupProbe: {httpGet: {path: /, port: 80, host: example.com}}
";
    let out = inject_documents(pod, &config()).expect("inject");
    let v = one(&out.text);
    let web = &v["spec"]["containers"][0];
    assert_eq!(
        web["readinessProbe"],
        json!({"httpGet": {"path": "/app-health/web/readyz", "port": 15020}, "periodSeconds": 3})
    );
    assert_eq!(
        web["livenessProbe"]["httpGet"]["path"],
        "/app-health/web/livez"
    );
    assert!(web["livenessProbe"].get("tcpSocket").is_none());
    assert_eq!(
        web["startupProbe"],
        json!({"exec": {"command": ["cat", "/tmp/ready"]}}),
        "exec probes stay"
    );
    let rpc = &v["spec"]["containers"][1];
    assert_eq!(
        rpc["readinessProbe"]["httpGet"]["path"],
        "/app-health/rpc/readyz"
    );
    assert!(rpc["readinessProbe"].get("grpc").is_none());
    assert_eq!(
        rpc["startupProbe"]["httpGet"]["host"], "example.com",
        "a probe of another host stays"
    );
    let proxy = &v["spec"]["initContainers"][1];
    let recorded: Value = proxy["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == "SIDEMESH_APP_PROBES"))
        .and_then(|v| v["value"].as_str())
        .map(|s| serde_json::from_str(s).expect("json"))
        .expect("probes recorded");
    assert_eq!(
        recorded,
        json!({
            "/app-health/rpc/livez": {"port": 8443, "path": "/", "kind": "https"},
            "/app-health/rpc/readyz": {"port": 9090, "kind": "grpc", "service": "rpc.v1"},
            "/app-health/web/livez": {"port": 8080, "kind": "tcp"},
            "/app-health/web/readyz": {"port": 8080, "path": "/healthz?full=1", "headers": [{"name": "X-Probe", "value": "1"}]},
        })
    );
    // The first TCP port is the advertised one, never the UDP one.
    assert!(out.text.contains("$(POD_IP):8080"), "{}", out.text);
    // The proxy parses what injection recorded.
    let parsed: std::collections::HashMap<String, sidemesh_proxy::admin::AppProbe> =
        serde_json::from_value(recorded).expect("the proxy's probe format");
    assert_eq!(parsed.len(), 4);
    let again = inject_documents(&out.text, &config()).expect("again");
    assert_eq!(again.text, out.text);
}

#[test]
fn values_keep_their_kubernetes_meaning() {
    let cm = "apiVersion: v1
kind: Pod
metadata:
  name: modes
  annotations: {note: yes, quoted: 'on', big: '12345678901234567890123'}
spec:
  containers:
    - name: app
      image: app:1
      env: [{name: A, value: '0755'}, {name: B, value: \"1_000\"}]
      volumeMounts: [{name: v, mountPath: /v}]
  volumes:
    - name: v
      configMap: {name: c, defaultMode: 0755, items: [{key: a, path: a, mode: 0o600}]}
";
    let out = inject_documents(cm, &config()).expect("inject");
    let v = one(&out.text);
    assert_eq!(v["spec"]["volumes"][0]["configMap"]["defaultMode"], 493);
    assert_eq!(
        v["spec"]["volumes"][0]["configMap"]["items"][0]["mode"],
        384
    );
    assert_eq!(
        v["metadata"]["annotations"]["note"], true,
        "as Kubernetes reads `yes`"
    );
    assert_eq!(v["metadata"]["annotations"]["quoted"], "on");
    assert_eq!(v["spec"]["containers"][0]["env"][0]["value"], "0755");
    assert!(out.text.contains("defaultMode: 493"), "{}", out.text);
    assert!(out.text.contains("value: \"0755\""), "{}", out.text);
}
