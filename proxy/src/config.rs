//! The proxy's own settings (not the mesh's routing config): where it listens, which service
//! it fronts, and its limits and timeouts. Read from flags or `SIDEMESH_*` environment
//! variables; building and checking them are separate steps (`Args` -> `ProxyConfig`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

pub const ENV_CONFIG: &str = "SIDEMESH_CONFIG";
pub const ENV_SERVICE: &str = "SIDEMESH_SERVICE";
pub const ENV_MODE: &str = "SIDEMESH_MODE";
pub const ENV_HTTP1_MULTIPLEX: &str = "SIDEMESH_HTTP1_MULTIPLEX";
pub const ENV_OUTBOUND_ADDR: &str = "SIDEMESH_OUTBOUND_ADDR";
pub const ENV_INBOUND_ADDR: &str = "SIDEMESH_INBOUND_ADDR";
pub const ENV_ADMIN_ADDR: &str = "SIDEMESH_ADMIN_ADDR";
pub const ENV_APP_ADDR: &str = "SIDEMESH_APP_ADDR";
pub const ENV_UPSTREAMS: &str = "SIDEMESH_UPSTREAMS";
pub const ENV_LOG_FORMAT: &str = "SIDEMESH_LOG_FORMAT";
pub const ENV_WORKER_THREADS: &str = "SIDEMESH_WORKER_THREADS";
pub const ENV_CONTROL_PLANE: &str = "SIDEMESH_CONTROL_PLANE";
pub const ENV_PROXY_ID: &str = "SIDEMESH_PROXY_ID";
pub const ENV_NAMESPACE: &str = "SIDEMESH_NAMESPACE";
pub const ENV_ADVERTISE: &str = "SIDEMESH_ADVERTISE_ADDR";
pub const ENV_STATE_DIR: &str = "SIDEMESH_STATE_DIR";
pub const ENV_JOIN_TOKEN_FILE: &str = "SIDEMESH_JOIN_TOKEN_FILE";
pub const ENV_SERVICE_ACCOUNT_TOKEN_FILE: &str = "SIDEMESH_SERVICE_ACCOUNT_TOKEN_FILE";
pub const ENV_SERVICE_ACCOUNT: &str = "SIDEMESH_SERVICE_ACCOUNT";
pub const ENV_OTLP_ENDPOINT: &str = "SIDEMESH_OTLP_ENDPOINT";
pub const ENV_APP_PROBES: &str = "SIDEMESH_APP_PROBES";
pub const ENV_TRUST_BUNDLE_FILE: &str = "SIDEMESH_TRUST_BUNDLE_FILE";
pub const ENV_TRUST_BUNDLE: &str = "SIDEMESH_TRUST_BUNDLE";
pub const ENV_CONTROL_PLANE_SERVER_NAME: &str = "SIDEMESH_CONTROL_PLANE_SERVER_NAME";

/// How traffic reaches the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// iptables redirects the pod's traffic; the original destination comes from SO_ORIGINAL_DST.
    Transparent,
    /// Applications call local listeners (`--upstream user-service=127.0.0.1:7001`); no root needed.
    Explicit,
}

