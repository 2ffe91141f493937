//! The control plane process: config store, proxy streams (gRPC), admin server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sidemesh_api::v1::discovery_server::DiscoveryServer;
use sidemesh_api::v1::identity_server::IdentityServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin;
use crate::ca::Authority;
use crate::discovery::DiscoveryService;
use crate::hub::Hub;
use crate::identity::IdentityService;
use crate::metrics::Metrics;
use crate::store::Store;

pub const ENV_CONFIG: &str = "SIDEMESH_CONFIG";
/// Written to the data folder at start: the trust bundle (PEM) local proxies pin.
pub const TRUST_BUNDLE_FILE: &str = "trust-bundle.pem";
pub const ENV_LISTEN: &str = "SIDEMESH_CP_LISTEN";
pub const ENV_ADMIN: &str = "SIDEMESH_CP_ADMIN";
pub const ENV_DATA_DIR: &str = "SIDEMESH_CP_DATA_DIR";
pub const ENV_CA_DIR: &str = "SIDEMESH_CA_DIR";
pub const ENV_JOIN_TOKEN_FILE: &str = "SIDEMESH_JOIN_TOKEN_FILE";
pub const ENV_CERT_LIFETIME: &str = "SIDEMESH_CERT_LIFETIME";
pub const ENV_KUBERNETES_API: &str = "SIDEMESH_KUBERNETES_API";
pub const ENV_WEBHOOK: &str = "SIDEMESH_WEBHOOK_LISTEN";
pub const ENV_TLS_CERT: &str = "SIDEMESH_CP_TLS_CERT";
pub const ENV_TLS_KEY: &str = "SIDEMESH_CP_TLS_KEY";
pub const ENV_SERVER_NAMES: &str = "SIDEMESH_CP_SERVER_NAMES";

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sidemesh-control-plane",
    version,
    about = "The Sidemesh control plane: pushes routing config to the proxies"
)]
pub struct Args {
    /// Folder (or file) of routing YAML; in Kubernetes, the mounted ConfigMap.
    #[arg(long, env = ENV_CONFIG, default_value = "config/examples")]
    pub config: PathBuf,
    /// gRPC address the proxies connect to.
    #[arg(long, env = ENV_LISTEN, default_value = "127.0.0.1:15010")]
    pub listen: SocketAddr,
    /// Admin address: /ready, /metrics, /status, /debug/config.
    #[arg(long, env = ENV_ADMIN, default_value = "127.0.0.1:15014")]
    pub admin: SocketAddr,
    /// How often the config folder is checked.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    pub poll: Duration,
    /// A change is acted on once the files have been stable this long.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    pub debounce: Duration,
    /// A disconnected proxy's endpoint stays this long (a blip must not empty a service).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub disconnect_grace: Duration,
    /// After a start, proxies that already hold a config are not pushed to for this long,
    /// so every proxy can register again first (a restart must change nothing for traffic).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub startup_grace: Duration,
    /// Where the control plane keeps its state (the generated CA and join token).
    #[arg(long, env = ENV_DATA_DIR, default_value = ".sidemesh/control-plane")]
    pub data_dir: PathBuf,
    /// The certificate authority's folder (`ca.crt`, `ca.key`, optional `roots.crt`), e.g. a
    /// mounted Secret. Default: `<data-dir>/ca`, with a root generated on first start.
    #[arg(long, env = ENV_CA_DIR)]
    pub ca_dir: Option<PathBuf>,
    /// The join token local proxies present to get a certificate. Default:
    /// `<data-dir>/join-token`, generated on first start.
    #[arg(long, env = ENV_JOIN_TOKEN_FILE)]
    pub join_token_file: Option<PathBuf>,
    /// How long workload certificates are valid; proxies renew at about 70 %.
    #[arg(long, env = ENV_CERT_LIFETIME, value_parser = parse_duration, default_value = "24h")]
    pub cert_lifetime: Duration,
    /// Serve the mutating admission webhook (TLS) here, e.g. `0.0.0.0:15017`.
    #[arg(long, env = ENV_WEBHOOK)]
    pub webhook: Option<SocketAddr>,
    /// The control plane's TLS certificate (PEM chain) for the proxies' API and the webhook,
    /// re-read when it changes. Default: one issued by the mesh CA for --server-names and
    /// renewed, so proxies and the webhook configuration trust it through the mesh's bundle.
    #[arg(long, env = ENV_TLS_CERT, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = ENV_TLS_KEY, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Names (DNS or IP) of the generated certificate, comma-separated: the names proxies
    /// and the API server reach the control plane by.
    #[arg(
        long,
        env = ENV_SERVER_NAMES,
        value_delimiter = ',',
        default_value = crate::serving::DEFAULT_SERVER_NAMES
    )]
    pub server_names: Vec<String>,
    /// Debugging only: serve the proxies' API without TLS. Service-account tokens, keys'
    /// certificates and the config then cross the network in clear.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// The proxy image the webhook injects.
    #[arg(long, env = "SIDEMESH_PROXY_IMAGE")]
    pub proxy_image: Option<String>,
    /// The control plane's address as injected proxies reach it.
    #[arg(long, env = "SIDEMESH_CONTROL_PLANE_URL")]
    pub control_plane_url: Option<String>,
    /// Kubernetes API server that checks proxies' service-account tokens (TokenReview), e.g.
    /// `https://kubernetes.default.svc`. Default: the cluster the control plane runs in, if any.
    /// Needs the `kubernetes` build feature.
    #[arg(long, env = ENV_KUBERNETES_API)]
    pub kubernetes_api: Option<String>,
    /// The control plane's own token for the API server (default: the pod's).
    #[arg(long)]
    pub kubernetes_token_file: Option<PathBuf>,
    /// The API server's CA bundle, for https (default: the pod's).
    #[arg(long)]
    pub kubernetes_ca_file: Option<PathBuf>,
    /// The audience proxies' tokens must be issued for.
    #[arg(long, default_value = "sidemesh")]
    pub token_audience: String,
    /// Log format: json or text.
    #[arg(long, default_value = "json")]
    pub log_format: String,
}

