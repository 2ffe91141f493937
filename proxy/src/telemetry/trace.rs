//! OpenTelemetry spans for the requests a proxy carries.
//!
//! - A server span per inbound request and a client span per outbound request, named
//!   `METHOD route` with HTTP semantic-convention attributes and Sidemesh's own; a child span
//!   per attempt when a route retries; events for rate-limited and denied requests.
//! - Context comes from the caller's headers (`propagation`); without any a trace starts here.
//! - Sampling is parent-based; new traces are kept at the config's ratio, which a push changes.
//! - Export (`export`) never makes a request wait: a bounded queue, drained in batches.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderMap;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use sidemesh_config::OtlpProtocol;
use tokio::sync::mpsc;

use super::export;
pub use super::export::Counters;
pub use super::propagation::extract;
use super::propagation::inject;
use crate::telemetry::metrics::Direction;

/// Who this proxy is, for the spans' resource.
#[derive(Debug, Clone)]
pub struct Workload {
    pub service: String,
    pub namespace: String,
    pub pod: String,
}

/// The tracing state: a tracer while a collector is configured.
#[derive(Debug)]
pub struct Tracing {
    workload: Workload,
    /// `--otlp-endpoint`: wins over the config's endpoint.
    endpoint_override: Option<String>,
    ratio: Arc<AtomicU64>,
    active: ArcSwapOption<Active>,
    pub counters: Counters,
}

/// A tracer exporting to one collector.
#[derive(Debug)]
pub struct Active {
    endpoint: String,
    protocol: OtlpProtocol,
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// Asks the export task to send what is queued now; it answers when done.
    flush: mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Active {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

impl Tracing {
    pub fn new(workload: Workload, endpoint_override: Option<String>, counters: Counters) -> Self {
        Self {
            workload,
            endpoint_override,
            ratio: Arc::new(AtomicU64::new(1.0f64.to_bits())),
            active: ArcSwapOption::empty(),
            counters,
        }
    }

    /// Applies a config's tracing settings: the ratio at once; a new collector gets a new
    /// exporter (spans queued for the old one are sent by its task until it ends).
    pub fn configure(&self, settings: &sidemesh_config::Tracing) {
        self.ratio.store(
            settings.sampling.clamp(0.0, 1.0).to_bits(),
            Ordering::Relaxed,
        );
        let current = self.active.load();
        let wanted = self
            .endpoint_override
            .as_deref()
            .or(settings.otlp_endpoint.as_deref());
        let same = match (current.as_deref(), wanted) {
            (Some(a), Some(w)) => a.endpoint == w && a.protocol == settings.protocol,
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        let Some(endpoint) = wanted else {
            tracing::info!("tracing off: no OTLP endpoint in the config");
            self.active.store(None);
            return;
        };
        match self.start(endpoint, settings.protocol) {
            Ok(active) => {
                tracing::info!(endpoint, protocol = ?settings.protocol, sampling = settings.sampling, "exporting spans");
                self.active.store(Some(Arc::new(active)));
            }
            Err(e) => {
                tracing::warn!(endpoint, error = %e, "cannot export spans to this endpoint; tracing off");
                self.active.store(None);
            }
        }
    }

    fn start(&self, endpoint: &str, protocol: OtlpProtocol) -> Result<Active, String> {
        let mut exporter = export::exporter(endpoint, protocol)?;
        let resource = Resource::builder()
            .with_service_name(self.workload.service.clone())
            .with_attributes([
                KeyValue::new("service.namespace", self.workload.namespace.clone()),
                KeyValue::new("k8s.pod.name", self.workload.pod.clone()),
                KeyValue::new("host.name", hostname()),
                KeyValue::new("sidemesh.component", "proxy"),
            ])
            .build();
        opentelemetry_sdk::trace::SpanExporter::set_resource(&mut exporter, &resource);
        let (queue, flush) = export::spawn(exporter, self.counters.clone());
        let provider = SdkTracerProvider::builder()
            // The ratio is applied before spans are built (`start_request`); what reaches the
            // SDK is kept unless its parent was not.
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
            .with_span_processor(queue)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("sidemesh-proxy");
        Ok(Active {
            endpoint: endpoint.to_string(),
            protocol,
            provider,
            tracer,
            flush,
        })
    }

    /// Sends every span still queued (at shutdown: the last requests' spans must not be lost),
    /// waiting `timeout` at most.
    pub async fn flush(&self, timeout: Duration) {
        let Some(active) = self.active.load_full() else {
            return;
        };
        let (done, wait) = tokio::sync::oneshot::channel();
        let asked = async {
            if active.flush.send(done).await.is_ok() {
                let _ = wait.await;
            }
        };
        if tokio::time::timeout(timeout, asked).await.is_err() {
            tracing::warn!(?timeout, "spans still queued at exit were not all sent");
        }
    }

    pub fn is_on(&self) -> bool {
        self.active.load().is_some()
    }

    /// Starts the span of one request, continuing the caller's trace, or `None` when tracing
    /// is off.
    pub fn start_request(&self, start: RequestStart<'_>) -> Option<RequestSpan> {
        let active = self.active.load_full()?;
        let parent = extract(start.headers);
        let remote = parent.span().span_context().clone();
        // Decided here, before any span is built: most requests of a low ratio cost only a
        // context written upstream, so the rest of the trace knows the decision.
        let (sampled, trace_id) = if remote.is_valid() {
            (remote.is_sampled(), remote.trace_id())
        } else {
            let id = TraceId::from(fastrand::u128(1..));
            (keep_new_trace(self.ratio(), id), id)
        };
        if !sampled {
            let own = SpanContext::new(
                trace_id,
                SpanId::from(fastrand::u64(1..)),
                TraceFlags::default(),
                false,
                remote.trace_state().clone(),
            );
            return Some(RequestSpan {
                cx: Context::new().with_remote_span_context(own),
                active: None,
            });
        }
        let template = start.route_template;
        let name = match template {
            Some(t) => format!("{} {t}", start.method),
            None => start.method.to_string(),
        };
        let kind = match start.direction {
            Direction::Inbound => SpanKind::Server,
            Direction::Outbound => SpanKind::Client,
        };
        let mut attributes = vec![
            KeyValue::new("http.request.method", start.method.to_string()),
            KeyValue::new("url.path", start.path.to_string()),
            KeyValue::new("server.address", start.host.to_string()),
            KeyValue::new("network.peer.address", start.peer.to_string()),
            KeyValue::new("sidemesh.direction", start.direction.as_str()),
            KeyValue::new("sidemesh.route", start.route.to_string()),
        ];
        if let Some(t) = template {
            attributes.push(KeyValue::new("http.route", t.to_string()));
        }
        if let Some(identity) = start.peer_identity {
            attributes.push(KeyValue::new(
                "sidemesh.peer.identity",
                identity.to_string(),
            ));
        }
        let span = active
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&active.tracer, &parent);
        Some(RequestSpan {
            cx: parent.with_span(span),
            active: Some(active),
        })
    }

    fn ratio(&self) -> f64 {
        f64::from_bits(self.ratio.load(Ordering::Relaxed))
    }
}

/// Whether a trace starting here is kept at `ratio`: the low 63 bits of its (random) id
/// against the ratio, so every proxy decides the same for the same id.
fn keep_new_trace(ratio: f64, trace_id: TraceId) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let bytes = trace_id.to_bytes();
    let low = u64::from_be_bytes([
        bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14], bytes[15],
    ]) >> 1;
    (low as f64) < ratio * (1u64 << 63) as f64
}

