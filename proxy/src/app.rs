//! Building and running a proxy: load and check the config, bind every listener, then serve
//! until told to stop and drain. `build` on port 0 is what tests and `sidemesh up` use.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;

use crate::config::{Args, Mode};
use crate::conn::accept::{self, ListenerKind};
use crate::identity::workload::{self as identity, IdentityState};
use crate::routing::snapshot::{CompileError, Snapshot, Stores};
use crate::source::{control, file as reload};
use crate::stages::ratelimit::Limiters;
pub use crate::state::Proxy;
use crate::telemetry::metrics::Metrics;
use crate::upstream::endpoint::{PoolConfig, Registry};
use crate::{admin, drain};

/// Why a proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config's own messages name their files, lines and columns.
    #[error("{source}")]
    Config {
        path: PathBuf,
        source: sidemesh_config::LoadError,
    },
    #[error("routing config {path}: {source}")]
    Compile { path: PathBuf, source: CompileError },
    #[error("{0}")]
    ControlPlane(#[from] crate::identity::channel::SetupError),
    #[error("failed to bind the {listener} listener on {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A proxy with its listeners bound, ready to `run`.
/// Where the routing config comes from.
#[derive(Debug)]
enum ConfigSource {
    /// A file or folder, polled for changes.
    Static { path: PathBuf, fingerprint: u64 },
    /// Pushed by the control plane; `String` is the hash of the view in force (if any).
    ControlPlane(Box<control::Identity>, String),
}

#[derive(Debug)]
pub struct App {
    proxy: Arc<Proxy>,
    source: ConfigSource,
    listeners: Vec<(ListenerKind, TcpListener)>,
    admin: TcpListener,
    pub addrs: Addrs,
}

/// Where the listeners ended up (useful with port 0).
#[derive(Debug, Clone)]
pub struct Addrs {
    pub outbound: SocketAddr,
    pub inbound: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub upstreams: Vec<(String, SocketAddr)>,
}

/// A listener with a backlog that absorbs bursts of new connections (tokio's default of 128
/// drops SYNs under a burst, and each dropped SYN stalls a client's connect for a second).
async fn bind(listener: &str, addr: SocketAddr, backlog: u32) -> Result<TcpListener, StartError> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(backlog)
    };
    bind().map_err(|source| StartError::Bind {
        listener: listener.to_string(),
        addr,
        source,
    })
}

/// `name.namespace` or `name` (with `--namespace`) as a service id.
fn local_service(args: &Args) -> sidemesh_config::ServiceId {
    match args.service.split_once('.') {
        Some((name, ns)) => sidemesh_config::ServiceId {
            name: name.to_string(),
            namespace: ns.to_string(),
        },
        None => sidemesh_config::ServiceId {
            name: args.service.clone(),
            namespace: args.namespace.clone(),
        },
    }
}

/// Where the workload certificate comes from: the control plane, with a credential.
fn identity_source(
    args: &Args,
    control_plane: Option<&crate::identity::channel::ControlPlane>,
) -> Option<identity::Source> {
    let control_plane = control_plane?.clone();
    let credential = match (&args.join_token_file, &args.service_account_token_file) {
        (Some(path), _) => identity::CredentialSource::JoinTokenFile(path.clone()),
        (None, Some(path)) => identity::CredentialSource::ServiceAccountTokenFile(path.clone()),
        (None, None) => {
            tracing::warn!(
                "no --join-token-file or --service-account-token-file: this proxy has no workload identity and cannot take part in mTLS"
            );
            return None;
        }
    };
    let local = local_service(args);
    Some(identity::Source {
        control_plane,
        state_dir: args.state_dir.clone(),
        service_account: args.service_account.clone().unwrap_or(local.name),
        namespace: local.namespace,
        credential,
    })
}

fn proxy_id(args: &Args) -> String {
    args.proxy_id.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|| "proxy".into());
        format!("{host}-{}", std::process::id())
    })
}

/// The admin address to tell the control plane: a wildcard bind (`0.0.0.0:15020` in a pod) is
/// reached at the workload's own address, or the pod's IP (`POD_IP`, from the downward API)
/// for a client-only workload that advertises none.
fn advertised_admin(
    admin: std::net::SocketAddr,
    workload: Option<std::net::SocketAddr>,
    pod_ip: Option<std::net::IpAddr>,
) -> std::net::SocketAddr {
    if !admin.ip().is_unspecified() {
        return admin;
    }
    let ip = workload
        .map(|w| w.ip())
        .filter(|ip| !ip.is_unspecified())
        .or(pod_ip)
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    std::net::SocketAddr::new(ip, admin.port())
}

