//! The control plane's Kubernetes support through kube-rs, against a local API server that
//! speaks list and watch (`sidemesh_tests::kube_api`): proxies' service-account tokens checked
//! with the TokenReview API, and EndpointSlices listed once and then watched, changes pushed
//! to the proxies as soon as the watch reports them, a `410 Gone` answered by a new list.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{Value, json};
use sidemesh_tests::kube_api::{KubeApi, endpoint_slice};
use sidemesh_tests::mesh::Mesh;
use sidemesh_tests::servers::EchoServer;
use sidemesh_tests::{Proc, eventually, http};

const CP_TOKEN: &str = "control-plane-own-token";
const ORDER_TOKEN: &str = "projected-token-of-order-service";

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path.to_string_lossy().into_owned()
}

/// The recorded answer of an API server for order-service's token.
fn authenticated() -> Value {
    let review: Value =
        serde_json::from_str(include_str!("../fixtures/tokenreview-authenticated.json"))
            .expect("fixture");
    review["status"].clone()
}

/// A control plane that talks to `api` with its own token.
fn mesh(api: &KubeApi, dir: &std::path::Path, yaml: &str) -> Mesh {
    let cp_token = write(dir, "cp-token", CP_TOKEN);
    Mesh::start(
        yaml,
        &[
            "--kubernetes-api",
            &api.url(),
            "--kubernetes-token-file",
            &cp_token,
        ],
    )
}

/// A proxy for order-service presenting `token_file`; returns once it logs `until`.
fn proxy(
    mesh: &Mesh,
    service_account: &str,
    token_file: &str,
    app: SocketAddr,
    extra: &[&str],
    until: &str,
) -> Proc {
    let bundle = mesh.trust_bundle().to_string_lossy().into_owned();
    let app = app.to_string();
    let mut args = vec![
        "--control-plane".to_string(),
        mesh.grpc(),
        "--trust-bundle".into(),
        bundle,
        "--service".into(),
        "order-service.demo".into(),
        "--service-account".into(),
        service_account.into(),
        "--service-account-token-file".into(),
        token_file.into(),
        "--app".into(),
        app,
        "--inbound".into(),
        "127.0.0.1:0".into(),
        "--outbound".into(),
        "127.0.0.1:0".into(),
        "--admin".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::start_until("sidemesh-proxy", &args, until)
}

const WAITING: &str = "waiting for a workload certificate from the control plane";

#[tokio::test(flavor = "multi_thread")]
async fn service_account_tokens_are_checked_with_the_tokenreview_api() {
    let api = KubeApi::start(CP_TOKEN).await;
    api.review(ORDER_TOKEN, authenticated());
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = mesh(
        &api,
        dir.path(),
        "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: order-service\n    namespace: demo\n    ports: [{port: 8082}]\n",
    );
    let app = EchoServer::start("orders").await;

    // The token the API server vouches for, asking for its own service account: certified.
    let good = write(dir.path(), "order-token", ORDER_TOKEN);
    let order = proxy(&mesh, "order-service", &good, app.addr, &[], "ready");
    let dump = eventually(
        "order-service's proxy certified",
        Duration::from_secs(10),
        || async {
            let d = order.config_dump().await?;
            d["identity"]["identity"].is_string().then_some(d)
        },
    )
    .await;
    assert_eq!(
        dump["identity"]["identity"],
        "spiffe://cluster.local/ns/demo/sa/order-service"
    );
    assert_eq!(dump["identity"]["source"], "service-account token");
    let review = api
        .seen()
        .into_iter()
        .find(|s| s.path.ends_with("/tokenreviews"))
        .expect("a TokenReview was posted");
    assert_eq!(
        review.authorization,
        format!("Bearer {CP_TOKEN}"),
        "the control plane authenticates with its own token"
    );
    assert_eq!(review.body["kind"], "TokenReview");
    assert_eq!(review.body["spec"]["token"], ORDER_TOKEN);
    assert_eq!(review.body["spec"]["audiences"][0], "sidemesh");

    // The same token cannot buy another service account's identity.
    let thief = proxy(&mesh, "user-service", &good, app.addr, &[], WAITING);
    // An expired token is refused with the API server's reason.
    let expired = write(dir.path(), "expired-token", "an-expired-token");
    let stale = proxy(&mesh, "order-service", &expired, app.addr, &[], WAITING);
    eventually(
        "both refusals logged by the proxies",
        Duration::from_secs(10),
        || async {
            let thief_logs = thief.logs().join("\n");
            let stale_logs = stale.logs().join("\n");
            (thief_logs.contains("the token belongs to demo/order-service, not demo/user-service")
                && stale_logs.contains("service account token has expired"))
            .then_some(())
        },
    )
    .await;
    for refused in [&thief, &stale] {
        let admin = refused.listener("admin");
        let ready = http(Method::GET, &format!("http://{admin}/ready"), None, &[])
            .await
            .expect("ready");
        assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            ready.body.contains("no workload certificate"),
            "{}",
            ready.body
        );
    }
    let cp_admin = mesh.cp.listener("admin");
    let metrics = http(
        Method::GET,
        &format!("http://{cp_admin}/metrics"),
        None,
        &[],
    )
    .await
    .expect("metrics")
    .body;
    assert!(
        metrics.contains("sidemesh_cp_certificates_issued_total 1")
            && !metrics.contains("sidemesh_cp_certificates_refused_total 0"),
        "{metrics}"
    );
}

