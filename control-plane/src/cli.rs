//! The `sidemesh` operator CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sidemesh_config::{LoadError, schema};

use crate::summary;

#[derive(Debug, Parser)]
#[command(name = "sidemesh", version, about = "Operate a Sidemesh service mesh")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check routing YAML (a file or a folder) and print `ok` with a summary, or every error.
    Validate {
        /// A YAML file, or a folder whose *.yaml / *.yml files form one mesh.
        path: PathBuf,
    },
    /// Show every proxy, the config in force, refused changes and push convergence.
    Status {
        /// The control plane's admin address.
        #[arg(
            long,
            env = "SIDEMESH_CONTROL_PLANE_ADMIN",
            default_value = "http://127.0.0.1:15014"
        )]
        control_plane: String,
        /// Print the raw JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Run the whole demo mesh on this machine (no Kubernetes, no containers).
    Up(crate::up::UpArgs),
    /// Print the JSON Schema of the routing language (or its field reference as Markdown).
    Schema {
        /// Print the Markdown field reference used in the README instead.
        #[arg(long)]
        markdown: bool,
    },
}

/// Runs a parsed command; the exit code is 1 for an invalid config, 2 for an unreadable one.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Validate { path } => validate(&path),
        Command::Status {
            control_plane,
            json,
        } => {
            let fetched = tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(crate::status::fetch(&control_plane)));
            match fetched {
                Ok(status) if json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&status).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Ok(status) => {
                    print!("{}", crate::status::render(&status));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Up(args) => match tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(crate::up::run(args)))
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::Schema { markdown } => {
            if markdown {
                print!("{}", schema::field_reference());
            } else {
                print!("{}", schema::json_schema());
            }
            ExitCode::SUCCESS
        }
    }
}

fn validate(path: &std::path::Path) -> ExitCode {
    match sidemesh_config::load(path) {
        Ok(mesh) => {
            println!("ok: {}", summary::one_line(&mesh));
            ExitCode::SUCCESS
        }
        Err(LoadError::Invalid(diagnostics)) => {
            for d in &diagnostics.0 {
                eprintln!("{d}");
            }
            let n = diagnostics.0.len();
            eprintln!(
                "{n} error{} in {}",
                if n == 1 { "" } else { "s" },
                path.display()
            );
            ExitCode::from(1)
        }
        Err(other) => {
            eprintln!("error: {other}");
            ExitCode::from(2)
        }
    }
}
