//! Broken configs, one mistake per file, fed as one folder: every mistake is reported at
//! once, each with its file, line, column, field path and a message an operator can act on.

use std::path::Path;

use sidemesh_config::{Diagnostic, LoadError, load, parse_str};

fn broken_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/broken")
}

fn diagnostics_of(path: &Path) -> Vec<Diagnostic> {
    match load(path) {
        Err(LoadError::Invalid(d)) => d.0,
        other => panic!("expected diagnostics for {}, got {other:?}", path.display()),
    }
}

fn file_name(d: &Diagnostic) -> &str {
    d.file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
}

#[test]
fn every_mistake_in_a_folder_is_reported_with_its_position() {
    let dir = broken_dir();
    let found = diagnostics_of(&dir);
    // (file, line, column, field path, message)
    let expected: &[(&str, usize, usize, &str, &str)] = &[
        (
            "attempts-out-of-range.yaml",
            7,
            17,
            "routes[0].retry.attempts",
            "must be between 1 and 10, got 0",
        ),
        (
            "bad-duration.yaml",
            6,
            14,
            "routes[0].timeout",
            "invalid duration `2 seconds`: expected a whole number and a unit (us, ms, s, m, h), e.g. `250ms` or `2s`",
        ),
        (
            "bad-regex.yaml",
            7,
            24,
            "routes[0].matches[0].path.regex",
            "invalid regex `^/users/([0-9]+$`: unclosed group",
        ),
        (
            "dangling-reference.yaml",
            7,
            18,
            "routes[0].backends[0].service",
            "unknown service `userz` (known services: orders, users)",
        ),
        (
            "duplicate-route-b.yaml",
            6,
            11,
            "routes[1].name",
            &format!(
                "duplicate route name `same-name` (first defined at {}:4:11)",
                dir.join("duplicate-route-a.yaml").display()
            ),
        ),
        (
            "syntax-error.yaml",
            6,
            14,
            "",
            "mapping values are not allowed in this context",
        ),
        (
            "unknown-field.yaml",
            8,
            7,
            "routes[0].retry",
            "unknown field `retries`, expected one of `attempts`, `retryOn`, `perTryTimeout`, `backoff`, `budget`, `nonIdempotent`, `bufferLimit`",
        ),
        (
            "zero-weight.yaml",
            10,
            17,
            "routes[0].backends[1].weight",
            "must be between 1 and 1000000, got 0",
        ),
    ];
    let actual: Vec<(&str, usize, usize, &str, &str)> = found
        .iter()
        .map(|d| {
            (
                file_name(d),
                d.line,
                d.column,
                d.path.as_str(),
                d.message.as_str(),
            )
        })
        .collect();
    assert_eq!(actual, expected, "\nall diagnostics:\n{}", render(&found));
}

#[test]
fn diagnostics_render_as_file_line_column_path_message() {
    let err = parse_str(
        "demo.yaml",
        "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: a\n    ports: [{port: 80}]\nroutes:\n  - name: r\n    service: a\n    retry:\n      attempts: 0\n",
    )
    .expect_err("attempts 0 is invalid");
    assert_eq!(
        err.to_string(),
        "demo.yaml:10:17: routes[0].retry.attempts: must be between 1 and 10, got 0"
    );
}

