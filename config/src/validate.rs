//! From YAML text to a validated [`Mesh`]: parse every document, then check every rule,
//! collecting *all* problems with file, line, column and field path before giving up.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration as StdDuration;

use regex::{Regex, RegexBuilder};
use serde::Deserialize;

use crate::error::{Diagnostic, Diagnostics};
use crate::model::*;
use crate::positions::{self, Pos, PositionIndex};
use crate::spec::*;
use crate::units::{ByteSize, Duration, Rate};

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_NAMESPACE: &str = "default";
pub const MAX_ATTEMPTS: u32 = 10;
pub const MAX_RATE_PER_SECOND: f64 = 1_000_000.0;
pub const MAX_BURST: u32 = 1_000_000;
pub const MAX_WEIGHT: u32 = 1_000_000;
/// Compiled size cap for operator regexes: they run on every request.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

static DNS_LABEL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new("^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$").expect("static regex"));
static ROUTE_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new("^[a-z0-9]([-a-z0-9._]{0,251}[a-z0-9])?$").expect("static regex"));
static TRUST_DOMAIN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new("^[a-z0-9]([-a-z0-9._]{0,251}[a-z0-9])?$").expect("static regex"));
static HEADER_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new("^[A-Za-z0-9!#$%&'*+.^_`|~-]+$").expect("static regex"));
static METHOD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new("^[A-Z]{1,20}$").expect("static regex"));
static AUTHORITY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(\*\.)?[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?$").expect("static regex")
});

/// One file to validate: its name (as shown in errors) and its text.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: PathBuf,
    pub text: String,
}

/// One successfully deserialised document and where its nodes are.
struct Document<'a> {
    file: &'a Path,
    index: PositionIndex,
    spec: MeshDocument,
}

/// Parses and validates a mesh made of `sources`. On failure, every problem found is returned.
pub fn validate(sources: &[Source]) -> Result<Mesh, Diagnostics> {
    validate_with_spec(sources).map(|(mesh, _)| mesh)
}

/// Like `validate`, and also returns the documents merged into one `MeshDocument` (mesh
/// settings from the one document that has them, services and routes in file order), which
/// the control plane filters per proxy and serialises back to YAML.
pub fn validate_with_spec(sources: &[Source]) -> Result<(Mesh, MeshDocument), Diagnostics> {
    let mut checker = Checker::default();
    let mut documents = Vec::new();
    for source in sources {
        parse_source(source, &mut documents, &mut checker.diagnostics);
    }
    let mesh = checker.check(&documents);
    if checker.diagnostics.is_empty() {
        let mut merged = MeshDocument {
            api_version: ApiVersion::V1,
            kind: Kind::Mesh,
            mesh: None,
            services: Vec::new(),
            routes: Vec::new(),
        };
        for doc in documents {
            merged.mesh = merged.mesh.or(doc.spec.mesh);
            merged.services.extend(doc.spec.services);
            merged.routes.extend(doc.spec.routes);
        }
        Ok((mesh, merged))
    } else {
        let order: HashMap<&Path, usize> = sources
            .iter()
            .enumerate()
            .map(|(i, s)| (s.file.as_path(), i))
            .collect();
        let mut diagnostics = checker.diagnostics;
        diagnostics.sort_by_key(|d| (order.get(d.file.as_path()).copied(), d.line, d.column));
        Err(Diagnostics(diagnostics))
    }
}

fn parse_source<'a>(
    source: &'a Source,
    out: &mut Vec<Document<'a>>,
    diagnostics: &mut Vec<Diagnostic>,
) {
    if is_blank(&source.text) {
        return;
    }
    let mut indexes = positions::index_documents(&source.text).into_iter();
    for document in serde_norway::Deserializer::from_str(&source.text) {
        let index = indexes.next().unwrap_or_default();
        match MeshDocument::deserialize(document) {
            Ok(spec) => out.push(Document {
                file: &source.file,
                index,
                spec,
            }),
            Err(error) => {
                // serde stops at the first problem of a document, and after a syntax error
                // the rest of the stream cannot be trusted: report it and move to the next file.
                diagnostics.push(serde_diagnostic(&source.file, &error));
                return;
            }
        }
    }
}

/// A file with nothing but comments and blank lines holds no document; it is skipped.
fn is_blank(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .all(|l| l.is_empty() || l.starts_with('#') || l == "---")
}

/// serde_norway renders `path: message at line L column C`; split that into our fields.
fn serde_diagnostic(file: &Path, error: &serde_norway::Error) -> Diagnostic {
    static PATH: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"^([A-Za-z0-9_\[\]\.?]+): (.*)$").expect("static regex"));
    let mut message = error.to_string();
    let (line, column) = match error.location() {
        Some(loc) => {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            if let Some(at) = message.find(&suffix) {
                message.replace_range(at..at + suffix.len(), "");
            }
            (loc.line(), loc.column())
        }
        None => (1, 1),
    };
    let (path, message) = match PATH.captures(&message) {
        Some(c) => (c[1].to_string(), c[2].to_string()),
        None => (String::new(), message),
    };
    Diagnostic {
        file: file.to_path_buf(),
        line,
        column,
        path,
        message,
    }
}

