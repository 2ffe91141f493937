//! `sidemesh-control-plane`: serves routing config to the proxies.
//!
//! Today it checks the config folder it would serve and says so; the push API (watch,
//! versioned snapshots, ACK/NACK) is the control-plane issue's work.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(version, about = "The Sidemesh control plane")]
struct Args {
    /// Folder (or file) of routing YAML to serve.
    #[arg(long, env = "SIDEMESH_CONFIG", default_value = "config/examples")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match sidemesh_config::load(&args.config) {
        Ok(mesh) => {
            println!(
                "config {}: ok: {}",
                args.config.display(),
                sidemesh_control_plane::summary::one_line(&mesh)
            );
            eprintln!("the config push API is not available in this build yet; nothing to serve");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}