/// Command-line flags of `sidemesh-proxy`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "sidemesh-proxy", version, about = "The Sidemesh per-pod proxy")]
#[command(group = clap::ArgGroup::new("source").required(true).args(["config", "control_plane"]))]
pub struct Args {
    /// Static mode: routing YAML (file or folder) to serve from, reloaded when it changes.
    #[arg(long, env = ENV_CONFIG)]
    pub config: Option<PathBuf>,
    /// The control plane's gRPC address, e.g. `https://127.0.0.1:15010`: config is pushed from
    /// there, and certificates come from there. TLS, checked against --trust-bundle.
    #[arg(long, env = ENV_CONTROL_PLANE)]
    pub control_plane: Option<String>,
    /// The mesh's trust bundle (PEM): the control plane's certificate must chain to it.
    #[arg(long, env = ENV_TRUST_BUNDLE_FILE)]
    pub trust_bundle: Option<PathBuf>,
    /// The trust bundle as PEM text (what `sidemesh inject` sets), instead of a file.
    #[arg(long, env = ENV_TRUST_BUNDLE, conflicts_with = "trust_bundle", hide_env_values = true)]
    pub trust_bundle_pem: Option<String>,
    /// The name the control plane's certificate must carry (default: the host of
    /// --control-plane).
    #[arg(long, env = ENV_CONTROL_PLANE_SERVER_NAME)]
    pub control_plane_server_name: Option<String>,
    /// Debugging only: talk to an `http://` control plane without TLS. The credential and the
    /// config then cross the network in clear; every connection logs a warning.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// This proxy's id in `sidemesh status` (in Kubernetes, the pod name).
    #[arg(long, env = ENV_PROXY_ID)]
    pub proxy_id: Option<String>,
    /// The workload's namespace, when `--service` does not say `name.namespace`.
    #[arg(long, env = ENV_NAMESPACE, default_value = "default")]
    pub namespace: String,
    /// The address other proxies reach this one's inbound listener at (default: the inbound
    /// listener's address). It is registered as an endpoint of this proxy's service.
    #[arg(long, env = ENV_ADVERTISE)]
    pub advertise: Option<SocketAddr>,
    /// Where the last good pushed config is kept, so a restart without the control plane
    /// still serves.
    #[arg(long, env = ENV_STATE_DIR)]
    pub state_dir: Option<PathBuf>,
    /// The service this proxy fronts (`name` or `name.namespace`), as named in the routing YAML.
    #[arg(long, env = ENV_SERVICE)]
    pub service: String,
    #[arg(long, env = ENV_MODE, value_enum, default_value_t = Mode::Explicit)]
    pub mode: Mode,
    /// Outbound listener (transparent mode: where iptables redirects outgoing traffic).
    #[arg(long, env = ENV_OUTBOUND_ADDR, default_value = "127.0.0.1:15001")]
    pub outbound: SocketAddr,
    /// Inbound listener: calls to this proxy's service arrive here.
    #[arg(long, env = ENV_INBOUND_ADDR, default_value = "127.0.0.1:15006")]
    pub inbound: SocketAddr,
    /// Admin listener: /ready, /live, /metrics, /config_dump.
    #[arg(long, env = ENV_ADMIN_ADDR, default_value = "127.0.0.1:15020")]
    pub admin: SocketAddr,
    /// The application behind the inbound listener (explicit mode). Transparent mode uses the
    /// original destination's port on 127.0.0.1.
    #[arg(long, env = ENV_APP_ADDR)]
    pub app: Option<SocketAddr>,
    /// Explicit mode: a local listener per upstream service, `service=ip:port` (repeatable, or
    /// comma-separated in the environment variable).
    #[arg(long = "upstream", env = ENV_UPSTREAMS, value_delimiter = ',', value_parser = parse_upstream)]
    pub upstreams: Vec<(String, SocketAddr)>,
    /// Control-plane mode, local meshes: the join token file that proves this proxy to the
    /// control plane's CA (the control plane writes it to its data folder).
    #[arg(long, env = ENV_JOIN_TOKEN_FILE, conflicts_with = "service_account_token_file")]
    pub join_token_file: Option<PathBuf>,
    /// Control-plane mode, Kubernetes: a projected service-account token for the mesh audience.
    #[arg(long, env = ENV_SERVICE_ACCOUNT_TOKEN_FILE)]
    pub service_account_token_file: Option<PathBuf>,
    /// The workload's service account; its identity is
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`. Default: the service name.
    #[arg(long, env = ENV_SERVICE_ACCOUNT)]
    pub service_account: Option<String>,
    /// OTLP collector for this proxy's spans, overriding the config's `mesh.tracing.otlpEndpoint`
    /// (e.g. a collector on the same node). Sampling and protocol still come from the config.
    #[arg(long, env = ENV_OTLP_ENDPOINT)]
    pub otlp_endpoint: Option<String>,
    /// Application HTTP probes served on the admin port, as JSON
    /// `{"/app-health/<container>/readyz": {"port": 8080, "path": "/healthz"}}` (written by
    /// `sidemesh inject`, which points the kubelet's probes there).
    #[arg(long, env = ENV_APP_PROBES, value_parser = parse_app_probes, default_value = "{}")]
    pub app_probes: AppProbes,
    /// Log format: json or text.
    #[arg(long, env = ENV_LOG_FORMAT, default_value = "json")]
    pub log_format: String,
    /// Threads serving traffic. A sidecar shares its pod's CPU with the application, so the
    /// default is small; raise it for proxies that carry a lot.
    #[arg(long, env = ENV_WORKER_THREADS, default_value_t = 1)]
    pub worker_threads: usize,
    /// Carry HTTP/1.x requests to meshed peers as streams of one HTTP/2 connection per
    /// endpoint, and accept them so from peers (ALPN `sidemesh-h2`); `false` speaks only what
    /// proxies before this did: a TLS connection per concurrent HTTP/1.x request.
    #[arg(long, env = ENV_HTTP1_MULTIPLEX, default_value_t = true, action = clap::ArgAction::Set)]
    pub http1_multiplex: bool,
    #[command(flatten)]
    pub limits: Limits,
    #[command(flatten)]
    pub timeouts: Timeouts,
}

/// Bounds that keep a misbehaving client or upstream from exhausting the proxy.
#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct Limits {
    /// Connections accepted at once per listener; more are closed immediately.
    #[arg(long, default_value_t = 20_000)]
    pub max_connections: usize,
    /// Largest request head (request line and headers) in bytes; larger is 431.
    #[arg(long, default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,
    /// Most request headers (HTTP/1 and HTTP/2 alike); more is 431.
    #[arg(long, default_value_t = 100)]
    pub max_headers: usize,
    /// Largest upstream response head in bytes; larger is a 502 `upstream-headers-too-large`.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_response_header_bytes: usize,
    /// Most upstream response headers; more is a 502 `upstream-headers-too-large`.
    #[arg(long, default_value_t = 500)]
    pub max_response_headers: usize,
    /// Pending connections the kernel queues per listener before the proxy accepts them
    /// (capped by net.core.somaxconn); bursts of new connections beyond it lose SYNs.
    #[arg(long, default_value_t = 4096)]
    pub listen_backlog: u32,
    /// Most concurrent HTTP/2 streams per client connection.
    #[arg(long, default_value_t = 1024)]
    pub max_concurrent_streams: u32,
    /// Idle pooled HTTP/1.1 connections kept per upstream endpoint: enough for 256 concurrent
    /// requests to one endpoint without new connections. (Between meshed proxies HTTP/1.x is
    /// multiplexed on one connection, so this bounds connections to applications and to
    /// endpoints without a proxy.)
    #[arg(long, default_value_t = 256)]
    pub max_idle_per_endpoint: usize,
}

/// Timeouts of the connection stages (request timeouts come from the routing YAML).
#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct Timeouts {
    /// How long protocol detection waits for a client's first bytes before treating the
    /// connection as opaque TCP (server-first protocols send nothing first).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    #[serde(serialize_with = "as_display")]
    pub detect: Duration,
    /// How long a client may take to send a whole request head, from its first byte; slower
    /// clients get a 408 `header-timeout`.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    #[serde(serialize_with = "as_display")]
    pub header: Duration,
    /// How long a client's keep-alive connection may sit idle between requests before the
    /// proxy closes it (nginx's keepalive_timeout is 75s too).
    #[arg(long, value_parser = parse_duration, default_value = "75s")]
    #[serde(serialize_with = "as_display")]
    pub keepalive: Duration,
    /// How long a request body may make no progress (no byte arrives) before the proxy
    /// answers 408 `body-timeout` (nginx's client_body_timeout is 60s too).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    #[serde(serialize_with = "as_display")]
    pub body: Duration,
    /// Connecting to an upstream endpoint.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    #[serde(serialize_with = "as_display")]
    pub connect: Duration,
    /// The mutual-TLS handshake with a meshed endpoint, after its TCP connect. Longer than
    /// `connect`: a peer proxy stalled for a second or two (a starved core, a GC-paused node)
    /// still has its kernel accept the connection, and answers the handshake once it runs
    /// again; failing then would turn a delay into an error.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    #[serde(serialize_with = "as_display")]
    pub tls_handshake: Duration,
    /// Pooled upstream connections idle longer than this are closed.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    #[serde(serialize_with = "as_display")]
    pub idle: Duration,
    /// On SIGTERM, how long requests in flight may take to finish.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    #[serde(serialize_with = "as_display")]
    pub drain: Duration,
    /// How often the routing YAML is checked for changes.
    #[arg(long, value_parser = parse_duration, default_value = "250ms")]
    #[serde(serialize_with = "as_display")]
    pub reload_interval: Duration,
}

fn as_display<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{d:?}"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<sidemesh_config::units::Duration>()
        .map(|d| d.get())
        .map_err(|e| e.to_string())
}

/// Admin paths of application probes.
/// An application container's probe, rewritten by `sidemesh inject` to come here: the
/// kubelet's plaintext probe to the application's port would be refused by a strict-mTLS
/// inbound listener (HTTP, HTTPS, gRPC), or always succeed against the proxy itself (TCP), so
/// the proxy makes it on the kubelet's behalf, over loopback, the way the kubelet would.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AppProbe {
    pub port: u16,
    /// `http` (the default), `https` (certificate not checked, as the kubelet does not),
    /// `tcp` (a connection is enough) or `grpc` (grpc.health.v1 `Check`).
    #[serde(default, skip_serializing_if = "ProbeKind::is_http")]
    pub kind: ProbeKind,
    #[serde(default = "root_path")]
    pub path: String,
    /// Extra request headers (`httpGet.httpHeaders`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ProbeHeader>,
    /// The gRPC health service name (`grpc.service`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    #[default]
    Http,
    Https,
    Tcp,
    Grpc,
}

impl ProbeKind {
    fn is_http(&self) -> bool {
        *self == ProbeKind::Http
    }
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct ProbeHeader {
    pub name: String,
    pub value: String,
}

fn root_path() -> String {
    "/".into()
}

pub type AppProbes = std::collections::HashMap<String, AppProbe>;

fn parse_app_probes(s: &str) -> Result<AppProbes, String> {
    let probes: AppProbes = serde_json::from_str(s).map_err(|e| {
        format!("application probes must be JSON like {{\"/app-health/app/readyz\": {{\"port\": 8080, \"path\": \"/healthz\"}}}}: {e}")
    })?;
    match probes.keys().find(|k| !k.starts_with("/app-health/")) {
        Some(bad) => Err(format!("probe path `{bad}` must start with /app-health/")),
        None => Ok(probes),
    }
}

fn parse_upstream(s: &str) -> Result<(String, SocketAddr), String> {
    let (service, addr) = s.split_once('=').ok_or_else(|| {
        format!(
            "invalid upstream `{s}`: expected `service=ip:port`, e.g. `user-service=127.0.0.1:7001`"
        )
    })?;
    let addr = addr
        .parse()
        .map_err(|e| format!("invalid upstream `{s}`: `{addr}` is not ip:port ({e})"))?;
    if service.is_empty() {
        return Err(format!("invalid upstream `{s}`: the service name is empty"));
    }
    Ok((service.to_string(), addr))
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 20_000,
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            max_response_header_bytes: 64 * 1024,
            max_response_headers: 500,
            listen_backlog: 4096,
            max_concurrent_streams: 1024,
            max_idle_per_endpoint: 256,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            detect: Duration::from_secs(10),
            header: Duration::from_secs(10),
            keepalive: Duration::from_secs(75),
            body: Duration::from_secs(60),
            connect: Duration::from_secs(1),
            tls_handshake: Duration::from_secs(5),
            idle: Duration::from_secs(60),
            drain: Duration::from_secs(10),
            reload_interval: Duration::from_millis(250),
        }
    }
}

impl Args {
    /// Settings for a proxy on loopback port 0 everywhere (tests, `sidemesh up`).
    pub fn local(config: PathBuf, service: &str) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            config: Some(config),
            control_plane: None,
            trust_bundle: None,
            trust_bundle_pem: None,
            control_plane_server_name: None,
            insecure_plaintext: false,
            proxy_id: None,
            namespace: "default".into(),
            advertise: None,
            state_dir: None,
            service: service.to_string(),
            mode: Mode::Explicit,
            outbound: any,
            inbound: any,
            admin: any,
            app: None,
            upstreams: Vec::new(),
            join_token_file: None,
            service_account_token_file: None,
            service_account: None,
            otlp_endpoint: None,
            app_probes: AppProbes::new(),
            log_format: "json".into(),
            worker_threads: 1,
            http1_multiplex: true,
            limits: Limits::default(),
            timeouts: Timeouts::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_flags_name_the_problem() {
        assert_eq!(
            parse_upstream("user-service=127.0.0.1:7001"),
            Ok((
                "user-service".into(),
                "127.0.0.1:7001".parse().expect("addr")
            ))
        );
        let err = parse_upstream("user-service").expect_err("no =");
        assert!(err.contains("expected `service=ip:port`"), "{err}");
        let err = parse_upstream("user-service=localhost:7001").expect_err("not an ip");
        assert!(err.contains("`localhost:7001` is not ip:port"), "{err}");
    }
}