/// The control plane's connection settings, checked now so a bad flag fails at start.
fn control_plane(
    args: &Args,
) -> Result<Option<crate::identity::channel::ControlPlane>, StartError> {
    use crate::identity::channel::{Bundle, ControlPlane};
    let Some(url) = &args.control_plane else {
        return Ok(None);
    };
    let bundle = match (&args.trust_bundle, &args.trust_bundle_pem) {
        (Some(path), _) => Some(Bundle::File(path.clone())),
        (None, Some(pem)) => Some(Bundle::Pem(pem.clone())),
        (None, None) => None,
    };
    let cp = ControlPlane::new(
        url,
        bundle,
        args.control_plane_server_name.as_deref(),
        args.insecure_plaintext,
    )?;
    if !cp.is_tls() {
        tracing::warn!(control_plane = %url, "--insecure-plaintext: the control-plane connection is NOT encrypted; use it for debugging only");
    }
    Ok(Some(cp))
}

pub async fn build(args: Args) -> Result<App, StartError> {
    let registry = Registry::default();
    let limiters = Limiters::default();
    let control_plane = control_plane(&args)?;
    let identity_source = identity_source(&args, control_plane.as_ref());
    let metrics = Metrics::new();
    let local = local_service(&args);
    let stores = Stores {
        registry: &registry,
        limiters: &limiters,
        metrics: &metrics,
    };
    let (snapshot, source, applied) = match (&args.config, control_plane) {
        (Some(path), _) => {
            let config_err = |source| StartError::Config {
                path: path.clone(),
                source,
            };
            let sources = sidemesh_config::read_sources(path).map_err(config_err)?;
            let mesh = sidemesh_config::validate(&sources).map_err(|d| config_err(d.into()))?;
            let snapshot =
                Snapshot::compile(mesh, 1, &args.service, &stores).map_err(|source| {
                    StartError::Compile {
                        path: path.clone(),
                        source,
                    }
                })?;
            metrics.reload(true, 1);
            let fingerprint = reload::fingerprint(&sources);
            (
                snapshot,
                ConfigSource::Static {
                    path: path.clone(),
                    fingerprint,
                },
                true,
            )
        }
        (None, Some(control_plane)) => {
            let stored = args
                .state_dir
                .as_deref()
                .and_then(|dir| control::load_stored(dir, &args.service, &stores));
            let (snapshot, hash, applied) = match stored {
                Some((snapshot, hash)) => (snapshot, hash, true),
                None => (Snapshot::empty(local.clone()), String::new(), false),
            };
            let identity = control::Identity {
                control_plane,
                proxy_id: proxy_id(&args),
                service: local.name.clone(),
                namespace: local.namespace.clone(),
                address: args.advertise,
                admin: None,
                upstreams: args.upstreams.iter().map(|(s, _)| s.clone()).collect(),
                state_dir: args.state_dir.clone(),
            };
            (
                snapshot,
                ConfigSource::ControlPlane(Box::new(identity), hash),
                applied,
            )
        }
        (None, None) => unreachable!("clap requires --config or --control-plane"),
    };

    let mut listeners = Vec::new();
    let outbound = bind("outbound", args.outbound, args.limits.listen_backlog).await?;
    let outbound_addr = outbound.local_addr().map_err(|source| StartError::Bind {
        listener: "outbound".into(),
        addr: args.outbound,
        source,
    })?;
    listeners.push((ListenerKind::Outbound, outbound));
    let mut inbound_addr = None;
    if args.app.is_some() || args.mode == Mode::Transparent {
        let inbound = bind("inbound", args.inbound, args.limits.listen_backlog).await?;
        inbound_addr = inbound.local_addr().ok();
        listeners.push((ListenerKind::Inbound, inbound));
    }
    let mut upstreams = Vec::new();
    for (service, addr) in &args.upstreams {
        let listener = bind(
            &format!("upstream:{service}"),
            *addr,
            args.limits.listen_backlog,
        )
        .await?;
        upstreams.push((service.clone(), listener.local_addr().unwrap_or(*addr)));
        listeners.push((
            ListenerKind::Upstream(Arc::from(service.as_str())),
            listener,
        ));
    }
    let admin = bind("admin", args.admin, args.limits.listen_backlog).await?;
    let admin_addr = admin.local_addr().unwrap_or(args.admin);

    let span_counters = metrics.spans.clone();
    let workload = crate::telemetry::trace::Workload {
        service: local.name.clone(),
        namespace: local.namespace.clone(),
        pod: std::env::var("POD_NAME").unwrap_or_else(|_| proxy_id(&args)),
    };
    let proxy = Arc::new(Proxy {
        service: args.service.clone(),
        mode: args.mode,
        app: args.app,
        pool: PoolConfig {
            connect_timeout: args.timeouts.connect,
            tls_handshake_timeout: args.timeouts.tls_handshake,
            idle_timeout: args.timeouts.idle,
            max_idle: args.limits.max_idle_per_endpoint,
            response_limits: crate::proto::h1::head::HeadLimits {
                max_bytes: args.limits.max_response_header_bytes,
                max_headers: args.limits.max_response_headers,
            },
            mux: args.http1_multiplex,
        },
        limits: args.limits,
        timeouts: args.timeouts,
        snapshot: ArcSwap::from_pointee(snapshot),
        registry,
        limiters,
        metrics,
        identity: IdentityState::new(identity_source),
        tracing: crate::telemetry::trace::Tracing::new(
            workload,
            args.otlp_endpoint.clone(),
            span_counters,
        ),
        app_probes: args.app_probes.clone(),
        ready: AtomicBool::new(false),
        config_applied: AtomicBool::new(applied),
        shutdown: tokio::sync::watch::channel(false).0,
    });
    if let Some(stored) = proxy
        .identity
        .source
        .as_ref()
        .and_then(identity::load_stored)
    {
        if let Ok(expiry) = stored.not_after.duration_since(std::time::UNIX_EPOCH) {
            proxy.metrics.identity_expiry(expiry.as_secs());
        }
        proxy.identity.preload(stored);
    }
    let source = match source {
        ConfigSource::ControlPlane(mut identity, hash) => {
            identity.address = identity.address.or(inbound_addr);
            let pod_ip = std::env::var("POD_IP").ok().and_then(|ip| ip.parse().ok());
            identity.admin = Some(advertised_admin(admin_addr, identity.address, pod_ip));
            ConfigSource::ControlPlane(identity, hash)
        }
        other => other,
    };
    Ok(App {
        proxy,
        source,
        listeners,
        admin,
        addrs: Addrs {
            outbound: outbound_addr,
            inbound: inbound_addr,
            admin: admin_addr,
            upstreams,
        },
    })
}