impl Args {
    pub fn ca_dir(&self) -> PathBuf {
        self.ca_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("ca"))
    }

    pub fn join_token_file(&self) -> PathBuf {
        self.join_token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("join-token"))
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<sidemesh_config::units::Duration>()
        .map(|d| d.get())
        .map_err(|e| e.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("failed to bind the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("certificate authority: {0}")]
    Ca(#[from] crate::ca::CaError),
    #[error("{0}")]
    JoinToken(#[from] crate::identity::TokenError),
    #[error("{0}")]
    Kubernetes(String),
    #[error("admission webhook: {0}")]
    Webhook(String),
    #[error("{0}")]
    Serving(#[from] crate::serving::ServingError),
}

/// The webhook's listener and its injection settings, when it is served.
#[derive(Debug)]
struct Webhook {
    listener: TcpListener,
    inject: Arc<crate::inject::InjectConfig>,
}

async fn webhook(args: &Args, ca: &Authority) -> Result<Option<Webhook>, StartError> {
    let Some(addr) = args.webhook else {
        return Ok(None);
    };
    let mut inject = crate::inject::InjectConfig {
        trust_bundle: ca.roots_pem(),
        ..crate::inject::InjectConfig::default()
    };
    if let Some(image) = &args.proxy_image {
        inject.image.clone_from(image);
    }
    if let Some(url) = &args.control_plane_url {
        inject.control_plane.clone_from(url);
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            what: "webhook",
            addr,
            source,
        })?;
    Ok(Some(Webhook {
        listener,
        inject: Arc::new(inject),
    }))
}

/// The Kubernetes client (TokenReview and EndpointSlices), when an API server is configured
/// or this runs in a pod.
#[cfg(feature = "kubernetes")]
fn kubernetes(args: &Args) -> Result<Option<kube::Client>, StartError> {
    use crate::tokenreview::{ApiSettings, client};
    if args.kubernetes_api.is_none() && std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
        return Ok(None);
    }
    client(&ApiSettings {
        url: args.kubernetes_api.clone(),
        token_file: args.kubernetes_token_file.clone(),
        ca_file: args.kubernetes_ca_file.clone(),
    })
    .map(Some)
    .map_err(|e| StartError::Kubernetes(e.to_string()))
}

/// The Kubernetes client, shown in `Debug` output by name only.
#[cfg(feature = "kubernetes")]
struct KubeClient(kube::Client);

#[cfg(feature = "kubernetes")]
impl std::fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeClient")
    }
}

#[cfg(not(feature = "kubernetes"))]
fn kubernetes(args: &Args) -> Result<Option<()>, StartError> {
    match &args.kubernetes_api {
        Some(_) => Err(StartError::Kubernetes(
            "--kubernetes-api needs a control plane built with the `kubernetes` feature".into(),
        )),
        None => Ok(None),
    }
}

/// The join token, kept out of `Debug` output.
struct JoinToken(String);

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A control plane with its listeners bound.
#[derive(Debug)]
pub struct ControlPlane {
    pub hub: Arc<Hub>,
    pub ca: Arc<Authority>,
    /// The certificate of the proxies' API and the webhook (`None` with --insecure-plaintext
    /// and no webhook).
    pub serving: Arc<crate::serving::ServingCert>,
    join_token: JoinToken,
    webhook: Option<Webhook>,
    #[cfg(feature = "kubernetes")]
    kubernetes: Option<KubeClient>,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    grpc: TcpListener,
    admin: TcpListener,
    args: Args,
}

