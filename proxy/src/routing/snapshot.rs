//! A compiled, immutable view of the routing config for one proxy: services by host name,
//! each with its balancer and its route table in match order. Swapped atomically on reload,
//! so a request sees one whole version from start to end.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use sidemesh_config::{Mesh, PathMatch, Protocol, Route, RouteMatch, ServiceId};

use crate::stages::concurrency::Concurrency;
use crate::stages::ratelimit::{Limiter, Limiters};
use crate::stages::retry::RetryState;
use crate::telemetry::metrics::{Direction, Metrics, RouteMetrics};
use crate::upstream::balance::Balancer;
use crate::upstream::breaker::{Breaker, Threshold};
use crate::upstream::endpoint::Registry;

/// Endpoints that are meshed proxies, with the SPIFFE ID each must present.
pub type Meshed = HashMap<std::net::SocketAddr, Arc<str>>;

#[derive(Debug)]
pub struct Snapshot {
    pub version: u64,
    pub mesh: Mesh,
    /// The service this proxy fronts.
    pub local: ServiceId,
    services: HashMap<ServiceId, Arc<ServiceEntry>>,
    /// `name`, `name.ns`, `name.ns.svc`, `name.ns.svc.cluster.local` -> service.
    hosts: HashMap<String, ServiceId>,
    /// Meshed endpoints by address (transparent mode reaches them by original destination).
    pub meshed: Meshed,
}

#[derive(Debug)]
pub struct ServiceEntry {
    pub id: ServiceId,
    pub label: Arc<str>,
    pub protocol: Protocol,
    pub balancer: Arc<Balancer>,
    /// `(match, route)` in precedence order; the first that matches wins.
    table: Vec<(RouteMatch, Arc<RouteEntry>)>,
    /// Requests no route matches: straight to the service, no timeout, no retries.
    default_route: Arc<RouteEntry>,
    /// The service's inbound limit, applied by its own proxies.
    pub inbound_limiter: Option<Arc<Limiter>>,
    /// The service's adaptive concurrency limit, applied by its own proxies.
    pub inbound_concurrency: Option<Arc<Concurrency>>,
    /// Who may call the service, enforced by its own proxies.
    pub authorization: Option<sidemesh_config::Authorization>,
}

#[derive(Debug)]
pub struct RouteEntry {
    pub name: Arc<str>,
    pub service: Arc<str>,
    /// The route's settings; `None` for a service's default route.
    pub config: Option<Route>,
    backends: Vec<(u32, Arc<Balancer>)>,
    total_weight: u32,
    pub metrics: RouteMetrics,
    /// The route's rate limit, applied by this (calling) proxy.
    pub limiter: Option<Arc<Limiter>>,
    /// The route's adaptive concurrency limit, applied by this (calling) proxy.
    pub concurrency: Option<Arc<Concurrency>>,
    pub retry: Option<Arc<RetryState>>,
    /// The path the route matches, for span names and `http.route` (`/users/*` for a prefix);
    /// `None` when no path is known (regexes, default routes).
    pub template: Option<Arc<str>>,
}

fn template(route: &Route) -> Option<Arc<str>> {
    match route.matches.first()?.path.as_ref()? {
        sidemesh_config::PathMatch::Exact(path) => Some(Arc::from(path.as_str())),
        sidemesh_config::PathMatch::Prefix(prefix) => {
            let sep = if prefix.ends_with('/') { "" } else { "/" };
            Some(Arc::from(format!("{prefix}{sep}*")))
        }
        sidemesh_config::PathMatch::Regex(_) => None,
    }
}

/// Why a config cannot serve this proxy.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("service `{0}` is not in the mesh config; `--service` must name one of: {1}")]
    UnknownLocalService(String, String),
}

/// What a compiled snapshot takes its live state from, so that state outlives config
/// changes: endpoints (pooled connections, outlier state), rate-limit buckets, metrics.
#[derive(Debug, Clone, Copy)]
pub struct Stores<'a> {
    pub registry: &'a Registry,
    pub limiters: &'a Limiters,
    pub metrics: &'a Metrics,
}

