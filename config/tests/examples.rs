//! The shipped examples validate, say where their schema is, and the committed JSON Schema
//! matches the types it is generated from.

use std::path::{Path, PathBuf};

use sidemesh_config::{LoadBalancer, PathMatch, RateLimitKey, RetryOn, load, schema};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_examples_folder_is_one_valid_mesh() {
    let mesh = load(&crate_dir().join("examples")).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = mesh.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "users-http-canary",
            "user-lookup",
            "orders",
            "orders-create-per-client"
        ]
    );

    let canary = &mesh.routes[0];
    let weights: Vec<(String, u32)> = canary
        .backends
        .iter()
        .map(|b| (b.service.to_string(), b.weight))
        .collect();
    assert_eq!(
        weights,
        [
            ("user-service.demo".to_string(), 90),
            ("user-service-v2.demo".to_string(), 10)
        ]
    );

    let lookup = &mesh.routes[1];
    let retry = lookup.retry.as_ref().expect("retry policy");
    assert_eq!(retry.attempts, 3);
    assert!(
        retry
            .retry_on
            .contains(&RetryOn::Grpc(sidemesh_config::GrpcCode::Unavailable))
    );
    assert_eq!(
        retry.buffer_limit.bytes(),
        64 * 1024,
        "default replay buffer"
    );
    assert!(
        matches!(&lookup.matches[0].path, Some(PathMatch::Exact(p)) if p == "/demo.users.v1.UserService/GetUser")
    );

    let per_client = &mesh.routes[3];
    let limit = per_client.rate_limit.as_ref().expect("limit");
    assert_eq!(limit.key, RateLimitKey::Header("x-client-id".into()));
    assert_eq!(limit.overrides[0].key, "batch-importer");
    assert!((limit.overrides[0].rate.per_second() - 100.0).abs() < 1e-9);

    let users = mesh
        .services
        .iter()
        .find(|s| s.id.name == "user-service")
        .expect("user-service");
    assert_eq!(
        users.identity,
        "spiffe://cluster.local/ns/demo/sa/user-service"
    );
    assert_eq!(users.load_balancer, LoadBalancer::PeakEwma);
    let authz = users.inbound.authorization.as_ref().expect("authz");
    assert!(authz.allows(Some("spiffe://cluster.local/ns/demo/sa/order-service")));
    assert!(!authz.allows(Some("spiffe://cluster.local/ns/demo/sa/loadgen")));
}

#[test]
fn demo_yaml_stands_alone() {
    load(&crate_dir().join("examples/demo.yaml")).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn every_example_names_its_schema_for_editors() {
    for entry in std::fs::read_dir(crate_dir().join("examples")).expect("examples") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.starts_with("# yaml-language-server: $schema=../mesh.schema.json\n"),
            "{} must start with the yaml-language-server schema comment",
            path.display()
        );
    }
}

/// Regenerate with `cargo run -p sidemesh-control-plane --bin sidemesh -- schema > config/mesh.schema.json`
/// or `SIDEMESH_BLESS=1 cargo test -p sidemesh-config --test examples`.
#[test]
fn committed_schema_is_up_to_date() {
    let path = crate_dir().join("mesh.schema.json");
    let generated = schema::json_schema();
    if std::env::var_os("SIDEMESH_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write schema");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is stale: run `cargo run -p sidemesh-control-plane --bin sidemesh -- schema > config/mesh.schema.json`",
        path.display()
    );
}

#[test]
fn readme_documents_every_field() {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(readme).unwrap_or_default();
    let reference = schema::field_reference();
    assert!(
        readme.contains(&reference),
        "README.md's field reference is stale: replace the table under `### Field reference` with the output of \
         `cargo run -p sidemesh-control-plane --bin sidemesh -- schema --markdown`"
    );
}

/// A ConfigMap volume: `..2026_11_21_x/mesh.yaml`, `..data -> ..2026_11_21_x`, and
/// `mesh.yaml -> ..data/mesh.yaml`; an update swaps `..data` atomically to a new folder.
#[cfg(unix)]
#[test]
fn a_configmap_volume_is_read_through_its_symlinks_and_follows_a_swap() {
    use std::os::unix::fs::symlink;

    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let doc = |timeout: &str| {
        format!(
            "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: a\n    ports: [{{port: 80}}]\nroutes:\n  - name: r\n    service: a\n    timeout: {timeout}\n"
        )
    };
    std::fs::create_dir(root.join("..2026_11_21_1")).expect("mkdir");
    std::fs::write(root.join("..2026_11_21_1/mesh.yaml"), doc("1s")).expect("write");
    symlink("..2026_11_21_1", root.join("..data")).expect("symlink");
    symlink("..data/mesh.yaml", root.join("mesh.yaml")).expect("symlink");

    let sources = sidemesh_config::read_sources(root).expect("read");
    assert_eq!(
        sources.len(),
        1,
        "hidden ..data and ..timestamp entries are skipped"
    );
    let mesh = sidemesh_config::validate(&sources).expect("valid");
    assert_eq!(
        mesh.routes[0].timeout.map(|t| t.to_string()).as_deref(),
        Some("1s")
    );

    // kubelet's update: a new timestamped folder, then an atomic rename of a new `..data` link.
    std::fs::create_dir(root.join("..2026_11_21_2")).expect("mkdir");
    std::fs::write(root.join("..2026_11_21_2/mesh.yaml"), doc("2s")).expect("write");
    symlink("..2026_11_21_2", root.join("..data_tmp")).expect("symlink");
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap");
    std::fs::remove_dir_all(root.join("..2026_11_21_1")).expect("cleanup");

    let mesh = load(root).expect("valid after the swap");
    assert_eq!(
        mesh.routes[0].timeout.map(|t| t.to_string()).as_deref(),
        Some("2s")
    );
}