#[test]
fn several_mistakes_in_one_document_are_all_reported() {
    let text = "\
apiVersion: sidemesh.io/v1
kind: Mesh
mesh:
  trustDomain: Not_A_Domain
  tracing: { sampling: 1.5, otlpEndpoint: 'jaeger:4317' }
services:
  - name: Users
    ports: [{port: 80}, {port: 80}, {port: 70000}]
    endpoints: [localhost]
    loadBalancer: { policy: consistentHash }
    inbound:
      authorization: { allow: ['spiffe://cluster.local/ns/demo'] }
      rateLimit: { rate: 10/s, burst: 0, overrides: [{key: a, rate: 1/s}] }
routes:
  - name: r
    service: Users
    matches: [{ path: { prefix: users }, method: get, headers: [{name: x, exact: a, regex: b}] }]
    timeout: 1s
    retry: { attempts: 11, perTryTimeout: 2s, backoff: { base: 1s, max: 10ms }, budget: { ratio: 2 } }
    rateLimit: { rate: 1/s, scope: global }
";
    let err = parse_str("many.yaml", text).expect_err("invalid");
    let rendered = err.to_string();
    let expected = [
        "many.yaml:4:16: mesh.trustDomain: must be a lowercase domain name",
        "many.yaml:5:24: mesh.tracing.sampling: must be between 0.0 and 1.0, got 1.5",
        "mesh.tracing.otlpEndpoint: must be an http:// or https:// URL, got `jaeger:4317`",
        "many.yaml:7:11: services[0].name: must be a lowercase DNS label",
        "many.yaml:8:32: services[0].ports[1].port: duplicate port 80 (first at many.yaml:8:20)",
        "services[0].ports[2].port: must be between 1 and 65535, got 70000",
        "services[0].endpoints[0]: invalid endpoint `localhost`: expected ip:port",
        "services[0].loadBalancer: `consistentHash` needs the `header` whose value is hashed",
        "services[0].inbound.authorization.allow[0]: invalid identity `spiffe://cluster.local/ns/demo`",
        "services[0].inbound.rateLimit.burst: must be between 1 and 1000000, got 0",
        "services[0].inbound.rateLimit.overrides: overrides need a `key`",
        "routes[0].matches[0].path.prefix: must start with `/`, got `users`",
        "routes[0].matches[0].method: must be an uppercase HTTP method such as GET, got `get`",
        "routes[0].matches[0].headers[0]: give either `exact` or `regex`, not both",
        "routes[0].retry.attempts: must be between 1 and 10, got 11",
        "routes[0].retry.perTryTimeout: must not exceed the route timeout (1s), got 2s",
        "routes[0].retry.backoff.max: must be at least `base` (1s), got 10ms",
        "routes[0].retry.budget.ratio: must be between 0.0 and 1.0, got 2",
        "routes[0].rateLimit.scope: `global` applies to a service's inbound limit only",
    ];
    for e in expected {
        assert!(rendered.contains(e), "missing `{e}` in:\n{rendered}");
    }
    assert_eq!(
        err.0.len(),
        expected.len(),
        "unexpected extra diagnostics:\n{rendered}"
    );
}

#[test]
fn mesh_settings_and_services_may_not_be_given_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let doc = "apiVersion: sidemesh.io/v1\nkind: Mesh\nmesh: { mtls: permissive }\nservices:\n  - name: users\n    ports: [{port: 80}]\n";
    std::fs::write(dir.path().join("a.yaml"), doc).expect("write");
    std::fs::write(dir.path().join("b.yml"), doc).expect("write");
    let found = diagnostics_of(dir.path());
    let rendered = render(&found);
    assert_eq!(found.len(), 2, "{rendered}");
    assert!(
        rendered.contains("b.yml:3:7: mesh: mesh settings are already given at"),
        "{rendered}"
    );
    assert!(
        rendered.contains(
            "b.yml:5:11: services[0].name: duplicate service `users.default` (first defined at"
        ),
        "{rendered}"
    );
}

#[test]
fn ambiguous_and_namespaced_service_references() {
    let text = "\
apiVersion: sidemesh.io/v1
kind: Mesh
services:
  - { name: users, namespace: a, ports: [{port: 80}] }
  - { name: users, namespace: b, ports: [{port: 80}, {port: 81}] }
routes:
  - { name: ok, service: users.a, backends: [{service: users.b, port: 81}] }
  - { name: ambiguous, service: users }
  - { name: bad-port, service: users.a, backends: [{service: users.a, port: 81}] }
";
    let err = parse_str("ns.yaml", text).expect_err("invalid");
    let rendered = err.to_string();
    assert_eq!(err.0.len(), 2, "{rendered}");
    assert!(rendered.contains("ns.yaml:8:33: routes[1].service: service `users` exists in several namespaces (a, b); write `users.<namespace>`"), "{rendered}");
    assert!(
        rendered
            .contains("routes[2].backends[0].port: service `users.a` has no port 81 (ports: 80)"),
        "{rendered}"
    );
}

