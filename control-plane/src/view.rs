//! A proxy's view of the mesh: its own service, the services it calls and the routes that
//! govern those calls, with endpoints from the registry, as a routing-language document. The
//! proxy validates it with the same crate the control plane used.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use sidemesh_api::v1;
use sidemesh_config::{MtlsMode, ServiceId};

use sidemesh_config::spec::{RateLimitScope, RateLimitSpec};
use sidemesh_config::units::Rate;

use crate::registry::ProxyInfo;
use crate::store::{ConfigVersion, fnv64};

#[derive(Debug, Clone)]
pub struct View {
    pub yaml: String,
    pub hash: String,
    pub endpoints: Vec<v1::ServiceEndpoints>,
}

fn resolve(config: &ConfigVersion, name: &str, namespace_hint: &str) -> Option<ServiceId> {
    config
        .mesh
        .find_service(name, Some(namespace_hint))
        .map(|s| s.id.clone())
}

/// Computes `proxy`'s view of `config` with the registered `endpoints`.
pub fn compute(
    config: &ConfigVersion,
    proxy: &ProxyInfo,
    endpoints: &HashMap<ServiceId, Vec<(SocketAddr, String)>>,
) -> View {
    let mesh = &config.mesh;
    let local = resolve(config, &proxy.service, &proxy.namespace);
    let called: HashSet<ServiceId> = if proxy.upstreams.is_empty() {
        mesh.services.iter().map(|s| s.id.clone()).collect()
    } else {
        proxy
            .upstreams
            .iter()
            .filter_map(|u| resolve(config, u, &proxy.namespace))
            .collect()
    };
    let mut keep: HashSet<ServiceId> = called.clone();
    keep.extend(local.clone());
    // Routes are validated one to one with their specs, in order.
    let mut routes = Vec::new();
    for (route, spec) in mesh.routes.iter().zip(&config.spec.routes) {
        if called.contains(&route.service) {
            keep.extend(route.backends.iter().map(|b| b.service.clone()));
            routes.push(spec.clone());
        }
    }
    let mut doc = config.spec.clone();
    doc.routes = routes;
    let mut views_endpoints = Vec::new();
    doc.services = mesh
        .services
        .iter()
        .zip(&config.spec.services)
        .filter(|(s, _)| keep.contains(&s.id))
        .map(|(s, spec)| {
            let mut spec = spec.clone();
            if let Some(registered) = endpoints.get(&s.id) {
                // Registered proxies replace static endpoints: calls go through the server's proxy.
                spec.endpoints = registered
                    .iter()
                    .map(|(addr, _)| addr.to_string().into())
                    .collect();
                views_endpoints.push(v1::ServiceEndpoints {
                    service: s.id.name.clone(),
                    namespace: s.id.namespace.clone(),
                    endpoints: registered
                        .iter()
                        // A proxy registered with a certificate is meshed: callers expect the
                        // identity the config gives the service, so a workload running under
                        // another service account is refused by them, not trusted.
                        .map(|(addr, registered)| v1::Endpoint {
                            address: addr.to_string(),
                            // In strict mode every endpoint must prove the service's identity:
                            // a registration without a certificate gets no plaintext traffic.
                            identity: if registered.is_empty()
                                && mesh.settings.mtls != MtlsMode::Strict
                            {
                                String::new()
                            } else {
                                s.identity.clone()
                            },
                        })
                        .collect(),
                });
            }
            spec
        })
        .collect();
    // A `global` inbound limit is shared out among the service's live proxies.
    if let Some(local) = &local {
        let replicas = endpoints.get(local).map_or(1, Vec::len).max(1) as u64;
        for (s, spec) in mesh.services.iter().zip(doc.services.iter_mut()) {
            if &s.id != local || replicas == 1 {
                continue;
            }
            if let Some(limit) = spec.inbound.as_mut().and_then(|i| i.rate_limit.as_mut()) {
                if limit.scope == Some(RateLimitScope::Global) {
                    share_out(limit, replicas);
                }
            }
        }
    }
    let yaml = serde_norway::to_string(&doc).unwrap_or_default();
    // Which endpoints are meshed is not in the YAML: it is part of the view all the same.
    let meshed: String = views_endpoints
        .iter()
        .flat_map(|s| &s.endpoints)
        .map(|e| format!("{}={};", e.address, e.identity))
        .collect();
    let hash = fnv64(&[yaml.as_bytes(), meshed.as_bytes()]);
    View {
        yaml,
        hash,
        endpoints: views_endpoints,
    }
}

/// `rate / n`: in the rate's own unit when it divides evenly, else per hour (exact to
/// 1/3600 of a request per second).
fn share(rate: Rate, n: u64) -> Rate {
    if rate.count() % n == 0 {
        return Rate::new(rate.count() / n, rate.per()).unwrap_or(rate);
    }
    let per_hour = u128::from(rate.count()) * 3600 / u128::from(rate.per().as_secs().max(1));
    let count = u64::try_from((per_hour + u128::from(n) / 2) / u128::from(n))
        .unwrap_or(u64::MAX)
        .max(1);
    Rate::new(count, std::time::Duration::from_secs(3600)).unwrap_or(rate)
}

