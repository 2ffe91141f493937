//! The compiled routing config (one immutable snapshot, swapped whole) and route matching.

pub mod snapshot;
