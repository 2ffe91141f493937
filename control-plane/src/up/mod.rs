//! `sidemesh up`: the whole mesh on one machine, no Kubernetes, no containers, in one process.
//!
//! The control plane serves the routing config (the embedded `demo.yaml`, or the folder or file
//! `--config` names, watched for edits); each demo service gets its own proxy in explicit mode;
//! a light load flows loadgen -> its proxy -> order-service's proxy -> order-service -> its proxy ->
//! user-service's proxy -> user-service, with mutual TLS between the proxies; the control
//! plane's CA (generated in a scratch folder) issues their certificates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sidemesh_demo::faults::Faults;
use sidemesh_demo::loadgen::{self, LoadgenArgs};
use sidemesh_demo::telemetry::{LogFormat, Telemetry};
use sidemesh_demo::{orders, server, users};
use tokio::sync::watch;

use crate::summary;

mod netns;

/// The demo mesh config, embedded so `sidemesh up` works from any folder.
pub const DEMO_YAML: &str = include_str!("../../../config/examples/demo.yaml");

#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Routing config (file or folder); default: the embedded config/examples/demo.yaml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where user-service listens.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub users_addr: SocketAddr,
    /// Where order-service listens.
    #[arg(long, default_value = "127.0.0.1:8082")]
    pub orders_addr: SocketAddr,
    /// Requests per second sent to order-service.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Share of user-service requests that fail with 503/UNAVAILABLE.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Stop after this long (e.g. `30s`); runs until Ctrl-C when absent.
    #[arg(long, value_parser = server::parse_duration)]
    pub duration: Option<Duration>,
    /// OTLP/gRPC collector for spans, e.g. Jaeger at `http://127.0.0.1:4317`; without it, spans
    /// are kept in `<state-dir>/traces.jsonl` for `sidemesh traces`.
    #[arg(long)]
    pub otlp: Option<String>,
    /// The control plane's admin address (what `sidemesh status` and `sidemesh stat` read).
    #[arg(long, default_value = "127.0.0.1:15014")]
    pub control_plane_admin: SocketAddr,
    /// Where the editable copy of the demo config and the span file are kept.
    #[arg(long, default_value = ".sidemesh/up")]
    pub state_dir: PathBuf,
    /// Run each workload as a pod: a network namespace with the init container's iptables
    /// rules, its app and its proxy as separate processes, transparent interception (root).
    #[arg(long)]
    pub netns: bool,
    /// How often the traffic table is redrawn.
    #[arg(long, default_value = "2s", value_parser = server::parse_duration)]
    pub stats_interval: Duration,
}

/// The config `sidemesh up` serves: the operator's, or an editable copy of the embedded demo
/// in the state folder. A copy the operator has edited is kept, never overwritten.
fn config_path(args: &UpArgs) -> anyhow::Result<(PathBuf, String)> {
    if let Some(path) = &args.config {
        return Ok((path.clone(), path.display().to_string()));
    }
    let folder = args.state_dir.join("config");
    std::fs::create_dir_all(&folder)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", folder.display()))?;
    let file = folder.join("demo.yaml");
    let note = match std::fs::read(&file) {
        Ok(text) if text == DEMO_YAML.as_bytes() => "the demo".to_string(),
        Ok(_) => "your edited copy of the demo; delete it to start again from the demo".into(),
        // Only a missing file is written: an unreadable one is the operator's to fix.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&file, DEMO_YAML)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", file.display()))?;
            "the demo".into()
        }
        Err(e) => anyhow::bail!("cannot read {}: {e}", file.display()),
    };
    Ok((folder, format!("{} ({note})", file.display())))
}

/// Where spans go: the operator's collector (`--otlp`), or a local one listening on `ip` that
/// keeps them in `<state-dir>/traces.jsonl` for `sidemesh traces`.
struct Spans {
    /// The OTLP endpoint the proxies and apps export to.
    endpoint: Option<String>,
    local: Option<crate::traces::LocalCollector>,
    stop: watch::Sender<bool>,
}

impl Spans {
    async fn start(args: &UpArgs, ip: std::net::IpAddr) -> anyhow::Result<Spans> {
        let (stop, mut stopped) = watch::channel(false);
        let local = match &args.otlp {
            Some(_) => None,
            None => Some(
                crate::traces::LocalCollector::start(
                    SocketAddr::new(ip, 0),
                    &args.state_dir.join("traces.jsonl"),
                    async move {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    },
                )
                .await?,
            ),
        };
        let endpoint = args
            .otlp
            .clone()
            .or_else(|| local.as_ref().map(|c| format!("http://{}", c.addr)));
        Ok(Spans {
            endpoint,
            local,
            stop,
        })
    }

