//! `sidemesh-proxy`: see `sidemesh-proxy --help` (and `sidemesh-proxy init --help` for the
//! iptables rules of a pod).

use std::process::ExitCode;

use clap::Parser;
use sidemesh_proxy::app;
use sidemesh_proxy::config::Args;
use tracing_subscriber::EnvFilter;

fn init_logs(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "text" {
        builder.init();
    } else {
        builder.json().init();
    }
}

fn main() -> ExitCode {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "init") {
        argv.remove(1);
        let args = sidemesh_proxy::init::InitArgs::parse_from(argv);
        return match sidemesh_proxy::init::run(&args) {
            Ok(()) if args.dry_run => ExitCode::SUCCESS,
            Ok(()) if args.cleanup => {
                eprintln!("sidemesh-proxy init: rules removed");
                ExitCode::SUCCESS
            }
            Ok(()) => {
                eprintln!(
                    "sidemesh-proxy init: outbound TCP -> :{} (except uid {} and loopback), inbound TCP -> :{}",
                    args.outbound_port, args.proxy_uid, args.inbound_port
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sidemesh-proxy init: {e}");
                ExitCode::from(1)
            }
        };
    }
    let args = Args::parse();
    init_logs(&args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sidemesh-proxy: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> ExitCode {
    let app = match app::build(args).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("sidemesh-proxy: {e}");
            return ExitCode::from(1);
        }
    };
    app.run(shutdown_signal()).await;
    ExitCode::SUCCESS
}

/// SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