impl App {
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets requests in flight
    /// finish for up to the drain timeout.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (controller, drain) = drain::channel();
        for (kind, listener) in self.listeners {
            let addr = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::info!(listener = %kind.name(), addr = %addr, "listening");
            tokio::spawn(accept::serve(
                listener,
                kind,
                self.proxy.clone(),
                drain.clone(),
            ));
        }
        tracing::info!(listener = "admin", addr = %self.addrs.admin, "listening");
        tokio::spawn(admin::serve(self.admin, self.proxy.clone(), drain.clone()));
        let (proxy, identity_drain) = (self.proxy.clone(), drain.clone());
        tokio::spawn(async move {
            identity::run(&proxy.identity, &proxy.metrics, identity_drain).await
        });
        self.proxy
            .tracing
            .configure(&self.proxy.snapshot.load().mesh.settings.tracing);
        let proxy = self.proxy.clone();
        let source_drain = drain.clone();
        match self.source {
            ConfigSource::Static { path, fingerprint } => {
                tokio::spawn(async move {
                    reload::watch(proxy, &path, fingerprint, source_drain).await
                });
            }
            ConfigSource::ControlPlane(identity, hash) => {
                tokio::spawn(control::run(proxy, *identity, hash, source_drain));
            }
        }
        drop(drain);
        self.proxy.ready.store(true, Ordering::Release);
        // Ready means able to serve: with an identity configured, once a certificate is in.
        let mut asked = self.proxy.shutdown.subscribe();
        let shutdown = async move {
            tokio::select! {
                () = shutdown => {}
                _ = asked.wait_for(|stop| *stop) => {}
            }
        };
        tokio::pin!(shutdown);
        if !self.proxy.identity.ready() {
            tracing::info!("waiting for a workload certificate from the control plane");
        }
        let stopped = tokio::select! {
            () = self.proxy.identity.wait_ready() => false,
            () = &mut shutdown => true,
        };
        if !stopped {
            tracing::info!(
                service = %self.proxy.service,
                version = self.proxy.snapshot.load().version,
                config = self.proxy.config_applied.load(Ordering::Acquire),
                "ready"
            );
            shutdown.await;
        }
        self.proxy.ready.store(false, Ordering::Release);
        tracing::info!(grace = ?self.proxy.timeouts.drain, "draining: no new connections, finishing requests in flight");
        if controller.drain(self.proxy.timeouts.drain).await {
            tracing::info!("drained");
        } else {
            tracing::warn!("drain timeout reached with connections still open; exiting");
        }
        // The last requests' spans go out before the process does.
        self.proxy
            .tracing
            .flush(std::time::Duration::from_secs(2))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::advertised_admin;

    #[test]
    fn a_wildcard_admin_is_advertised_at_the_workload_or_pod_address() {
        let addr = |s: &str| s.parse::<std::net::SocketAddr>().expect("socket address");
        let pod = Some("10.0.0.9".parse().expect("ip"));
        let bound = addr("127.0.0.1:4000");
        assert_eq!(advertised_admin(bound, None, pod), bound);
        let any = addr("0.0.0.0:15020");
        let workload = Some(addr("10.0.0.7:8080"));
        assert_eq!(advertised_admin(any, workload, pod), addr("10.0.0.7:15020"));
        let unbound = Some(addr("0.0.0.0:15006"));
        assert_eq!(advertised_admin(any, unbound, pod), addr("10.0.0.9:15020"));
        assert_eq!(advertised_admin(any, None, None), addr("127.0.0.1:15020"));
    }
}