    /// The `traces` line of the banner.
    fn describe(&self) -> String {
        match (&self.local, &self.endpoint) {
            (Some(local), _) => format!(
                "kept in {}: `sidemesh traces` prints the latest (or pass --otlp http://127.0.0.1:4317 for Jaeger)",
                local.path.display()
            ),
            (None, Some(endpoint)) => format!("exported to {endpoint}"),
            (None, None) => "not kept".into(),
        }
    }

    /// Stops the local collector once every span it accepted is on disk; called after the
    /// mesh has stopped, so the spans of the final requests are kept.
    async fn finish(self) {
        let _ = self.stop.send(true);
        if let Some(local) = self.local {
            local.stopped().await;
        }
    }
}

/// The control plane `sidemesh up` runs in its own process: quick to notice edits, its CA and
/// join token in `data_dir`.
fn control_plane_args(
    config: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
    data_dir: PathBuf,
) -> crate::server::Args {
    crate::server::Args {
        config,
        listen,
        admin,
        poll: Duration::from_millis(100),
        debounce: Duration::from_millis(100),
        disconnect_grace: Duration::from_secs(10),
        startup_grace: Duration::from_secs(5),
        data_dir,
        ca_dir: None,
        join_token_file: None,
        cert_lifetime: Duration::from_secs(24 * 3600),
        webhook: None,
        tls_cert: None,
        tls_key: None,
        server_names: crate::serving::DEFAULT_SERVER_NAMES
            .split(',')
            .map(str::to_string)
            .collect(),
        insecure_plaintext: false,
        proxy_image: None,
        control_plane_url: None,
        kubernetes_api: None,
        kubernetes_token_file: None,
        kubernetes_ca_file: None,
        token_audience: "sidemesh".into(),
        log_format: "text".into(),
    }
}

