//! Connections: listeners and original destinations, protocol detection, TLS termination of
//! meshed callers, and opaque byte forwarding.

pub mod accept;
pub mod detect;
pub mod tcp;