pub async fn build(args: Args) -> Result<ControlPlane, StartError> {
    let metrics = Metrics::new();
    let store = Store::open(&args.config, metrics.config_errors.clone());
    let hub = Hub::new(store, metrics, args.startup_grace);
    let ca = Arc::new(Authority::load_or_generate(
        &args.ca_dir(),
        args.cert_lifetime,
    )?);
    let join_token = JoinToken(crate::identity::join_token(&args.join_token_file())?);
    let bundle = args.data_dir.join(TRUST_BUNDLE_FILE);
    if let Err(e) = std::fs::create_dir_all(&args.data_dir)
        .and_then(|()| std::fs::write(&bundle, ca.roots_pem()))
    {
        tracing::warn!(path = %bundle.display(), error = %e, "cannot write the trust bundle for local proxies");
    }
    // Checked at start so a bad setting fails now, not at the first certificate request.
    #[cfg_attr(not(feature = "kubernetes"), allow(unused_variables))]
    let kubernetes = kubernetes(&args)?;
    let webhook = webhook(&args, &ca).await?;
    let serving = crate::serving::ServingCert::new(
        match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => crate::serving::Source::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => crate::serving::Source::Issued {
                names: args.server_names.clone(),
            },
        },
        ca.clone(),
    )?;
    let bind = |what, addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { what, addr, source })
    };
    let grpc = bind("grpc", args.listen).await?;
    let admin = bind("admin", args.admin).await?;
    Ok(ControlPlane {
        grpc_addr: grpc.local_addr().unwrap_or(args.listen),
        admin_addr: admin.local_addr().unwrap_or(args.admin),
        hub,
        ca,
        serving,
        join_token,
        webhook,
        #[cfg(feature = "kubernetes")]
        kubernetes: kubernetes.map(KubeClient),
        grpc,
        admin,
        args,
    })
}

/// TLS connections of the proxies' API, each handshake in its own task (a slow or silent
/// client holds up nobody), handed to the gRPC server as they complete.
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    mut stop: watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<
    Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
> {
    /// A client that has not finished its handshake by then is dropped.
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed on the proxies' API");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = crate::hub::stopped(&mut stop) => return,
            };
            let _ = stream.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(client = %peer, error = %e, "refused a connection to the proxies' API: TLS handshake failed");
                    }
                    Err(_) => {
                        tracing::warn!(client = %peer, "refused a connection to the proxies' API: no TLS handshake within 10s");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

impl ControlPlane {
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(self.hub.clone().store.clone().watch(
            self.args.poll,
            self.args.debounce,
            stop.clone(),
        ));
        tokio::spawn(
            self.hub
                .clone()
                .drive(self.args.disconnect_grace, stop.clone()),
        );
        tokio::spawn(admin::serve(self.admin, self.hub.clone(), stop.clone()));
        if let Some(webhook) = self.webhook {
            let addr = webhook
                .listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::info!(listener = "webhook", addr = %addr, "listening");
            tokio::spawn(crate::webhook::serve(
                webhook.listener,
                self.serving.server_config(&[b"http/1.1"]),
                webhook.inject,
                stop.clone(),
            ));
        }
        tokio::spawn(self.serving.clone().maintain(stop.clone()));
        tracing::info!(listener = "grpc", addr = %self.grpc_addr, tls = !self.args.insecure_plaintext, "listening");
        tracing::info!(listener = "admin", addr = %self.admin_addr, "listening");
        match self.hub.store.current() {
            Some(c) => tracing::info!(version = c.number, "ready"),
            None => tracing::warn!(
                "ready, but no valid config yet: nothing will be pushed until one appears"
            ),
        }
        let identity = IdentityService::new(
            self.ca.clone(),
            Some(self.join_token.0.clone()),
            self.hub.clone(),
        );
        #[cfg(feature = "kubernetes")]
        let identity = match self.kubernetes.as_ref().map(|k| &k.0) {
            Some(client) => {
                // On Kubernetes, EndpointSlices say which pods serve a service.
                tokio::spawn(crate::endpointslices::run(
                    client.clone(),
                    self.hub.clone(),
                    stop.clone(),
                ));
                identity.with_reviewer(Some(Arc::new(crate::tokenreview::Reviewer::new(
                    client.clone(),
                    &self.args.token_audience,
                ))))
            }
            None => identity,
        };
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_service(DiscoveryServer::new(DiscoveryService::new(
                self.hub.clone(),
            )))
            .add_service(IdentityServer::new(identity));
        let result = if self.args.insecure_plaintext {
            tracing::warn!(
                "--insecure-plaintext: the proxies' API is served WITHOUT TLS; service-account tokens, certificates and config cross the network in clear. Debugging only"
            );
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(self.grpc);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        } else {
            let tls = self.serving.server_config(&[b"h2"]);
            let incoming = tls_incoming(self.grpc, tls, stop.clone());
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        };
        let _ = stop_tx.send(true);
        result
    }
}
