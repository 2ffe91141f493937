//! OpenTelemetry spans for the requests a proxy carries.
//!
//! - A server span per inbound request and a client span per outbound request, named
//!   `METHOD route` with HTTP semantic-convention attributes and Sidemesh's own; a child span
//!   per attempt when a route retries; events for rate-limited and denied requests.
//! - Context comes from W3C `traceparent`/`tracestate`, else from B3 (single or multi header);
//!   without either a trace starts here. What goes upstream carries this proxy's span.
//! - Sampling is parent-based; new traces are kept at the config's ratio, which a push changes.
//! - Export is OTLP (gRPC or HTTP/protobuf) from a bounded queue drained in batches by one
//!   task: when the collector is slow or down, spans are dropped and counted; a request never
//!   waits for telemetry.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use prometheus_client::metrics::counter::Counter;
use sidemesh_config::OtlpProtocol;
use tokio::sync::mpsc;

use crate::telemetry::metrics::Direction;

/// Spans waiting for export; beyond this they are dropped (and counted).
const QUEUE: usize = 4096;
/// Spans per export call.
const BATCH: usize = 512;
/// A batch waits at most this long to fill.
const BATCH_DELAY: Duration = Duration::from_millis(500);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Who this proxy is, for the spans' resource.
#[derive(Debug, Clone)]
pub struct Workload {
    pub service: String,
    pub namespace: String,
    pub pod: String,
}

/// Export counters, shared with `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub exported: Counter,
    pub dropped_queue_full: Counter,
    pub dropped_export_failed: Counter,
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
        let mut exporter = match protocol {
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(EXPORT_TIMEOUT)
                .build(),
            OtlpProtocol::HttpProtobuf => {
                let url = if endpoint.trim_end_matches('/').matches('/').count() <= 2 {
                    format!("{}/v1/traces", endpoint.trim_end_matches('/'))
                } else {
                    endpoint.to_string()
                };
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(url)
                    .with_timeout(EXPORT_TIMEOUT)
                    .with_headers(Default::default())
                    .build()
            }
        }
        .map_err(|e| e.to_string())?;
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
        let (tx, rx) = mpsc::channel(QUEUE);
        let (flush, flushes) = mpsc::channel(1);
        tokio::spawn(export_loop(exporter, rx, flushes, self.counters.clone()));
        let provider = SdkTracerProvider::builder()
            // The ratio is applied before spans are built (`start_request`); what reaches the
            // SDK is kept unless its parent was not.
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
            .with_span_processor(Queue {
                tx,
                dropped: self.counters.dropped_queue_full.clone(),
            })
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

/// Writes `cx` as `traceparent` (and `tracestate` only when it has entries). A caller's B3
/// headers are rewritten to the same span, so an application that reads either format sees
/// one parent, not two that disagree.
fn inject(cx: &Context, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
    if headers.get("tracestate").is_some_and(|v| v.is_empty()) {
        headers.remove("tracestate");
    }
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return;
    }
    let (trace, span) = (sc.trace_id().to_string(), sc.span_id().to_string());
    let sampled = if sc.is_sampled() { "1" } else { "0" };
    let set = |headers: &mut HeaderMap, name: &'static str, value: String| {
        if let Ok(v) = http::HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    if headers.contains_key("b3") {
        set(headers, "b3", format!("{trace}-{span}-{sampled}"));
    }
    if headers.contains_key("x-b3-traceid") || headers.contains_key("x-b3-spanid") {
        set(headers, "x-b3-traceid", trace);
        set(headers, "x-b3-spanid", span);
        set(headers, "x-b3-sampled", sampled.to_string());
        headers.remove("x-b3-parentspanid");
        headers.remove("x-b3-flags");
    }
}

/// The caller's trace: W3C first, then B3 (single header, then multi header).
pub fn extract(headers: &HeaderMap) -> Context {
    if headers.contains_key("traceparent") {
        return TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    }
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let b3 = match text("b3") {
        Some(single) => parse_b3_single(single),
        None => parse_b3_multi(
            text("x-b3-traceid"),
            text("x-b3-spanid"),
            text("x-b3-sampled"),
            text("x-b3-flags"),
        ),
    };
    match b3 {
        Some(sc) => Context::new().with_remote_span_context(sc),
        None => Context::new(),
    }
}

/// `{trace}-{span}[-{sampled}[-{parent}]]`; a 64-bit trace id is left-padded.
fn parse_b3_single(value: &str) -> Option<SpanContext> {
    let mut parts = value.split('-');
    let trace = parts.next()?;
    let span = parts.next()?;
    let sampled = parts.next();
    b3_context(trace, span, sampled, None)
}

fn parse_b3_multi(
    trace: Option<&str>,
    span: Option<&str>,
    sampled: Option<&str>,
    flags: Option<&str>,
) -> Option<SpanContext> {
    b3_context(trace?, span?, sampled, flags)
}

