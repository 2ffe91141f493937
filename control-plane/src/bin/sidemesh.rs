//! `sidemesh`: the operator CLI. See `sidemesh --help`.

use std::process::ExitCode;

use clap::Parser;
use sidemesh_control_plane::cli::{Cli, run};

fn main() -> ExitCode {
    run(Cli::parse())
}