/// Where something was first defined, for "duplicate" messages.
#[derive(Clone)]
struct Origin {
    file: PathBuf,
    pos: Pos,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}",
            self.file.display(),
            self.pos.line,
            self.pos.column
        )
    }
}

#[derive(Default)]
struct Checker {
    diagnostics: Vec<Diagnostic>,
}

impl Checker {
    fn error(&mut self, doc: &Document<'_>, path: &str, message: impl Display) {
        let pos = doc.index.locate(path);
        self.diagnostics.push(Diagnostic {
            file: doc.file.to_path_buf(),
            line: pos.line,
            column: pos.column,
            path: path.to_string(),
            message: message.to_string(),
        });
    }

    fn origin(doc: &Document<'_>, path: &str) -> Origin {
        Origin {
            file: doc.file.to_path_buf(),
            pos: doc.index.locate(path),
        }
    }

    fn check(&mut self, documents: &[Document<'_>]) -> Mesh {
        let settings = self.settings(documents);
        let services = self.services(documents, &settings);
        let routes = self.routes(documents, &services);
        Mesh {
            settings,
            services,
            routes,
        }
    }

    fn settings(&mut self, documents: &[Document<'_>]) -> MeshSettings {
        let mut first: Option<Origin> = None;
        let mut settings = MeshSettings {
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            mtls: MtlsMode::default(),
            tracing: Tracing {
                otlp_endpoint: None,
                protocol: OtlpProtocol::default(),
                sampling: 1.0,
            },
        };
        for doc in documents {
            let Some(spec) = &doc.spec.mesh else { continue };
            if let Some(first) = &first {
                self.error(
                    doc,
                    "mesh",
                    format!(
                        "mesh settings are already given at {first}; give them in one document only"
                    ),
                );
                continue;
            }
            first = Some(Self::origin(doc, "mesh"));
            if let Some(td) = &spec.trust_domain {
                if TRUST_DOMAIN.is_match(td) {
                    settings.trust_domain = td.clone();
                } else {
                    self.error(
                        doc,
                        "mesh.trustDomain",
                        format!(
                            "must be a lowercase domain name (a-z, 0-9, '.', '-', '_'), got `{td}`"
                        ),
                    );
                }
            }
            settings.mtls = spec.mtls.unwrap_or_default();
            if let Some(tracing) = &spec.tracing {
                if let Some(endpoint) = &tracing.otlp_endpoint {
                    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                        self.error(
                            doc,
                            "mesh.tracing.otlpEndpoint",
                            format!("must be an http:// or https:// URL, got `{endpoint}`"),
                        );
                    }
                }
                let sampling = tracing.sampling.unwrap_or(1.0);
                if !(0.0..=1.0).contains(&sampling) {
                    self.error(
                        doc,
                        "mesh.tracing.sampling",
                        format!("must be between 0.0 and 1.0, got {sampling}"),
                    );
                }
                settings.tracing = Tracing {
                    otlp_endpoint: tracing.otlp_endpoint.clone(),
                    protocol: tracing.protocol.unwrap_or_default(),
                    sampling,
                };
            }
        }
        settings
    }

    fn services(&mut self, documents: &[Document<'_>], settings: &MeshSettings) -> Vec<Service> {
        let mut seen: HashMap<ServiceId, Origin> = HashMap::new();
        let mut services = Vec::new();
        for doc in documents {
            for (i, spec) in doc.spec.services.iter().enumerate() {
                let at = format!("services[{i}]");
                let service = self.service(doc, &at, spec, settings);
                if let Some(first) = seen.get(&service.id) {
                    self.error(
                        doc,
                        &format!("{at}.name"),
                        format!(
                            "duplicate service `{}` (first defined at {first})",
                            service.id
                        ),
                    );
                    continue;
                }
                seen.insert(service.id.clone(), Self::origin(doc, &format!("{at}.name")));
                services.push(service);
            }
        }
        services
    }

    fn dns_label(&mut self, doc: &Document<'_>, path: &str, value: &str) {
        if !DNS_LABEL.is_match(value) {
            self.error(
                doc,
                path,
                format!("must be a lowercase DNS label (a-z, 0-9 and '-', at most 63 characters), got `{value}`"),
            );
        }
    }

    fn service(
        &mut self,
        doc: &Document<'_>,
        path: &str,
        spec: &ServiceSpec,
        settings: &MeshSettings,
    ) -> Service {
        self.dns_label(doc, &format!("{path}.name"), &spec.name);
        let namespace = spec
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
        self.dns_label(doc, &format!("{path}.namespace"), &namespace);
        // A defaulted account is the name, which is checked above; check only what was written.
        if let Some(account) = &spec.service_account {
            self.dns_label(doc, &format!("{path}.serviceAccount"), account);
        }
        let service_account = spec
            .service_account
            .clone()
            .unwrap_or_else(|| spec.name.clone());

        let mut ports: Vec<Port> = Vec::new();
        let mut port_origins: HashMap<u16, Origin> = HashMap::new();
        let mut name_origins: HashMap<&str, Origin> = HashMap::new();
        for (j, p) in spec.ports.iter().enumerate() {
            let ppath = format!("{path}.ports[{j}]");
            let Some(number) = u16::try_from(p.port).ok().filter(|n| *n > 0) else {
                self.error(
                    doc,
                    &format!("{ppath}.port"),
                    format!("must be between 1 and 65535, got {}", p.port),
                );
                continue;
            };
            if let Some(first) = port_origins.get(&number) {
                self.error(
                    doc,
                    &format!("{ppath}.port"),
                    format!("duplicate port {number} (first at {first})"),
                );
                continue;
            }
            port_origins.insert(number, Self::origin(doc, &format!("{ppath}.port")));
            if let Some(name) = &p.name {
                self.dns_label(doc, &format!("{ppath}.name"), name);
                if let Some(first) = name_origins.get(name.as_str()) {
                    self.error(
                        doc,
                        &format!("{ppath}.name"),
                        format!("duplicate port name `{name}` (first at {first})"),
                    );
                }
                name_origins.insert(name, Self::origin(doc, &format!("{ppath}.name")));
            }
            ports.push(Port {
                port: number,
                name: p.name.clone(),
                protocol: p.protocol.unwrap_or_default(),
            });
        }

        let mut endpoints = Vec::new();
        let mut weights = Vec::new();
        for (j, e) in spec.endpoints.iter().enumerate() {
            let (epath, weight) = match e {
                EndpointSpec::Address(_) => (format!("{path}.endpoints[{j}]"), 1),
                EndpointSpec::Weighted(w) => (
                    format!("{path}.endpoints[{j}].address"),
                    w.weight.unwrap_or(1),
                ),
            };
            if !(1..=MAX_WEIGHT).contains(&weight) {
                self.error(
                    doc,
                    &format!("{path}.endpoints[{j}].weight"),
                    format!("must be between 1 and {MAX_WEIGHT}, got {weight}"),
                );
            }
            match e.address().parse::<SocketAddr>() {
                Ok(addr) if addr.port() != 0 => {
                    endpoints.push(addr);
                    weights.push(weight);
                }
                _ => self.error(
                    doc,
                    &epath,
                    format!(
                        "invalid endpoint `{}`: expected ip:port, e.g. `127.0.0.1:8080`",
                        e.address()
                    ),
                ),
            }
        }

        let load_balancer = match &spec.load_balancer {
            None => LoadBalancer::PeakEwma,
            Some(lb) => self.load_balancer(doc, &format!("{path}.loadBalancer"), lb),
        };

        let outlier_detection = self.outlier_detection(
            doc,
            &format!("{path}.outlierDetection"),
            &spec.outlier_detection.clone().unwrap_or_default(),
        );

        let mut inbound = InboundPolicy::default();
        if let Some(spec) = &spec.inbound {
            if let Some(authz) = &spec.authorization {
                let apath = format!("{path}.inbound.authorization");
                inbound.authorization = Some(Authorization {
                    allow: self.identities(doc, &format!("{apath}.allow"), &authz.allow),
                    deny: self.identities(doc, &format!("{apath}.deny"), &authz.deny),
                });
            }
            if let Some(limit) = &spec.rate_limit {
                inbound.rate_limit =
                    self.rate_limit(doc, &format!("{path}.inbound.rateLimit"), limit, true);
            }
            if let Some(adaptive) = &spec.adaptive_concurrency {
                inbound.adaptive_concurrency = Some(self.adaptive_concurrency(
                    doc,
                    &format!("{path}.inbound.adaptiveConcurrency"),
                    adaptive,
                ));
            }
        }
        let circuit_breaker = spec
            .circuit_breaker
            .as_ref()
            .map(|cb| self.circuit_breaker(doc, &format!("{path}.circuitBreaker"), cb));

        Service {
            identity: spiffe_id(&settings.trust_domain, &namespace, &service_account),
            id: ServiceId {
                name: spec.name.clone(),
                namespace,
            },
            service_account,
            ports,
            endpoints,
            weights,
            load_balancer,
            outlier_detection,
            inbound,
            circuit_breaker,
        }
    }

    fn circuit_breaker(
        &mut self,
        doc: &Document<'_>,
        path: &str,
        spec: &CircuitBreakerSpec,
    ) -> CircuitBreaker {
        if let Some(n) = spec.max_requests {
            self.within(doc, &format!("{path}.maxRequests"), n, 1, 1_000_000);
        }
        if let Some(n) = spec.max_connections {
            self.within(doc, &format!("{path}.maxConnections"), n, 1, 100_000);
        }
        if let Some(n) = spec.max_pending_requests {
            self.within(doc, &format!("{path}.maxPendingRequests"), n, 0, 1_000_000);
            if spec.max_connections.is_none() {
                self.error(
                    doc,
                    &format!("{path}.maxPendingRequests"),
                    "requests only wait for a connection under `maxConnections`: set it too, or drop this",
                );
            }
        }
        CircuitBreaker {
            max_requests: spec.max_requests,
            max_connections: spec.max_connections,
            max_pending_requests: spec.max_pending_requests.unwrap_or(0),
        }
    }

    fn adaptive_concurrency(
        &mut self,
        doc: &Document<'_>,
        path: &str,
        spec: &AdaptiveConcurrencySpec,
    ) -> AdaptiveConcurrency {
        let min_limit = spec.min_limit.unwrap_or(4);
        self.within(doc, &format!("{path}.minLimit"), min_limit, 1, 100_000);
        let max_limit = spec.max_limit.unwrap_or(1000).max(min_limit.min(100_000));
        if let Some(max) = spec.max_limit {
            self.within(doc, &format!("{path}.maxLimit"), max, 1, 100_000);
            if max < min_limit {
                self.error(
                    doc,
                    &format!("{path}.maxLimit"),
                    format!("must be at least `minLimit` ({min_limit}), got {max}"),
                );
            }
        }
        let initial_limit = spec.initial_limit.unwrap_or(20).clamp(min_limit, max_limit);
        if let Some(initial) = spec.initial_limit {
            if !(min_limit..=max_limit).contains(&initial) {
                self.error(
                    doc,
                    &format!("{path}.initialLimit"),
                    format!(
                        "must be between `minLimit` ({min_limit}) and `maxLimit` ({max_limit}), got {initial}"
                    ),
                );
            }
        }
        let tolerance = spec.tolerance.unwrap_or(1.5);
        if !(1.0..=10.0).contains(&tolerance) {
            self.error(
                doc,
                &format!("{path}.tolerance"),
                format!("must be between 1 and 10, got {tolerance}"),
            );
        }
        AdaptiveConcurrency {
            initial_limit,
            min_limit,
            max_limit,
            tolerance,
        }
    }

    fn outlier_detection(
        &mut self,
        doc: &Document<'_>,
        path: &str,
        spec: &OutlierDetectionSpec,
    ) -> OutlierDetection {
        let consecutive_failures = spec.consecutive_failures.unwrap_or(5);
        self.within(
            doc,
            &format!("{path}.consecutiveFailures"),
            consecutive_failures,
            1,
            1000,
        );
        let base_ejection = spec
            .base_ejection
            .unwrap_or(duration(StdDuration::from_secs(10)));
        let max_ejection = spec
            .max_ejection
            .unwrap_or(duration(StdDuration::from_secs(300)).max(base_ejection));
        if max_ejection < base_ejection {
            self.error(
                doc,
                &format!("{path}.maxEjection"),
                format!("must be at least `baseEjection` ({base_ejection}), got {max_ejection}"),
            );
        }
        let trial_interval = spec
            .trial_interval
            .unwrap_or(duration(StdDuration::from_secs(1)));
        let max_ejection_percent = spec.max_ejection_percent.unwrap_or(50);
        self.within(
            doc,
            &format!("{path}.maxEjectionPercent"),
            max_ejection_percent,
            0,
            100,
        );
        let panic_threshold = spec.panic_threshold.unwrap_or(50);
        self.within(
            doc,
            &format!("{path}.panicThreshold"),
            panic_threshold,
            0,
            100,
        );
        let interval = spec
            .interval
            .unwrap_or(duration(StdDuration::from_secs(10)));
        let success_rate = spec.success_rate.as_ref().map(|sr| {
            let spath = format!("{path}.successRate");
            let minimum_hosts = sr.minimum_hosts.unwrap_or(5);
            self.within(
                doc,
                &format!("{spath}.minimumHosts"),
                minimum_hosts,
                2,
                10_000,
            );
            let request_volume = sr.request_volume.unwrap_or(100);
            self.within(
                doc,
                &format!("{spath}.requestVolume"),
                request_volume,
                1,
                1_000_000,
            );
            let stdev_factor = sr.stdev_factor.unwrap_or(1.9);
            if !(0.1..=10.0).contains(&stdev_factor) {
                self.error(
                    doc,
                    &format!("{spath}.stdevFactor"),
                    format!("must be between 0.1 and 10, got {stdev_factor}"),
                );
            }
            SuccessRate {
                minimum_hosts,
                request_volume,
                stdev_factor,
            }
        });
        let failure_percentage = spec.failure_percentage.as_ref().map(|fp| {
            let fpath = format!("{path}.failurePercentage");
            let threshold = fp.threshold.unwrap_or(85);
            self.within(doc, &format!("{fpath}.threshold"), threshold, 1, 100);
            let minimum_hosts = fp.minimum_hosts.unwrap_or(5);
            self.within(
                doc,
                &format!("{fpath}.minimumHosts"),
                minimum_hosts,
                1,
                10_000,
            );
            let request_volume = fp.request_volume.unwrap_or(50);
            self.within(
                doc,
                &format!("{fpath}.requestVolume"),
                request_volume,
                1,
                1_000_000,
            );
            FailurePercentage {
                threshold,
                minimum_hosts,
                request_volume,
            }
        });
        OutlierDetection {
            consecutive_failures,
            base_ejection,
            max_ejection,
            trial_interval,
            max_ejection_percent,
            panic_threshold,
            interval,
            success_rate,
            failure_percentage,
        }
    }

    /// An error unless `min <= value <= max`.
    fn within(&mut self, doc: &Document<'_>, path: &str, value: u32, min: u32, max: u32) {
        if !(min..=max).contains(&value) {
            self.error(
                doc,
                path,
                format!("must be between {min} and {max}, got {value}"),
            );
        }
    }

    fn load_balancer(
        &mut self,
        doc: &Document<'_>,
        path: &str,
        spec: &LoadBalancerSpec,
    ) -> LoadBalancer {
        match (spec.policy, &spec.header) {
            (LoadBalancerPolicy::ConsistentHash, Some(header)) => {
                self.header_name(doc, &format!("{path}.header"), header);
                LoadBalancer::ConsistentHash {
                    header: header.to_ascii_lowercase(),
                }
            }
            (LoadBalancerPolicy::ConsistentHash, None) => {
                self.error(
                    doc,
                    path,
                    "`consistentHash` needs the `header` whose value is hashed",
                );
                LoadBalancer::LeastRequest
            }
            (_, Some(_)) => {
                self.error(
                    doc,
                    &format!("{path}.header"),
                    "`header` applies to the `consistentHash` policy only",
                );
                LoadBalancer::LeastRequest
            }
            (LoadBalancerPolicy::LeastRequest, None) => LoadBalancer::LeastRequest,
            (LoadBalancerPolicy::RoundRobin, None) => LoadBalancer::RoundRobin,
            (LoadBalancerPolicy::Random, None) => LoadBalancer::Random,
            (LoadBalancerPolicy::WeightedRoundRobin, None) => LoadBalancer::WeightedRoundRobin,
            (LoadBalancerPolicy::PeakEwma, None) => LoadBalancer::PeakEwma,
        }
    }

    fn header_name(&mut self, doc: &Document<'_>, path: &str, name: &str) {
        if !HEADER_NAME.is_match(name) {
            self.error(doc, path, format!("invalid header name `{name}`"));
        }
    }

    fn identities(
        &mut self,
        doc: &Document<'_>,
        path: &str,
        list: &[String],
    ) -> Vec<IdentityPattern> {
        let mut out = Vec::new();
        for (i, raw) in list.iter().enumerate() {
            match parse_identity(raw) {
                Ok(p) => out.push(p),
                Err(why) => self.error(doc, &format!("{path}[{i}]"), why),
            }
        }
        out
    }

    fn rate_limit(
        &mut self,
        doc: &Document<'_>,
        path: &str,
        spec: &RateLimitSpec,
        inbound: bool,
    ) -> Option<RateLimit> {
        let errors = self.diagnostics.len();
        self.rate_bounds(doc, &format!("{path}.rate"), spec.rate);
        let burst = self.burst(doc, &format!("{path}.burst"), spec.rate, spec.burst);
        let key = match &spec.key {
            None | Some(RateLimitKeySpec::None) => RateLimitKey::None,
            Some(RateLimitKeySpec::Identity) => RateLimitKey::Identity,
            Some(RateLimitKeySpec::SourceIp) => RateLimitKey::SourceIp,
            Some(RateLimitKeySpec::Header(h)) => {
                self.header_name(doc, &format!("{path}.key.header"), h);
                RateLimitKey::Header(h.to_ascii_lowercase())
            }
        };
        let scope = spec.scope.unwrap_or_default();
        if scope == RateLimitScope::Global && !inbound {
            self.error(
                doc,
                &format!("{path}.scope"),
                "`global` applies to a service's inbound limit only; a route limit is enforced by each caller",
            );
        }
        if key == RateLimitKey::None && !spec.overrides.is_empty() {
            self.error(
                doc,
                &format!("{path}.overrides"),
                "overrides need a `key` (identity, sourceIp or header) to tell callers apart",
            );
        }
        let mut overrides = Vec::new();
        let mut seen: HashMap<&str, Origin> = HashMap::new();
        for (i, o) in spec.overrides.iter().enumerate() {
            let opath = format!("{path}.overrides[{i}]");
            if o.key.is_empty() {
                self.error(doc, &format!("{opath}.key"), "must not be empty");
            }
            if let Some(first) = seen.get(o.key.as_str()) {
                self.error(
                    doc,
                    &format!("{opath}.key"),
                    format!("duplicate override key `{}` (first at {first})", o.key),
                );
            }
            seen.insert(&o.key, Self::origin(doc, &format!("{opath}.key")));
            self.rate_bounds(doc, &format!("{opath}.rate"), o.rate);
            let burst = self.burst(doc, &format!("{opath}.burst"), o.rate, o.burst);
            overrides.push(RateLimitOverride {
                key: o.key.clone(),
                rate: o.rate,
                burst,
            });
        }
        (self.diagnostics.len() == errors).then_some(RateLimit {
            rate: spec.rate,
            burst,
            key,
            scope,
            overrides,
        })
    }

    fn rate_bounds(&mut self, doc: &Document<'_>, path: &str, rate: Rate) {
        if rate.per_second() > MAX_RATE_PER_SECOND {
            self.error(doc, path, format!("must be at most 1000000/s, got {rate}"));
        }
    }

    /// Default burst: one second's worth of tokens, at least one.
    fn burst(&mut self, doc: &Document<'_>, path: &str, rate: Rate, burst: Option<u32>) -> u32 {
        match burst {
            Some(b) if (1..=MAX_BURST).contains(&b) => b,
            Some(b) => {
                self.error(
                    doc,
                    path,
                    format!("must be between 1 and {MAX_BURST}, got {b}"),
                );
                1
            }
            None => (rate.per_second().ceil() as u32).clamp(1, MAX_BURST),
        }
    }

    fn routes(&mut self, documents: &[Document<'_>], services: &[Service]) -> Vec<Route> {
        let resolver = Resolver::new(services);
        let mut seen: HashMap<String, Origin> = HashMap::new();
        let mut routes = Vec::new();
        for doc in documents {
            for (i, spec) in doc.spec.routes.iter().enumerate() {
                let path = format!("routes[{i}]");
                let name_path = format!("{path}.name");
                if !ROUTE_NAME.is_match(&spec.name) {
                    self.error(
                        doc,
                        &name_path,
                        format!(
                            "must be lowercase letters, digits, '-', '.' or '_', got `{}`",
                            spec.name
                        ),
                    );
                }
                if let Some(first) = seen.get(&spec.name) {
                    self.error(
                        doc,
                        &name_path,
                        format!(
                            "duplicate route name `{}` (first defined at {first})",
                            spec.name
                        ),
                    );
                } else {
                    seen.insert(spec.name.clone(), Self::origin(doc, &name_path));
                }
                if let Some(route) = self.route(doc, &path, spec, &resolver) {
                    routes.push(route);
                }
            }
        }
        routes
    }

    fn route(
        &mut self,
        doc: &Document<'_>,
        path: &str,
        spec: &RouteSpec,
        resolver: &Resolver<'_>,
    ) -> Option<Route> {
        let errors = self.diagnostics.len();
        let service = self.resolve(doc, &format!("{path}.service"), resolver, &spec.service);

        let matches = spec
            .matches
            .iter()
            .enumerate()
            .map(|(i, m)| self.route_match(doc, &format!("{path}.matches[{i}]"), m))
            .collect();

        let mut backends = Vec::new();
        if spec.backends.is_empty() {
            if let Some(s) = service.as_ref().and_then(|id| resolver.get(id)) {
                match s.ports.first() {
                    Some(port) => backends.push(Backend {
                        service: s.id.clone(),
                        port: port.port,
                        weight: 1,
                    }),
                    None => self.error(
                        doc,
                        &format!("{path}.service"),
                        format!(
                            "service `{}` has no ports (a client-only workload): it cannot be called",
                            s.id
                        ),
                    ),
                }
            }
        }
        for (i, b) in spec.backends.iter().enumerate() {
            let bpath = format!("{path}.backends[{i}]");
            let weight = b.weight.unwrap_or(1);
            if weight == 0 || weight > MAX_WEIGHT {
                self.error(
                    doc,
                    &format!("{bpath}.weight"),
                    format!("must be between 1 and {MAX_WEIGHT}, got {weight}"),
                );
            }
            let Some(target) = self.resolve(doc, &format!("{bpath}.service"), resolver, &b.service)
            else {
                continue;
            };
            let Some(target) = resolver.get(&target) else {
                continue;
            };
            let port = match b.port {
                None if target.ports.is_empty() => {
                    self.error(
                        doc,
                        &format!("{bpath}.service"),
                        format!(
                            "service `{}` has no ports (a client-only workload): it cannot be a backend",
                            target.id
                        ),
                    );
                    None
                }
                None => target.ports.first().map(|p| p.port),
                Some(p) if target.ports.iter().any(|tp| u32::from(tp.port) == p) => {
                    u16::try_from(p).ok()
                }
                Some(p) => {
                    let known: Vec<String> =
                        target.ports.iter().map(|p| p.port.to_string()).collect();
                    self.error(
                        doc,
                        &format!("{bpath}.port"),
                        format!(
                            "service `{}` has no port {p} (ports: {})",
                            target.id,
                            known.join(", ")
                        ),
                    );
                    None
                }
            };
            if let Some(port) = port {
                backends.push(Backend {
                    service: target.id.clone(),
                    port,
                    weight,
                });
            }
        }

        let retry = spec
            .retry
            .as_ref()
            .map(|r| self.retry(doc, &format!("{path}.retry"), r, spec.timeout));
        let rate_limit = spec
            .rate_limit
            .as_ref()
            .and_then(|l| self.rate_limit(doc, &format!("{path}.rateLimit"), l, false));

        let adaptive_concurrency = spec
            .adaptive_concurrency
            .as_ref()
            .map(|a| self.adaptive_concurrency(doc, &format!("{path}.adaptiveConcurrency"), a));

        let failure_statuses = spec.failure_statuses.clone();
        for (i, on) in failure_statuses.iter().enumerate() {
            let ok = match on {
                RetryOn::ServerError | RetryOn::GatewayError => true,
                RetryOn::Status(code) => (500..=599).contains(code),
                RetryOn::Reset | RetryOn::ConnectFailure | RetryOn::Grpc(_) => false,
            };
            if !ok {
                self.error(
                    doc,
                    &format!("{path}.failureStatuses[{i}]"),
                    format!(
                        "`{on}` is not an application status: expected 5xx, gateway-error or a code \
                         from 500 to 599 (failed connections and resets always count)"
                    ),
                );
            }
        }

        if self.diagnostics.len() != errors {
            return None;
        }
        Some(Route {
            name: spec.name.clone(),
            service: service?,
            matches,
            backends,
            timeout: spec.timeout,
            retry,
            rate_limit,
            failure_statuses,
            adaptive_concurrency,
        })
    }

    fn resolve(
        &mut self,
        doc: &Document<'_>,
        path: &str,
        resolver: &Resolver<'_>,
        reference: &str,
    ) -> Option<ServiceId> {
        match resolver.resolve(reference) {
            Ok(id) => Some(id),
            Err(why) => {
                self.error(doc, path, why);
                None
            }
        }
    }

    fn route_match(&mut self, doc: &Document<'_>, path: &str, spec: &MatchSpec) -> RouteMatch {
        if let Some(a) = &spec.authority {
            if !AUTHORITY.is_match(a) {
                self.error(
                    doc,
                    &format!("{path}.authority"),
                    format!(
                        "must be a host name without port, optionally starting with `*.`, got `{a}`"
                    ),
                );
            }
        }
        if let Some(m) = &spec.method {
            if !METHOD.is_match(m) {
                self.error(
                    doc,
                    &format!("{path}.method"),
                    format!("must be an uppercase HTTP method such as GET, got `{m}`"),
                );
            }
        }
        let path_match = spec
            .path
            .as_ref()
            .and_then(|p| self.path_match(doc, &format!("{path}.path"), p));
        let mut headers = Vec::new();
        for (i, h) in spec.headers.iter().enumerate() {
            let hpath = format!("{path}.headers[{i}]");
            self.header_name(doc, &format!("{hpath}.name"), &h.name);
            let value = match (&h.exact, &h.regex) {
                (Some(_), Some(_)) => {
                    self.error(doc, &hpath, "give either `exact` or `regex`, not both");
                    continue;
                }
                (Some(v), None) => HeaderValueMatch::Exact(v.clone()),
                (None, Some(re)) => match self.regex(doc, &format!("{hpath}.regex"), re) {
                    Some(re) => HeaderValueMatch::Regex(re),
                    None => continue,
                },
                (None, None) => HeaderValueMatch::Present,
            };
            headers.push(HeaderMatch {
                name: h.name.to_ascii_lowercase(),
                value,
            });
        }
        RouteMatch {
            authority: spec.authority.as_ref().map(|a| a.to_ascii_lowercase()),
            path: path_match,
            method: spec.method.clone(),
            headers,
        }
    }

    fn path_match(
        &mut self,
        doc: &Document<'_>,
        path: &str,
        spec: &PathMatchSpec,
    ) -> Option<PathMatch> {
        let literal = |kind: &str, value: &str, this: &mut Self| {
            if value.starts_with('/') {
                true
            } else {
                this.error(
                    doc,
                    &format!("{path}.{kind}"),
                    format!("must start with `/`, got `{value}`"),
                );
                false
            }
        };
        match (&spec.exact, &spec.prefix, &spec.regex) {
            (Some(exact), None, None) => {
                literal("exact", exact, self).then(|| PathMatch::Exact(exact.clone()))
            }
            (None, Some(prefix), None) => literal("prefix", prefix, self)
                .then(|| PathMatch::Prefix(prefix.trim_end_matches('/').to_string())),
            (None, None, Some(re)) => self
                .regex(doc, &format!("{path}.regex"), re)
                .map(PathMatch::Regex),
            (None, None, None) => {
                self.error(doc, path, "give one of `exact`, `prefix` or `regex`");
                None
            }
            _ => {
                self.error(doc, path, "give only one of `exact`, `prefix` or `regex`");
                None
            }
        }
    }

    /// Regexes match the whole value, so they are anchored here once.
    fn regex(&mut self, doc: &Document<'_>, path: &str, source: &str) -> Option<Regex> {
        match RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
        {
            Ok(re) => Some(re),
            Err(e) => {
                let detail = e.to_string();
                let last = detail
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or(&detail);
                let last = last.trim().trim_start_matches("error: ");
                self.error(doc, path, format!("invalid regex `{source}`: {last}"));
                None
            }
        }
    }

    fn retry(
        &mut self,
        doc: &Document<'_>,
        path: &str,
        spec: &RetrySpec,
        timeout: Option<Duration>,
    ) -> RetryPolicy {
        if !(1..=MAX_ATTEMPTS).contains(&spec.attempts) {
            self.error(
                doc,
                &format!("{path}.attempts"),
                format!(
                    "must be between 1 and {MAX_ATTEMPTS}, got {}",
                    spec.attempts
                ),
            );
        }
        if let (Some(per_try), Some(timeout)) = (spec.per_try_timeout, timeout) {
            if per_try > timeout {
                self.error(
                    doc,
                    &format!("{path}.perTryTimeout"),
                    format!("must not exceed the route timeout ({timeout}), got {per_try}"),
                );
            }
        }
        let backoff = spec.backoff.as_ref();
        let base = backoff
            .and_then(|b| b.base)
            .unwrap_or(duration(StdDuration::from_millis(25)));
        let max = backoff
            .and_then(|b| b.max)
            .unwrap_or(duration(StdDuration::from_millis(250)).max(base));
        if base > max {
            self.error(
                doc,
                &format!("{path}.backoff.max"),
                format!("must be at least `base` ({base}), got {max}"),
            );
        }
        let budget = spec.budget.as_ref();
        let ratio = budget.and_then(|b| b.ratio).unwrap_or(0.2);
        if !(0.0..=1.0).contains(&ratio) {
            self.error(
                doc,
                &format!("{path}.budget.ratio"),
                format!("must be between 0.0 and 1.0, got {ratio}"),
            );
        }
        let min_per_second = budget.and_then(|b| b.min_per_second).unwrap_or(10);
        if min_per_second > 100_000 {
            self.error(
                doc,
                &format!("{path}.budget.minPerSecond"),
                format!("must be at most 100000, got {min_per_second}"),
            );
        }
        let retry_on = if spec.retry_on.is_empty() {
            vec![
                RetryOn::ConnectFailure,
                RetryOn::Reset,
                RetryOn::GatewayError,
            ]
        } else {
            spec.retry_on.clone()
        };
        RetryPolicy {
            attempts: spec.attempts,
            retry_on,
            per_try_timeout: spec.per_try_timeout,
            backoff_base: base,
            backoff_max: max,
            budget: RetryBudget {
                ratio,
                min_per_second,
                window: budget
                    .and_then(|b| b.window)
                    .unwrap_or(duration(StdDuration::from_secs(10))),
            },
            non_idempotent: spec.non_idempotent.unwrap_or(false),
            buffer_limit: spec
                .buffer_limit
                .unwrap_or(ByteSize::new(64 * 1024).expect("non-zero")),
        }
    }
}

fn duration(d: StdDuration) -> Duration {
    Duration::new(d).expect("default durations are non-zero")
}

/// Parses `*`, `spiffe://td/ns/x/*` or `spiffe://td/ns/x/sa/y`.
fn parse_identity(raw: &str) -> Result<IdentityPattern, String> {
    if raw == "*" {
        return Ok(IdentityPattern::Any);
    }
    let bad = || {
        format!(
            "invalid identity `{raw}`: expected `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, \
             `spiffe://<trust-domain>/ns/<namespace>/*` or `*`"
        )
    };
    let rest = raw.strip_prefix("spiffe://").ok_or_else(bad)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let label = |s: &str| DNS_LABEL.is_match(s);
    match parts.as_slice() {
        [td, "ns", ns, "*"] if TRUST_DOMAIN.is_match(td) && label(ns) => {
            Ok(IdentityPattern::Namespace {
                trust_domain: (*td).to_string(),
                namespace: (*ns).to_string(),
            })
        }
        [td, "ns", ns, "sa", sa] if TRUST_DOMAIN.is_match(td) && label(ns) && label(sa) => {
            Ok(IdentityPattern::Exact(raw.to_string()))
        }
        _ => Err(bad()),
    }
}

/// Resolves `name` or `name.namespace` to a service.
struct Resolver<'s> {
    by_name: HashMap<&'s str, Vec<&'s Service>>,
}

impl<'s> Resolver<'s> {
    fn new(services: &'s [Service]) -> Self {
        let mut by_name: HashMap<&str, Vec<&Service>> = HashMap::new();
        for s in services {
            by_name.entry(s.id.name.as_str()).or_default().push(s);
        }
        Self { by_name }
    }

    fn get(&self, id: &ServiceId) -> Option<&'s Service> {
        self.by_name
            .get(id.name.as_str())?
            .iter()
            .find(|s| &s.id == id)
            .copied()
    }

    fn resolve(&self, reference: &str) -> Result<ServiceId, String> {
        let (name, namespace) = match reference.split_once('.') {
            Some((n, ns)) => (n, Some(ns)),
            None => (reference, None),
        };
        let candidates = self
            .by_name
            .get(name)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let found: Vec<&&Service> = candidates
            .iter()
            .filter(|s| namespace.is_none_or(|ns| s.id.namespace == ns))
            .collect();
        match found.as_slice() {
            [one] => Ok(one.id.clone()),
            [] => {
                let mut known: Vec<String> = self
                    .by_name
                    .values()
                    .flatten()
                    .map(|s| s.id.name.clone())
                    .collect();
                known.sort();
                known.dedup();
                Err(if known.is_empty() {
                    format!("unknown service `{reference}`: no services are defined")
                } else {
                    format!(
                        "unknown service `{reference}` (known services: {})",
                        known.join(", ")
                    )
                })
            }
            many => {
                let namespaces: Vec<&str> = many.iter().map(|s| s.id.namespace.as_str()).collect();
                Err(format!(
                    "service `{reference}` exists in several namespaces ({}); write `{name}.<namespace>`",
                    namespaces.join(", ")
                ))
            }
        }
    }
}