fn b3_context(
    trace: &str,
    span: &str,
    sampled: Option<&str>,
    flags: Option<&str>,
) -> Option<SpanContext> {
    if !(trace.len() == 16 || trace.len() == 32) || span.len() != 16 {
        return None;
    }
    let trace_id = TraceId::from_hex(&format!("{trace:0>32}")).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    // `d` (debug) and `1` sample; `0` does not; absent defers (we sample: the ratio applies
    // only to traces that start here).
    let sampled = flags == Some("1") || !matches!(sampled, Some("0") | Some("false"));
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    Some(SpanContext::new(
        trace_id,
        span_id,
        flags,
        true,
        TraceState::default(),
    ))
}

/// Hands finished spans to the export task without ever waiting.
#[derive(Debug)]
struct Queue {
    tx: mpsc::Sender<SpanData>,
    dropped: Counter,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Batches spans from the queue and exports them; a failed export drops its batch. A flush
/// request sends what is queued at once.
async fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    mut flushes: mpsc::Receiver<tokio::sync::oneshot::Sender<()>>,
    counters: Counters,
) {
    let mut last_warning: Option<tokio::time::Instant> = None;
    let mut flushes_open = true;
    loop {
        let (first, flush) = tokio::select! {
            span = rx.recv() => match span {
                Some(span) => (Some(span), None),
                None => return,
            },
            asked = flushes.recv(), if flushes_open => match asked {
                Some(done) => (None, Some(done)),
                None => {
                    flushes_open = false;
                    continue;
                }
            },
        };
        let mut batch = Vec::with_capacity(BATCH);
        batch.extend(first);
        if flush.is_some() {
            while let Ok(span) = rx.try_recv() {
                batch.push(span);
            }
        } else {
            let deadline = tokio::time::Instant::now() + BATCH_DELAY;
            while batch.len() < BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(span)) => batch.push(span),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        // Exported in batches of at most BATCH, a flush's too.
        while !batch.is_empty() {
            let rest = batch.split_off(batch.len().min(BATCH));
            export(
                &exporter,
                std::mem::replace(&mut batch, rest),
                &counters,
                &mut last_warning,
            )
            .await;
        }
        if let Some(done) = flush {
            let _ = done.send(());
        }
    }
}

async fn export(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: Vec<SpanData>,
    counters: &Counters,
    last_warning: &mut Option<tokio::time::Instant>,
) {
    let n = batch.len() as u64;
    let result = tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(batch)).await;
    match result {
        Ok(Ok(())) => {
            counters.exported.inc_by(n);
        }
        failed => {
            counters.dropped_export_failed.inc_by(n);
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {EXPORT_TIMEOUT:?}"),
            };
            // One warning per minute at most: a collector that is down must not flood logs.
            if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                tracing::warn!(spans = n, error = %why, "span export failed; dropping the batch");
                *last_warning = Some(tokio::time::Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_context_rewrites_b3_to_the_same_span_and_adds_no_empty_tracestate() {
        let mut incoming = HeaderMap::new();
        incoming.insert(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"
                .parse()
                .expect("value"),
        );
        incoming.insert(
            "x-b3-traceid",
            "80f198ee56343ba864fe8b2a57d3eff7".parse().expect("value"),
        );
        incoming.insert("x-b3-spanid", "e457b5a2e4d86bd1".parse().expect("value"));
        incoming.insert(
            "x-b3-parentspanid",
            "05e3ac9a4f6e3b90".parse().expect("value"),
        );
        // The proxy's own span: same trace, a new span id.
        let ours = SpanContext::new(
            TraceId::from_hex("80f198ee56343ba864fe8b2a57d3eff7").expect("hex"),
            SpanId::from_hex("1111111111111111").expect("hex"),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let cx = Context::new().with_remote_span_context(ours);
        let mut h = incoming.clone();
        inject(&cx, &mut h);
        assert_eq!(
            h["traceparent"],
            "00-80f198ee56343ba864fe8b2a57d3eff7-1111111111111111-01"
        );
        assert!(!h.contains_key("tracestate"), "{h:?}");
        assert_eq!(
            h["b3"],
            "80f198ee56343ba864fe8b2a57d3eff7-1111111111111111-1"
        );
        assert_eq!(h["x-b3-spanid"], "1111111111111111");
        assert_eq!(h["x-b3-sampled"], "1");
        assert!(!h.contains_key("x-b3-parentspanid"));
    }

    #[test]
    fn b3_single_and_multi_headers_continue_the_trace() {
        let mut h = HeaderMap::new();
        h.insert(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90"
                .parse()
                .expect("value"),
        );
        let cx = extract(&h);
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        assert_eq!(sc.span_id().to_string(), "e457b5a2e4d86bd1");
        assert!(sc.is_sampled() && sc.is_remote());

        let mut h = HeaderMap::new();
        h.insert("x-b3-traceid", "64fe8b2a57d3eff7".parse().expect("value"));
        h.insert("x-b3-spanid", "05e3ac9a4f6e3b90".parse().expect("value"));
        h.insert("x-b3-sampled", "0".parse().expect("value"));
        let sc = extract(&h).span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "000000000000000064fe8b2a57d3eff7"
        );
        assert!(!sc.is_sampled());

        // W3C wins when both are present.
        h.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .expect("value"),
        );
        let sc = extract(&h).span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );

        let mut h = HeaderMap::new();
        h.insert("b3", "not-a-trace".parse().expect("value"));
        assert!(!extract(&h).span().span_context().is_valid());
    }

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
