//! Telemetry: Prometheus metrics and OpenTelemetry spans.

pub mod metrics;
pub mod trace;
