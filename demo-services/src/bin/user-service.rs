//! user-service: see `user-service --help`.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use sidemesh_demo::server::{CommonArgs, bind, serve, shutdown_signal};
use sidemesh_demo::telemetry::Telemetry;
use sidemesh_demo::users::{Directory, app};

/// The demo user directory: HTTP/JSON /users and gRPC demo.users.v1.UserService on one port.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the log line `listening` names it).
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = Telemetry::init(
        "user-service",
        args.common.otlp_endpoint.as_deref(),
        args.common.log_format,
        "info",
    )?;
    let listener = bind(args.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, fail_rate = args.common.fail_rate, "listening");
    let faults = Arc::new(args.common.faults());
    serve(
        listener,
        app(Directory::with_demo_users(), faults),
        shutdown_signal(),
    )
    .await?;
    telemetry.shutdown();
    Ok(())
}
