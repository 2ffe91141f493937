//! Where the routing config comes from: a file or folder (static mode) or the control plane.

pub mod control;
pub mod file;