impl Snapshot {
    /// No services yet: what a proxy in control-plane mode serves (not ready) until its first
    /// config arrives. Every request is refused as an unknown service.
    pub fn empty(local: ServiceId) -> Self {
        let mesh = sidemesh_config::parse_str("empty", "apiVersion: sidemesh.io/v1\nkind: Mesh\n")
            .expect("an empty mesh document is valid");
        Self {
            version: 0,
            mesh,
            local,
            services: HashMap::new(),
            hosts: HashMap::new(),
            meshed: Meshed::new(),
        }
    }

    /// A snapshot whose endpoints are all plaintext (a static config).
    pub fn compile(
        mesh: Mesh,
        version: u64,
        local: &str,
        stores: &Stores<'_>,
    ) -> Result<Self, CompileError> {
        Self::compile_meshed(mesh, version, local, stores, &Meshed::new())
    }

    /// A snapshot where the endpoints in `meshed` are proxies that must present the given
    /// SPIFFE ID (the control plane says which).
    pub fn compile_meshed(
        mesh: Mesh,
        version: u64,
        local: &str,
        stores: &Stores<'_>,
        meshed: &Meshed,
    ) -> Result<Self, CompileError> {
        let Stores {
            registry,
            limiters,
            metrics,
        } = *stores;
        let local_id = find_service(&mesh, local).ok_or_else(|| {
            let names: Vec<String> = mesh.services.iter().map(|s| s.id.to_string()).collect();
            CompileError::UnknownLocalService(local.to_string(), names.join(", "))
        })?;

        let mut balancers: HashMap<ServiceId, Arc<Balancer>> = HashMap::new();
        for s in &mesh.services {
            let endpoints = s
                .endpoints
                .iter()
                .map(|addr| registry.get(*addr, meshed.get(addr).cloned()))
                .collect();
            let name = s.id.to_string();
            let breaker = s.circuit_breaker.map(|limits| {
                limiters.breakers.get_or(format!("{name}|{limits:?}"), || {
                    let names = Threshold::ALL.map(Threshold::as_str);
                    Breaker::new(
                        Arc::from(name.as_str()),
                        limits,
                        metrics.overflow_counters(&s.id.name, names),
                    )
                })
            });
            let balancer = Balancer::new(
                name.clone(),
                s.load_balancer.clone(),
                s.outlier_detection,
                endpoints,
                s.weights.clone(),
                metrics.panic_gauge(&name),
            )
            .with_breaker(breaker);
            balancers.insert(s.id.clone(), Arc::new(balancer));
        }

        let mut services = HashMap::new();
        for s in &mesh.services {
            let label: Arc<str> = Arc::from(s.id.name.as_str());
            let balancer = balancers[&s.id].clone();
            let default_route = Arc::new(RouteEntry {
                name: Arc::from("default"),
                service: label.clone(),
                config: None,
                backends: vec![(1, balancer.clone())],
                total_weight: 1,
                metrics: metrics.route(&label, "default"),
                limiter: None,
                concurrency: None,
                retry: None,
                template: None,
            });
            let mut table: Vec<(usize, RouteMatch, Arc<RouteEntry>)> = Vec::new();
            for (order, route) in mesh.routes_for(&s.id).enumerate() {
                let mut cumulative = 0;
                let backends = route
                    .backends
                    .iter()
                    .map(|b| {
                        cumulative += b.weight;
                        (cumulative, balancers[&b.service].clone())
                    })
                    .collect();
                let entry = Arc::new(RouteEntry {
                    template: template(route),
                    name: Arc::from(route.name.as_str()),
                    service: label.clone(),
                    config: Some(route.clone()),
                    backends,
                    total_weight: cumulative,
                    metrics: metrics.route(&label, &route.name),
                    limiter: route.rate_limit.as_ref().map(|spec| {
                        let counter =
                            metrics.rate_limited(Direction::Outbound, &label, &route.name);
                        limiters.limiter(
                            &format!("outbound/{}/{}", s.id, route.name),
                            &route.name,
                            spec,
                            counter,
                        )
                    }),
                    concurrency: route.adaptive_concurrency.map(|settings| {
                        let (shed, gauge) =
                            metrics.concurrency(Direction::Outbound, &label, &route.name);
                        limiters.concurrency.get_or(
                            format!("outbound/{}/{}|{settings:?}", s.id, route.name),
                            || {
                                Concurrency::new(
                                    format!("route `{}`", route.name),
                                    settings,
                                    shed,
                                    gauge,
                                )
                            },
                        )
                    }),
                    retry: route.retry.as_ref().map(|policy| {
                        let (retries, exhausted) = metrics.retry_counters(&label, &route.name);
                        Arc::new(RetryState::new(
                            policy.clone(),
                            route.timeout.map(|t| t.get()),
                            retries,
                            exhausted,
                        ))
                    }),
                });
                let matches = if route.matches.is_empty() {
                    vec![RouteMatch::default()]
                } else {
                    route.matches.clone()
                };
                for m in matches {
                    table.push((order, m, entry.clone()));
                }
            }
            table.sort_by_key(|(order, m, _)| (precedence(m), *order));
            let inbound_limiter = s
                .inbound
                .rate_limit
                .as_ref()
                .filter(|_| s.id == local_id)
                .map(|spec| {
                    let counter = metrics.rate_limited(Direction::Inbound, &label, "inbound");
                    limiters.limiter(&format!("inbound/{}", s.id), &s.id.name, spec, counter)
                });
            let inbound_concurrency = s
                .inbound
                .adaptive_concurrency
                .filter(|_| s.id == local_id)
                .map(|settings| {
                    let (shed, gauge) = metrics.concurrency(Direction::Inbound, &label, "inbound");
                    limiters
                        .concurrency
                        .get_or(format!("inbound/{}|{settings:?}", s.id), || {
                            Concurrency::new(
                                format!("service `{}` (inbound)", s.id.name),
                                settings,
                                shed,
                                gauge,
                            )
                        })
                });
            services.insert(
                s.id.clone(),
                Arc::new(ServiceEntry {
                    id: s.id.clone(),
                    label,
                    protocol: s.ports.first().map_or(Protocol::Http, |p| p.protocol),
                    balancer,
                    table: table.into_iter().map(|(_, m, e)| (m, e)).collect(),
                    default_route,
                    inbound_limiter,
                    inbound_concurrency,
                    authorization: s.inbound.authorization.clone(),
                }),
            );
        }

        let mut hosts = HashMap::new();
        for s in &mesh.services {
            let ns = &s.id.namespace;
            let name = &s.id.name;
            for alias in [
                format!("{name}.{ns}"),
                format!("{name}.{ns}.svc"),
                format!("{name}.{ns}.svc.cluster.local"),
            ] {
                hosts.insert(alias, s.id.clone());
            }
            // A bare name means the service in this proxy's namespace first (as Kubernetes DNS
            // search paths do), else the only service of that name.
            let bare = hosts.entry(name.clone()).or_insert_with(|| s.id.clone());
            if *ns == local_id.namespace {
                *bare = s.id.clone();
            }
        }

        Ok(Self {
            version,
            mesh,
            local: local_id,
            services,
            hosts,
            meshed: meshed.clone(),
        })
    }

