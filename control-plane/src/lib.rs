//! `sidemesh-control-plane`: the control plane and the `sidemesh` operator CLI.
//!
//! - `cli`: the `sidemesh` subcommands (`validate`, `schema`, `up`).
//! - `up`: `sidemesh up`, the demo on one machine.
//! - `summary`: one-line descriptions of a validated mesh for operators.

#![forbid(unsafe_code)]

pub mod cli;
pub mod summary;
pub mod up;