/// What a request's span is made from.
#[derive(Debug)]
pub struct RequestStart<'a> {
    pub direction: Direction,
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub peer: std::net::IpAddr,
    pub route: &'a str,
    pub route_template: Option<&'a str>,
    pub peer_identity: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// The span of one request, in flight.
#[derive(Debug)]
pub struct RequestSpan {
    cx: Context,
    /// `None`: not sampled; only the context is passed on.
    active: Option<Arc<Active>>,
}

/// What the retry stage needs to make a span per attempt.
#[derive(Debug, Clone)]
pub struct AttemptParent {
    cx: Context,
    active: Arc<Active>,
}

impl RequestSpan {
    /// Writes this span's context into the headers that go upstream.
    pub fn inject(&self, headers: &mut HeaderMap) {
        inject(&self.cx, headers);
    }

    /// For a sampled request: what attempt spans hang from.
    pub fn attempt_parent(&self) -> Option<AttemptParent> {
        Some(AttemptParent {
            cx: self.cx.clone(),
            active: self.active.clone()?,
        })
    }

    pub fn event(&self, name: &'static str, attributes: Vec<KeyValue>) {
        self.cx.span().add_event(name, attributes);
    }

    /// Ends the span with the response's status (or the endpoint that answered).
    pub fn finish(self, status: http::StatusCode, endpoint: Option<std::net::SocketAddr>) {
        if self.active.is_none() {
            return;
        }
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        if let Some(endpoint) = endpoint {
            span.set_attribute(KeyValue::new(
                "sidemesh.upstream.endpoint",
                endpoint.to_string(),
            ));
        }
        if status.is_server_error() {
            span.set_status(Status::error(status.to_string()));
        }
        span.end();
    }
}

impl AttemptParent {
    /// A child span for attempt `n`, its context written into `headers`.
    pub fn start(&self, n: u32, headers: &mut HeaderMap) -> AttemptSpan {
        let span = self
            .active
            .tracer
            .span_builder(format!("attempt {n}"))
            .with_kind(SpanKind::Client)
            .with_attributes(vec![KeyValue::new("sidemesh.attempt", i64::from(n))])
            .start_with_context(&self.active.tracer, &self.cx);
        let cx = self.cx.with_span(span);
        inject(&cx, headers);
        AttemptSpan { cx }
    }
}

/// One attempt of a retried request.
#[derive(Debug)]
pub struct AttemptSpan {
    cx: Context,
}

impl AttemptSpan {
    pub fn finish(self, outcome: Result<http::StatusCode, &str>) {
        let span = self.cx.span();
        match outcome {
            Ok(status) => {
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status.as_u16()),
                ));
                if status.is_server_error() {
                    span.set_status(Status::error(status.to_string()));
                }
            }
            Err(error) => span.set_status(Status::error(error.to_string())),
        }
        span.end();
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_keeps_a_share_of_new_traces() {
        let id = |i: u128| TraceId::from(i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835));
        assert!((0..100).all(|i| keep_new_trace(1.0, id(i))));
        assert!((0..100).all(|i| !keep_new_trace(0.0, id(i))));
        let kept = (0..1000).filter(|&i| keep_new_trace(0.5, id(i))).count();
        assert!((400..600).contains(&kept), "about half kept: {kept}");
        let kept = (0..10_000).filter(|&i| keep_new_trace(0.01, id(i))).count();
        assert!((50..150).contains(&kept), "about 1 % kept: {kept}");
    }
}