/// user-service's endpoints in `proxy`'s config, sorted.
async fn user_endpoints(proxy: &Proc) -> Option<Vec<String>> {
    let dump = proxy.config_dump().await?;
    let services = dump["config"]["mesh"]["services"].as_array()?.clone();
    let users = services.iter().find(|s| s["id"] == "user-service.demo")?;
    let mut found: Vec<String> = users["endpoints"]
        .as_array()?
        .iter()
        .filter_map(|e| e.as_str().map(String::from))
        .collect();
    found.sort();
    Some(found)
}

/// Waits until `proxy` routes user-service to `want`; returns when it did, measured from the
/// API server's last event.
async fn endpoints_reach(api: &KubeApi, proxy: &Proc, want: &[&str]) -> Duration {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    eventually(
        &format!("user-service's endpoints are {want:?}"),
        Duration::from_secs(10),
        || async { (user_endpoints(proxy).await? == want).then_some(()) },
    )
    .await;
    api.last_sent().map_or(Duration::ZERO, |t| t.elapsed())
}

#[tokio::test(flavor = "multi_thread")]
async fn endpointslices_are_watched_and_changes_reach_proxies_at_once() {
    let api = KubeApi::start(CP_TOKEN).await;
    api.review(ORDER_TOKEN, authenticated());
    api.apply(endpoint_slice(
        "demo",
        "user-service-a",
        "user-service",
        8081,
        &["10.244.1.7", "10.244.2.9"],
        &["10.244.2.4"],
    ));
    // Other slices: a second page of the list, and a slice of no Service (ignored).
    for i in 0..600 {
        api.apply(endpoint_slice(
            "bulk",
            &format!("bulk-{i:03}"),
            &format!("bulk-{i:03}"),
            80,
            &["10.9.0.1"],
            &[],
        ));
    }
    let mut orphan = endpoint_slice("demo", "orphan", "x", 1, &["10.0.0.1"], &[]);
    orphan["metadata"]["labels"] = json!({});
    api.apply(orphan);

    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = mesh(
        &api,
        dir.path(),
        "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: order-service\n    namespace: demo\n    ports: [{port: 8082}]\n  - name: user-service\n    namespace: demo\n    ports: [{port: 8081}]\n",
    );
    let app = EchoServer::start("orders").await;
    let token = write(dir.path(), "order-token", ORDER_TOKEN);
    let order = proxy(
        &mesh,
        "order-service",
        &token,
        app.addr,
        &["--upstream", "user-service=127.0.0.1:0"],
        "ready",
    );

    // Ready pods only: the terminating one is left out.
    endpoints_reach(&api, &order, &["10.244.1.7:8081", "10.244.2.9:8081"]).await;
    let seen = api.seen();
    let lists: Vec<_> = seen.iter().filter(|s| s.is_list()).collect();
    assert_eq!(
        lists.len(),
        2,
        "one list of two pages (500 per page): {lists:?}"
    );
    assert_eq!(
        lists[1].query.get("continue").map(String::as_str),
        Some("500")
    );
    assert_eq!(
        lists[0].query.get("labelSelector").map(String::as_str),
        Some("kubernetes.io/service-name"),
        "only slices that belong to a Service are asked for"
    );
    let watch = seen
        .iter()
        .find(|s| s.is_watch())
        .expect("a watch follows the list");
    assert_eq!(
        watch.query.get("allowWatchBookmarks").map(String::as_str),
        Some("true")
    );

    // A pod becomes not ready: the watch event is pushed well within a second.
    api.apply(endpoint_slice(
        "demo",
        "user-service-a",
        "user-service",
        8081,
        &["10.244.1.7"],
        &["10.244.2.9"],
    ));
    let took = endpoints_reach(&api, &order, &["10.244.1.7:8081"]).await;
    assert!(
        took < Duration::from_secs(1),
        "the change took {took:?} to reach the proxy"
    );
    // A second slice of the same service adds to it; deleting it takes it away again.
    api.apply(endpoint_slice(
        "demo",
        "user-service-b",
        "user-service",
        8081,
        &["10.244.3.3"],
        &[],
    ));
    let took = endpoints_reach(&api, &order, &["10.244.1.7:8081", "10.244.3.3:8081"]).await;
    assert!(took < Duration::from_secs(1), "the new slice took {took:?}");
    api.bookmark();
    api.delete("demo", "user-service-b");
    let took = endpoints_reach(&api, &order, &["10.244.1.7:8081"]).await;
    assert!(took < Duration::from_secs(1), "the deletion took {took:?}");

    // Nothing was listed again while the watch held: the cluster is not polled.
    let started = Instant::now();
    let lists_before = api.seen().iter().filter(|s| s.is_list()).count();
    eventually("two quiet seconds", Duration::from_secs(3), || async {
        (started.elapsed() >= Duration::from_secs(2)).then_some(())
    })
    .await;
    assert_eq!(
        api.seen().iter().filter(|s| s.is_list()).count(),
        lists_before
    );

    // The API server compacts its history while a slice changes: the watch ends with 410 Gone,
    // the control plane lists again and the change, never sent as an event, arrives anyway.
    api.compact(|api| {
        api.apply(endpoint_slice(
            "demo",
            "user-service-a",
            "user-service",
            8081,
            &["10.244.1.7", "10.244.4.4"],
            &[],
        ));
    });
    endpoints_reach(&api, &order, &["10.244.1.7:8081", "10.244.4.4:8081"]).await;
    assert_eq!(
        api.seen().iter().filter(|s| s.is_list()).count(),
        lists_before + 2,
        "410 Gone forced one new list (two pages)"
    );
}
