//! Upstream: balancing, endpoints with their outlier state, circuit breakers, pooled
//! connections, connecting with mutual TLS, and sending a request.

pub mod balance;
pub mod breaker;
pub mod endpoint;
pub mod forward;
pub mod mux;
pub mod outlier;
