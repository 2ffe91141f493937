//! order-service: see `order-service --help`.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use sidemesh_demo::orders::{app, user_service_channel};
use sidemesh_demo::server::{CommonArgs, bind, serve, shutdown_signal};
use sidemesh_demo::telemetry::Telemetry;

/// The demo order service: /orders, with each order's user looked up in user-service over gRPC.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the log line `listening` names it).
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8082")]
    listen: SocketAddr,
    /// Where user-service is reached: directly, or through the local Sidemesh proxy when meshed.
    #[arg(
        long,
        env = "USER_SERVICE_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    user_service: String,
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = Telemetry::init(
        "order-service",
        args.common.otlp_endpoint.as_deref(),
        args.common.log_format,
        "info",
    )?;
    let users = user_service_channel(&args.user_service)?;
    let listener = bind(args.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, user_service = %args.user_service, "listening");
    let faults = Arc::new(args.common.faults());
    serve(listener, app(users, faults), shutdown_signal()).await?;
    telemetry.shutdown();
    Ok(())
}
