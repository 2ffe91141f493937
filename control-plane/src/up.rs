//! `sidemesh up`: the whole demo on one machine, no Kubernetes, no containers.
//!
//! Today it runs user-service and order-service with a light load in one process, after
//! validating the routing config (the embedded `demo.yaml` unless `--config` names another).
//! The control plane and the proxies join as they are built; the command stays the same.

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

/// The demo mesh config, embedded so `sidemesh up` works from any folder.
pub const DEMO_YAML: &str = include_str!("../../config/examples/demo.yaml");

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
    /// OTLP/gRPC collector for spans, e.g. Jaeger at `http://127.0.0.1:4317`.
    #[arg(long)]
    pub otlp: Option<String>,
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let mesh = match &args.config {
        Some(path) => sidemesh_config::load(path)?,
        None => sidemesh_config::parse_str("demo.yaml (embedded)", DEMO_YAML)?,
    };
    let telemetry = Telemetry::init("sidemesh-up", args.otlp.as_deref(), LogFormat::Text, "warn")?;

    let users_listener = server::bind(args.users_addr).await?;
    let orders_listener = server::bind(args.orders_addr).await?;
    let users_addr = users_listener.local_addr()?;
    let orders_addr = orders_listener.local_addr()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let user_app = users::app(
        users::Directory::with_demo_users(),
        Arc::new(Faults::new(args.fail_rate, None, None)),
    );
    let users_task = tokio::spawn(server::serve(
        users_listener,
        user_app,
        stopped(stop_rx.clone()),
    ));
    let channel = orders::user_service_channel(&format!("http://{users_addr}"))?;
    let order_app = orders::app(channel, Arc::new(Faults::none()));
    let orders_task = tokio::spawn(server::serve(orders_listener, order_app, stopped(stop_rx)));

    let config_name = args.config.as_ref().map_or_else(
        || "demo.yaml (embedded)".to_string(),
        |p| p.display().to_string(),
    );
    println!(
        "Sidemesh up: demo services with a light load (the mesh's control plane and proxies are not in this build yet)"
    );
    println!(
        "  config         {config_name}: {}",
        summary::one_line(&mesh)
    );
    println!(
        "  user-service   http://{users_addr}   (HTTP /users and gRPC demo.users.v1.UserService)"
    );
    println!("  order-service  http://{orders_addr}   (HTTP /orders)");
    match &args.otlp {
        Some(endpoint) => println!("  traces         exported to {endpoint}"),
        None => println!(
            "  traces         not exported; pass --otlp http://127.0.0.1:4317 to send them to Jaeger"
        ),
    }
    println!(
        "  load           {} req/s to order-service; Ctrl-C stops everything",
        args.rate
    );
    println!();

    let load = loadgen::run(
        LoadgenArgs {
            target: format!("http://{orders_addr}"),
            rate: args.rate,
            duration: args.duration,
            max_in_flight: 256,
            unknown_user_share: 0.05,
            client_id: "sidemesh-up".into(),
        },
        |second| println!("{second}"),
    );
    let outcome = tokio::select! {
        total = load => total.map(|t| println!("total: {t}")),
        () = server::shutdown_signal() => Ok(()),
    };
    let _ = stop_tx.send(true);
    for task in [users_task, orders_task] {
        task.await??;
    }
    telemetry.shutdown();
    println!("stopped");
    outcome
}
