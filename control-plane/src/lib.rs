//! `sidemesh-control-plane`: the control plane and the `sidemesh` operator CLI.
//!
//! - `cli`: the `sidemesh` subcommands (`validate`, `schema`, `up`).
//! - `summary`: one-line descriptions of a validated mesh for operators.

#![forbid(unsafe_code)]

pub mod cli;
pub mod summary;
