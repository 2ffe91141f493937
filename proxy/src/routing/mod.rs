//! Routing: the compiled config (one immutable snapshot, swapped whole), route matching, and
//! the destination a request is sent to.

pub mod destination;
pub mod snapshot;
