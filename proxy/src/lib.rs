//! `sidemesh-proxy`: the per-pod data plane. `pipeline.rs` lists the data path in order.
//!
//! - `app`: build (load config, bind listeners) and run (serve, reload, drain).
//! - `init`: `sidemesh-proxy init`, the iptables rules of a pod.
//! - `config`: the proxy's flags and environment variables.
//! - `accept`: listeners, connection limits, original destination.
//! - `detect`: protocol detection (HTTP/1, HTTP/2, TLS, opaque).
//! - `http`: serving HTTP connections; the per-request handler and routing.
//! - `h1`: HTTP/1.x server and client, transparent to what clients send.
//! - `tcp`: opaque byte forwarding.
//! - `tls`: mutual TLS between proxies: handshakes, SPIFFE ID checks, ALPN.
//! - `identity`: the workload certificate: CSR to the control plane's CA, renewal.
//! - `pipeline`: the request stages, in order.
//! - `ratelimit`, `timeout`, `retry`, `forward`: request stages.
//! - `snapshot`: compiled routing config; route matching.
//! - `balance`, `endpoint`: load balancing, pooled connections, outlier detection.
//! - `headers`, `body`, `rewind`: HTTP hygiene and IO helpers.
//! - `respond`: errors to synthetic responses, in one place.
//! - `trace`: OpenTelemetry spans per request and attempt, propagation, OTLP export.
//! - `metrics`, `admin`: Prometheus metrics and the admin server.
//! - `reload`, `control`: config from a file (static mode) or pushed by the control plane.
//! - `cp_channel`: the TLS connection to the control plane, pinned to the trust bundle.
//! - `drain`: graceful shutdown.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod conn;
pub mod drain;
pub mod http;
pub mod identity;
pub mod init;
pub mod pipeline;
pub mod proto;
pub mod respond;
pub mod routing;
pub mod source;
pub mod stages;
pub mod state;
pub mod telemetry;
pub mod upstream;
