//! Identity: the workload certificate (CSR to the control plane's CA, renewal), mutual TLS
//! between proxies, and the TLS channel to the control plane.

pub mod channel;
pub mod tls;
pub mod workload;