    pub fn service(&self, id: &ServiceId) -> Option<&Arc<ServiceEntry>> {
        self.services.get(id)
    }

    /// The service a host name (without port) refers to.
    pub fn service_for_host(&self, host: &str) -> Option<&Arc<ServiceEntry>> {
        let id = self.hosts.get(host)?;
        self.services.get(id)
    }

    /// The service a name given on the command line (`name` or `name.namespace`) refers to.
    pub fn service_named(&self, name: &str) -> Option<&Arc<ServiceEntry>> {
        self.service_for_host(name)
    }

    pub fn local_service(&self) -> Option<&Arc<ServiceEntry>> {
        self.services.get(&self.local)
    }
}

fn find_service(mesh: &Mesh, name: &str) -> Option<ServiceId> {
    mesh.find_service(name, None).map(|s| s.id.clone())
}

/// Sort key, most specific first: an exact authority, then a wildcard one, then none; then
/// exact path, longer prefixes, regexes, no path; then a method over none, and more header
/// conditions over fewer. Declaration order breaks ties.
fn precedence(
    m: &RouteMatch,
) -> (
    u8,
    u8,
    std::cmp::Reverse<usize>,
    u8,
    std::cmp::Reverse<usize>,
) {
    let authority = match &m.authority {
        Some(a) if a.starts_with("*.") => 1,
        Some(_) => 0,
        None => 2,
    };
    let (kind, len) = match &m.path {
        Some(PathMatch::Exact(p)) => (0, p.len()),
        Some(PathMatch::Prefix(p)) => (1, p.len()),
        Some(PathMatch::Regex(_)) => (2, 0),
        None => (3, 0),
    };
    (
        authority,
        kind,
        std::cmp::Reverse(len),
        u8::from(m.method.is_none()),
        std::cmp::Reverse(m.headers.len()),
    )
}

