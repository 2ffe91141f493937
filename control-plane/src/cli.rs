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
    /// Live traffic per service (requests per second, success rate, latency, retries, rate
    /// limits, denials, mTLS), read from every proxy's metrics through the control plane.
    Stat {
        /// The control plane's admin address.
        #[arg(
            long,
            env = "SIDEMESH_CONTROL_PLANE_ADMIN",
            default_value = "http://127.0.0.1:15014"
        )]
        control_plane: String,
        /// How long to measure (and, with --watch, how often to redraw).
        #[arg(long, default_value = "2s", value_parser = sidemesh_demo::server::parse_duration)]
        window: std::time::Duration,
        /// Keep redrawing the table until Ctrl-C.
        #[arg(long, short)]
        watch: bool,
    },
    /// Print the spans `sidemesh up` kept (when it runs without --otlp) as trace trees.
    Traces(crate::traces::TracesArgs),
    /// Run the whole demo mesh on this machine (no Kubernetes, no containers).
    Up(crate::up::UpArgs),
    /// Add the Sidemesh proxy to every pod template of Kubernetes manifests, printed to stdout:
    /// `sidemesh inject -f app.yaml | kubectl apply -f -`.
    Inject {
        /// A YAML file (one or more documents), a folder of them, or `-` for stdin.
        #[arg(short = 'f', long = "filename")]
        path: PathBuf,
        /// The proxy image (it also runs the init step).
        #[arg(long, env = "SIDEMESH_PROXY_IMAGE")]
        image: Option<String>,
        /// The control plane's gRPC address, as pods reach it.
        #[arg(long, env = "SIDEMESH_CONTROL_PLANE_URL")]
        control_plane: Option<String>,
        /// Clusters older than Kubernetes 1.29: the proxy goes among the containers instead
        /// of being a native sidecar.
        #[arg(long)]
        legacy_sidecar: bool,
        /// The mesh's trust bundle (PEM), which injected proxies pin for the control plane:
        /// `kubectl -n sidemesh-system get configmap sidemesh-trust-bundle -o jsonpath='{.data.ca\.crt}'`.
        #[arg(long, env = "SIDEMESH_TRUST_BUNDLE_FILE")]
        trust_bundle: Option<PathBuf>,
        /// Inject even pods that already carry another mesh's proxy.
        #[arg(long)]
        force: bool,
    },
    /// Print the whole control-plane installation for Kubernetes (namespace, RBAC, CA Secret,
    /// trust bundle, routing config, Deployment, Service, webhook):
    /// `sidemesh install | kubectl apply -f -`.
    Install(crate::install::InstallArgs),
    /// Print what `sidemesh install` created, for `sidemesh uninstall | kubectl delete -f -`
    /// (the webhook first; the namespace takes the rest with it).
    Uninstall {
        #[arg(long, default_value = "sidemesh-system")]
        namespace: String,
    },
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
        Command::Stat {
            control_plane,
            window,
            watch,
        } => match tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(crate::stat::run(&control_plane, window, watch)))
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
        Command::Traces(args) => match crate::traces::print(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
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
        Command::Inject {
            path,
            image,
            control_plane,
            legacy_sidecar,
            trust_bundle,
            force,
        } => inject(
            &path,
            image,
            control_plane,
            legacy_sidecar,
            trust_bundle,
            force,
        ),
        Command::Install(args) => match crate::install::render(&args) {
            Ok(rendered) => {
                for note in &rendered.notes {
                    eprintln!("sidemesh install: {note}");
                }
                print!("{}", rendered.text);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
        Command::Uninstall { namespace } => match crate::install::uninstall(&namespace) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
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

/// `sidemesh inject`: the injected manifests on stdout, notes and refusals on stderr. Exit
/// code 1 for a refusal (nothing is printed then), 2 for unreadable input.
fn inject(
    path: &std::path::Path,
    image: Option<String>,
    control_plane: Option<String>,
    legacy_sidecar: bool,
    trust_bundle: Option<PathBuf>,
    force: bool,
) -> ExitCode {
    let mut config = crate::inject::InjectConfig {
        legacy_sidecar,
        force,
        ..crate::inject::InjectConfig::default()
    };
    if let Some(image) = image {
        config.image = image;
    }
    if let Some(url) = control_plane {
        config.control_plane = url;
    }
    match trust_bundle.map(|p| (std::fs::read_to_string(&p), p)) {
        Some((Ok(pem), _)) => config.trust_bundle = pem,
        Some((Err(e), p)) => {
            eprintln!("error: --trust-bundle {}: {e}", p.display());
            return ExitCode::from(2);
        }
        None => {}
    }
    let text = match read_manifests(path) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    match crate::inject::inject_documents(&text, &config) {
        Ok(out) => {
            for note in &out.notes {
                eprintln!("sidemesh inject: {note}");
            }
            print!("{}", out.text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            ExitCode::from(1)
        }
    }
}

/// A file, every `*.yaml`/`*.yml` of a folder (in name order), or stdin (`-`), as one
/// multi-document text.
fn read_manifests(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    if path == std::path::Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        return Ok(text);
    }
    if !path.is_dir() {
        return std::fs::read_to_string(path);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut text = String::new();
    for file in files {
        text.push_str(&std::fs::read_to_string(&file)?);
        text.push_str("\n---\n");
    }
    Ok(text)
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