#[test]
fn wrong_api_version_and_kind_are_refused() {
    let err = parse_str("v.yaml", "apiVersion: sidemesh.io/v2\nkind: Mesh\n").expect_err("v2");
    assert_eq!(
        err.to_string(),
        "v.yaml:1:13: apiVersion: unknown variant `sidemesh.io/v2`, expected `sidemesh.io/v1`"
    );
    let err =
        parse_str("k.yaml", "apiVersion: sidemesh.io/v1\nkind: Deployment\n").expect_err("kind");
    assert!(
        err.to_string()
            .starts_with("k.yaml:2:7: kind: unknown variant `Deployment`"),
        "{err}"
    );
}

#[test]
fn a_folder_without_yaml_is_an_error_not_an_empty_mesh() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("README.md"), "not config").expect("write");
    let err = load(dir.path()).expect_err("no yaml");
    assert!(matches!(err, LoadError::NoFiles { .. }), "{err}");
    assert!(
        err.to_string().ends_with("no .yaml or .yml files found"),
        "{err}"
    );
}

fn render(found: &[Diagnostic]) -> String {
    found.iter().map(|d| format!("{d}\n")).collect()
}

#[test]
fn overload_protection_settings_out_of_range_are_refused_with_their_positions() {
    let text = "\
apiVersion: sidemesh.io/v1
kind: Mesh
services:
  - name: users
    ports: [{port: 80}]
    circuitBreaker: { maxRequests: 0, maxPendingRequests: 5 }
    inbound:
      adaptiveConcurrency: { minLimit: 10, maxLimit: 5, tolerance: 0.5 }
  - name: orders
    ports: [{port: 80}]
    circuitBreaker: { maxConnections: 200000 }
routes:
  - name: r
    service: users
    adaptiveConcurrency: { initialLimit: 2000 }
";
    let err = parse_str("overload.yaml", text).expect_err("invalid");
    let rendered = err.to_string();
    let expected = [
        "overload.yaml:6:36: services[0].circuitBreaker.maxRequests: must be between 1 and 1000000, got 0",
        "services[0].circuitBreaker.maxPendingRequests: requests only wait for a connection under `maxConnections`",
        "services[0].inbound.adaptiveConcurrency.maxLimit: must be at least `minLimit` (10), got 5",
        "services[0].inbound.adaptiveConcurrency.tolerance: must be between 1 and 10, got 0.5",
        "services[1].circuitBreaker.maxConnections: must be between 1 and 100000, got 200000",
        "routes[0].adaptiveConcurrency.initialLimit: must be between `minLimit` (4) and `maxLimit` (1000), got 2000",
    ];
    for e in expected {
        assert!(rendered.contains(e), "missing `{e}` in:\n{rendered}");
    }
    assert_eq!(
        err.0.len(),
        expected.len(),
        "unexpected extra diagnostics:\n{rendered}"
    );

    let fine = "\
apiVersion: sidemesh.io/v1
kind: Mesh
services:
  - name: users
    ports: [{port: 80}]
    circuitBreaker: { maxRequests: 100, maxConnections: 10, maxPendingRequests: 20 }
    inbound: { adaptiveConcurrency: {} }
";
    let mesh = parse_str("fine.yaml", fine).expect("valid");
    let users = &mesh.services[0];
    let cb = users.circuit_breaker.expect("circuit breaker");
    assert_eq!(
        (cb.max_requests, cb.max_connections, cb.max_pending_requests),
        (Some(100), Some(10), 20)
    );
    let ac = users.inbound.adaptive_concurrency.expect("adaptive");
    assert_eq!(
        (ac.initial_limit, ac.min_limit, ac.max_limit, ac.tolerance),
        (20, 4, 1000, 1.5)
    );
}
