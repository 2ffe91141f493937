//! Telemetry: Prometheus metrics and OpenTelemetry spans.
//!
//! - `metrics`: the counters and histograms `/metrics` serves.
//! - `trace`: a span per request and per attempt.
//! - `propagation`: trace context read from and written to headers (W3C, B3).
//! - `export`: the bounded span queue and its OTLP export task.

mod export;
pub mod metrics;
pub mod propagation;
pub mod trace;
