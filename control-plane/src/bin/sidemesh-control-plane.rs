//! `sidemesh-control-plane`: see `sidemesh-control-plane --help`.

use std::process::ExitCode;

use clap::Parser;
use sidemesh_control_plane::server::{Args, build};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_format == "text" {
        logs.init();
    } else {
        logs.json().init();
    }
    let cp = match build(args).await {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("sidemesh-control-plane: {e}");
            return ExitCode::from(1);
        }
    };
    match cp.run(shutdown()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sidemesh-control-plane: {e}");
            ExitCode::from(1)
        }
    }
}

async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