/// Runs a proxy in control-plane mode for `service` in front of `app`.
async fn proxy(
    control_plane: SocketAddr,
    join_token: &std::path::Path,
    otlp: Option<&str>,
    service: &str,
    app: Option<SocketAddr>,
    upstreams: &[&str],
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(
    sidemesh_proxy::app::Addrs,
    std::sync::Arc<sidemesh_proxy::app::Proxy>,
    tokio::task::JoinHandle<()>,
)> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut args = sidemesh_proxy::config::Args::local(PathBuf::new(), service);
    args.config = None;
    args.control_plane = Some(format!("https://{control_plane}"));
    args.trust_bundle = Some(
        join_token
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join(crate::server::TRUST_BUNDLE_FILE),
    );
    args.proxy_id = Some(format!(
        "{}-1",
        service.split('.').next().unwrap_or(service)
    ));
    args.app = app;
    args.join_token_file = Some(join_token.to_path_buf());
    args.otlp_endpoint = otlp.map(str::to_string);
    args.inbound = any;
    args.upstreams = upstreams.iter().map(|s| (s.to_string(), any)).collect();
    args.timeouts.drain = Duration::from_secs(1);
    let app = sidemesh_proxy::app::build(args).await?;
    let (addrs, state) = (app.addrs.clone(), app.proxy().clone());
    let mut stop = stop;
    let task = tokio::spawn(app.run(async move {
        let _ = stop.wait_for(|s| *s).await;
    }));
    Ok((addrs, state, task))
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    if args.netns {
        return netns::run(args).await;
    }
    let signal = stop_signals()?;
    // The control plane's CA and join token live in a scratch folder, gone at exit.
    let scratch = tempfile::tempdir()?;
    let (config, config_name) = config_path(&args)?;
    let mesh = sidemesh_config::load(&config)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let spans = Spans::start(&args, std::net::IpAddr::from([127, 0, 0, 1])).await?;
    let otlp = spans.endpoint.clone();
    let telemetry = Telemetry::init(
        "demo-apps",
        otlp.as_deref(),
        LogFormat::Text,
        // Proxies stopping together wait out their drain for each other's pooled connections;
        // that is expected here, not worth a warning.
        "warn,sidemesh_proxy::app=error",
    )?;

    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let cp = crate::server::build(control_plane_args(
        config.clone(),
        any,
        args.control_plane_admin,
        scratch.path().join("control-plane"),
    ))
    .await?;
    let (cp_grpc, cp_admin) = (cp.grpc_addr, cp.admin_addr);
    let join_token = scratch.path().join("control-plane").join("join-token");
    let cp_task = tokio::spawn(cp.run(stopped(stop_rx.clone())));

    let users_listener = server::bind(args.users_addr).await?;
    let orders_listener = server::bind(args.orders_addr).await?;
    let users_addr = users_listener.local_addr()?;
    let orders_addr = orders_listener.local_addr()?;
    let (user_proxy, _, user_proxy_task) = proxy(
        cp_grpc,
        &join_token,
        otlp.as_deref(),
        "user-service.demo",
        Some(users_addr),
        &[],
        stop_rx.clone(),
    )
    .await?;
    let (order_proxy, order_state, order_proxy_task) = proxy(
        cp_grpc,
        &join_token,
        otlp.as_deref(),
        "order-service.demo",
        Some(orders_addr),
        &["user-service"],
        stop_rx.clone(),
    )
    .await?;
    // The load generator is a meshed client too: its proxy has no inbound side.
    let (loadgen_proxy, loadgen_state, loadgen_proxy_task) = proxy(
        cp_grpc,
        &join_token,
        otlp.as_deref(),
        "loadgen.demo",
        None,
        &["order-service"],
        stop_rx.clone(),
    )
    .await?;
    let to_orders = loadgen_proxy
        .upstreams
        .first()
        .map(|(_, a)| *a)
        .ok_or_else(|| {
            anyhow::anyhow!("the load generator's proxy has no order-service listener")
        })?;
    let user_inbound = user_proxy
        .inbound
        .ok_or_else(|| anyhow::anyhow!("user-service's proxy has no inbound listener"))?;
    let order_inbound = order_proxy
        .inbound
        .ok_or_else(|| anyhow::anyhow!("order-service's proxy has no inbound listener"))?;
    let to_users = order_proxy
        .upstreams
        .first()
        .map(|(_, a)| *a)
        .ok_or_else(|| anyhow::anyhow!("order-service's proxy has no user-service listener"))?;

    let user_app = users::app(
        users::Directory::with_demo_users(),
        Arc::new(Faults::new(args.fail_rate, None, None)),
    );
    let users_task = tokio::spawn(server::serve(
        users_listener,
        user_app,
        stopped(stop_rx.clone()),
    ));
    let channel = orders::user_service_channel(&format!("http://{to_users}"))?;
    let order_app = orders::app(channel, Arc::new(Faults::none()));
    let orders_task = tokio::spawn(server::serve(orders_listener, order_app, stopped(stop_rx)));

    // Ready once each caller's proxy knows the called service's proxy as its endpoint.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let knows = |state: &sidemesh_proxy::app::Proxy, service: &str, endpoint: SocketAddr| {
        state
            .snapshot
            .load()
            .mesh
            .services
            .iter()
            .any(|s| s.id.name == service && s.endpoints.contains(&endpoint))
    };
    loop {
        if knows(&order_state, "user-service", user_inbound)
            && knows(&loadgen_state, "order-service", order_inbound)
        {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the proxies did not get their config from the control plane within 15s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    println!("Sidemesh up: control plane, a proxy per service, demo services, light load");
    println!(
        "  config         {config_name}: {}",
        summary::one_line(&mesh)
    );
    println!(
        "  control plane  grpc https://{cp_grpc} (TLS), admin http://{cp_admin}   (sidemesh status --control-plane http://{cp_admin})"
    );
    println!(
        "  user-service   http://{users_addr}   proxy inbound {user_inbound}, admin http://{}/metrics",
        user_proxy.admin
    );
    println!(
        "  order-service  http://{orders_addr}   proxy inbound {order_inbound}, admin http://{}/metrics",
        order_proxy.admin
    );
    println!(
        "  loadgen        {} req/s to order-service through its proxy, admin http://{}/metrics",
        args.rate, loadgen_proxy.admin
    );
    println!(
        "  path           loadgen -> its proxy =mTLS=> order-service's proxy -> order-service -> its proxy =mTLS=> user-service's proxy -> user-service"
    );
    println!("  traces         {}", spans.describe());
    println!(
        "  edits          change {} and the table follows within a second; `sidemesh status` shows the push",
        config.display()
    );
    println!("  Ctrl-C stops everything");
    println!();

    let load = loadgen::run(
        LoadgenArgs {
            target: format!("http://{to_orders}"),
            rate: args.rate,
            duration: args.duration,
            max_in_flight: 256,
            unknown_user_share: 0.05,
            client_id: "sidemesh-up".into(),
        },
        |_| {},
    );
    let scraper = crate::stat::Scraper::new(&format!("http://{cp_admin}"));
    let table = crate::stat::watch(&scraper, args.stats_interval, std::future::pending());
    let outcome = tokio::select! {
        total = load => total.map(|t| say(&format!("total: {t}"))),
        shown = table => shown,
        () = signal => Ok(()),
    };
    let _ = stop_tx.send(true);
    for task in [users_task, orders_task] {
        task.await??;
    }
    for task in [user_proxy_task, order_proxy_task, loadgen_proxy_task] {
        task.await?;
    }
    cp_task.await??;
    telemetry.shutdown();
    spans.finish().await;
    say("stopped");
    outcome
}

/// Resolves on Ctrl-C, SIGTERM or SIGHUP (a closed terminal). The handlers are installed when
/// this is called, not when the future is first polled, so a signal during start-up is not
/// lost to the default action (which would skip every clean-up).
pub(crate) fn stop_signals() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
            _ = hangup.recv() => {}
        }
    })
}

/// A last line for the operator; a closed stdout (`sidemesh up | head`) is not worth a panic
/// while stopping.
pub(crate) fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}