/// The parts of a request that routes match on.
#[derive(Debug)]
pub struct RequestView<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub method: &'a str,
    pub headers: &'a http::HeaderMap,
}

impl ServiceEntry {
    pub fn default_route(&self) -> &Arc<RouteEntry> {
        &self.default_route
    }

    /// The route for a request: the first match in precedence order, else the default route.
    pub fn route(&self, req: &RequestView<'_>) -> &Arc<RouteEntry> {
        self.table
            .iter()
            .find(|(m, _)| matches(m, req))
            .map_or(&self.default_route, |(_, r)| r)
    }
}

impl RouteEntry {
    /// Picks a backend by weight.
    pub fn backend(&self) -> &Arc<Balancer> {
        if self.backends.len() == 1 {
            return &self.backends[0].1;
        }
        let draw = fastrand::u32(..self.total_weight.max(1));
        self.backends
            .iter()
            .find(|(cumulative, _)| draw < *cumulative)
            .map_or(&self.backends[0].1, |(_, b)| b)
    }

    pub fn timeout(&self) -> Option<std::time::Duration> {
        self.config
            .as_ref()
            .and_then(|r| r.timeout)
            .map(|d| d.get())
    }
}

pub fn matches(m: &RouteMatch, req: &RequestView<'_>) -> bool {
    if let Some(authority) = &m.authority {
        let ok = match authority.strip_prefix("*.") {
            Some(suffix) => req
                .host
                .strip_suffix(suffix)
                .is_some_and(|head| head.ends_with('.') && head.len() > 1),
            None => req.host.eq_ignore_ascii_case(authority),
        };
        if !ok {
            return false;
        }
    }
    if let Some(path) = &m.path {
        let ok = match path {
            PathMatch::Exact(p) => req.path == p,
            PathMatch::Prefix(p) => {
                p.is_empty()
                    || req
                        .path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            PathMatch::Regex(re) => re.is_match(req.path),
        };
        if !ok {
            return false;
        }
    }
    if m.method
        .as_deref()
        .is_some_and(|method| method != req.method)
    {
        return false;
    }
    m.headers.iter().all(|h| {
        let mut values = req.headers.get_all(h.name.as_str()).iter();
        match &h.value {
            sidemesh_config::HeaderValueMatch::Present => values.next().is_some(),
            sidemesh_config::HeaderValueMatch::Exact(v) => {
                values.any(|x| x.as_bytes() == v.as_bytes())
            }
            sidemesh_config::HeaderValueMatch::Regex(re) => {
                values.any(|x| x.to_str().is_ok_and(|s| re.is_match(s)))
            }
        }
    })
}

/// What `/config_dump` shows of the routing state.
#[derive(Debug, Serialize)]
pub struct SnapshotDump<'a> {
    pub version: u64,
    pub local_service: String,
    pub mesh: &'a Mesh,
    /// Each service's balancer: endpoints, weights, ejections and panic state.
    pub balancers: Vec<crate::upstream::balance::BalancerState>,
    /// Adaptive concurrency limits in force: the local service's inbound one and the routes'.
    pub adaptive_concurrency: Vec<crate::stages::concurrency::ConcurrencyState>,
}

