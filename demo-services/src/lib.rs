//! `sidemesh-demo`: the workloads that show Sidemesh at work.
//!
//! - `users`: user-service, HTTP/JSON `/users` and gRPC `demo.users.v1.UserService`.
//! - `orders`: order-service, `/orders`, looks users up in user-service over gRPC.
//! - `loadgen`: steady mixed traffic against order-service with a one-line summary per second.
//! - `faults`: `--fail-rate` and `--latency` injection, so retries, timeouts and limits show.
//! - `telemetry`: structured logs, W3C trace context in and out, OTLP spans when configured.
//! - `server`: the flags every service shares, binding, serving HTTP/1.1 + h2c, graceful shutdown.

#![forbid(unsafe_code)]

pub mod faults;
pub mod loadgen;
pub mod orders;
pub mod server;
pub mod telemetry;
pub mod users;

/// Generated gRPC types of `proto/users.proto`.
pub mod proto {
    #![allow(clippy::all, missing_debug_implementations)]
    tonic::include_proto!("demo.users.v1");
}
