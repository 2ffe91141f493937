//! Connections: listeners and original destinations, TLS termination of
//! meshed callers, and opaque byte forwarding.

pub mod accept;
pub mod tcp;