/// Each of `n` proxies enforces `1/n` of the rate and of the burst.
fn share_out(limit: &mut RateLimitSpec, n: u64) {
    limit.rate = share(limit.rate, n);
    limit.burst = limit
        .burst
        .map(|b| b.div_ceil(u32::try_from(n).unwrap_or(u32::MAX)).max(1));
    for o in &mut limit.overrides {
        o.rate = share(o.rate, n);
        o.burst = o
            .burst
            .map(|b| b.div_ceil(u32::try_from(n).unwrap_or(u32::MAX)).max(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "\
apiVersion: sidemesh.io/v1
kind: Mesh
services:
  - {name: client, ports: [{port: 1}]}
  - {name: users, ports: [{port: 80}], endpoints: ['10.0.0.1:80']}
  - {name: users-v2, ports: [{port: 80}], endpoints: ['10.0.0.2:80']}
  - {name: orders, ports: [{port: 80}]}
routes:
  - {name: users-split, service: users, backends: [{service: users, weight: 9}, {service: users-v2, weight: 1}]}
  - {name: orders-route, service: orders, timeout: 1s}
";

    fn config() -> ConfigVersion {
        let sources = vec![sidemesh_config::Source {
            file: "m.yaml".into(),
            text: MESH.into(),
        }];
        let (mesh, spec) = sidemesh_config::validate_with_spec(&sources).expect("valid");
        ConfigVersion {
            number: 1,
            hash: "h".into(),
            files: vec![],
            mesh,
            spec,
            changed_at: std::time::Instant::now(),
            loaded_at: std::time::SystemTime::now(),
        }
    }

    fn proxy(upstreams: &[&str]) -> ProxyInfo {
        ProxyInfo {
            id: "p".into(),
            service: "client".into(),
            namespace: "default".into(),
            address: None,
            admin: None,
            identity: String::new(),
            ready: true,
            upstreams: upstreams.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_view_holds_what_the_proxy_calls_and_validates() {
        let config = config();
        let view = compute(&config, &proxy(&["users"]), &HashMap::new());
        let mesh =
            sidemesh_config::parse_str("view", &view.yaml).expect("the view is a valid mesh");
        let names: Vec<&str> = mesh.services.iter().map(|s| s.id.name.as_str()).collect();
        assert_eq!(
            names,
            ["client", "users", "users-v2"],
            "own service, called service, its backends"
        );
        assert_eq!(mesh.routes.len(), 1);
        assert_eq!(mesh.routes[0].name, "users-split");

        let all = compute(&config, &proxy(&[]), &HashMap::new());
        assert_eq!(
            sidemesh_config::parse_str("v", &all.yaml)
                .expect("valid")
                .services
                .len(),
            4
        );
        assert_ne!(all.hash, view.hash);
    }

    #[test]
    fn global_limits_are_shared_out_among_live_proxies() {
        assert_eq!(
            share("300/s".parse().expect("rate"), 3).to_string(),
            "100/s"
        );
        assert_eq!(
            share("300/s".parse().expect("rate"), 2).to_string(),
            "150/s"
        );
        let third = share("100/s".parse().expect("rate"), 3);
        assert!((third.per_second() - 100.0 / 3.0).abs() < 0.001, "{third}");
        let mut limit = RateLimitSpec {
            rate: "300/s".parse().expect("rate"),
            burst: Some(30),
            key: None,
            scope: Some(RateLimitScope::Global),
            overrides: Vec::new(),
        };
        share_out(&mut limit, 7);
        assert_eq!(
            limit.rate.to_string(),
            "154286/h",
            "300/s over 7 proxies, per hour"
        );
        assert_eq!(limit.burst, Some(5), "burst 30 over 7, rounded up");
    }

    #[test]
    fn registered_endpoints_replace_static_ones_and_change_the_hash() {
        let config = config();
        let before = compute(&config, &proxy(&["users"]), &HashMap::new());
        let mut endpoints = HashMap::new();
        endpoints.insert(
            ServiceId {
                name: "users".into(),
                namespace: "default".into(),
            },
            vec![(
                "127.0.0.1:15006".parse().expect("addr"),
                "spiffe://cluster.local/ns/default/sa/users".to_string(),
            )],
        );
        let after = compute(&config, &proxy(&["users"]), &endpoints);
        assert_ne!(before.hash, after.hash);
        let mesh = sidemesh_config::parse_str("v", &after.yaml).expect("valid");
        let users = mesh
            .services
            .iter()
            .find(|s| s.id.name == "users")
            .expect("users");
        assert_eq!(
            users.endpoints,
            ["127.0.0.1:15006".parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(
            after.endpoints[0].endpoints[0].identity,
            "spiffe://cluster.local/ns/default/sa/users"
        );
        // Endpoints of services the proxy does not call do not affect its view.
        let unrelated = compute(&config, &proxy(&["orders"]), &endpoints);
        assert_eq!(
            unrelated.hash,
            compute(&config, &proxy(&["orders"]), &HashMap::new()).hash
        );
    }
}