impl Snapshot {
    pub fn dump(&self) -> SnapshotDump<'_> {
        SnapshotDump {
            version: self.version,
            local_service: self.local.to_string(),
            mesh: &self.mesh,
            balancers: {
                let mut states: Vec<_> =
                    self.services.values().map(|s| s.balancer.state()).collect();
                states.sort_by(|a, b| a.service.cmp(&b.service));
                states
            },
            adaptive_concurrency: {
                let mut limits = Vec::new();
                let mut seen = std::collections::HashSet::new();
                for service in self.services.values() {
                    let routes = service.table.iter().map(|(_, r)| r);
                    for limit in service
                        .inbound_concurrency
                        .iter()
                        .chain(routes.filter_map(|r| r.concurrency.as_ref()))
                    {
                        if seen.insert(Arc::as_ptr(limit)) {
                            limits.push(limit.state());
                        }
                    }
                }
                limits.sort_by(|a, b| a.scope.cmp(&b.scope));
                limits
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_stores() -> Stores<'static> {
        Stores {
            registry: Box::leak(Box::default()),
            limiters: Box::leak(Box::default()),
            metrics: Box::leak(Box::new(Metrics::new())),
        }
    }

    const MESH: &str = "\
apiVersion: sidemesh.io/v1
kind: Mesh
services:
  - {name: me, ports: [{port: 1}]}
  - {name: api, namespace: shop, ports: [{port: 80}]}
routes:
  - name: catch-all
    service: api
  - name: users-prefix
    service: api
    matches: [{path: {prefix: /users}}]
  - name: users-exact
    service: api
    matches: [{path: {exact: /users/me}}]
  - name: users-regex
    service: api
    matches: [{path: {regex: '/users/[0-9]+'}}]
  - name: admin-post
    service: api
    matches: [{path: {prefix: /users}, method: POST, headers: [{name: x-admin, exact: 'yes'}]}]
  - name: canary-header
    service: api
    matches: [{headers: [{name: x-canary}]}, {authority: '*.canary.example'}]
";

    fn snapshot() -> Snapshot {
        let mesh = sidemesh_config::parse_str("t.yaml", MESH).expect("valid");
        Snapshot::compile(mesh, 1, "me", &test_stores()).expect("compile")
    }

    /// (host, method, path, headers, expected route)
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        &'static str,
    );

    #[test]
    fn the_most_specific_match_wins() {
        let snapshot = snapshot();
        let api = snapshot.service_for_host("api").expect("bare name");
        for alias in ["api.shop", "api.shop.svc", "api.shop.svc.cluster.local"] {
            assert!(snapshot.service_for_host(alias).is_some(), "{alias}");
        }
        let cases: &[Case] = &[
            // (host, method, path, headers, route)
            ("api", "GET", "/users/me", &[], "users-exact"),
            ("api", "GET", "/users/42", &[], "users-prefix"),
            ("api", "GET", "/users", &[], "users-prefix"),
            ("api", "GET", "/usersx", &[], "catch-all"),
            (
                "api",
                "POST",
                "/users/1",
                &[("x-admin", "yes")],
                "admin-post",
            ),
            (
                "api",
                "POST",
                "/users/1",
                &[("x-admin", "no")],
                "users-prefix",
            ),
            (
                "api",
                "GET",
                "/other",
                &[("x-canary", "1")],
                "canary-header",
            ),
            ("a.canary.example", "GET", "/other", &[], "canary-header"),
            ("canary.example", "GET", "/other", &[], "catch-all"),
            ("api", "GET", "/", &[], "catch-all"),
        ];
        for (host, method, path, headers, expected) in cases {
            let mut map = http::HeaderMap::new();
            for (k, v) in *headers {
                map.insert(
                    http::HeaderName::from_static(k),
                    http::HeaderValue::from_static(v),
                );
            }
            let view = RequestView {
                host,
                path,
                method,
                headers: &map,
            };
            assert_eq!(
                &*api.route(&view).name,
                *expected,
                "{method} {host}{path} {headers:?}"
            );
        }
    }

    #[test]
    fn a_proxy_for_an_unknown_service_is_refused() {
        let mesh = sidemesh_config::parse_str("t.yaml", MESH).expect("valid");
        let err = Snapshot::compile(mesh, 1, "nope", &test_stores()).expect_err("unknown");
        assert!(
            err.to_string()
                .contains("must name one of: me.default, api.shop"),
            "{err}"
        );
    }
}
