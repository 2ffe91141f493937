//! loadgen: see `loadgen --help`.

use clap::Parser;
use sidemesh_demo::loadgen::{LoadgenArgs, run};
use sidemesh_demo::telemetry::{LogFormat, Telemetry};

/// Steady mixed traffic against order-service, with a one-line summary per second.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    load: LoadgenArgs,
    /// OTLP/gRPC collector for the client spans that start each trace.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = Telemetry::init(
        "loadgen",
        args.otlp_endpoint.as_deref(),
        LogFormat::Text,
        "warn",
    )?;
    let load = run(args.load, |second| println!("{second}"));
    let total = tokio::select! {
        total = load => total?,
        () = sidemesh_demo::server::shutdown_signal() => {
            telemetry.shutdown();
            return Ok(());
        }
    };
    println!("total: {total}");
    telemetry.shutdown();
    Ok(())
}
