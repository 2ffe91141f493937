//! One-line summaries of a validated mesh, as `sidemesh validate` prints them.

use sidemesh_config::Mesh;

/// `3 services, 4 routes (2 with retries, 2 rate-limited), 1 inbound policy; mTLS strict, trust domain cluster.local`.
pub fn one_line(mesh: &Mesh) -> String {
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    let retries = mesh.routes.iter().filter(|r| r.retry.is_some()).count();
    let limited = mesh
        .routes
        .iter()
        .filter(|r| r.rate_limit.is_some())
        .count();
    let policies = mesh
        .services
        .iter()
        .filter(|s| s.inbound.authorization.is_some() || s.inbound.rate_limit.is_some())
        .count();
    format!(
        "{}, {} ({} with retries, {} rate-limited), {}; mTLS {}, trust domain {}",
        plural(mesh.services.len(), "service"),
        plural(mesh.routes.len(), "route"),
        retries,
        limited,
        plural(policies, "inbound policy").replace("policys", "policies"),
        serde_json::to_value(mesh.settings.mtls)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        mesh.settings.trust_domain,
    )
}
