//! Logs and traces for the demo services.
//!
//! Logs are structured (JSON lines on stderr by default). Traces: a tracer provider is always
//! installed so that incoming W3C `traceparent` headers are continued and passed on to
//! outgoing calls even when nothing is exported; spans are exported over OTLP/gRPC only when
//! an endpoint is given.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use http::HeaderMap;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, global};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::{Instrument, Span, field};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (the default: what log pipelines ingest).
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

/// Keeps the tracer provider alive; `shutdown` flushes spans still queued.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Installs logging and tracing for `service`, logging at `default_level` unless `RUST_LOG`
    /// says otherwise. Safe to call more than once per process (later calls keep the first
    /// subscriber).
    pub fn init(
        service: &str,
        otlp_endpoint: Option<&str>,
        format: LogFormat,
        default_level: &str,
    ) -> anyhow::Result<Self> {
        let mut builder = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
            .with_resource(
                Resource::builder()
                    .with_service_name(service.to_string())
                    .build(),
            );
        if let Some(endpoint) = otlp_endpoint {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| anyhow::anyhow!("invalid OTLP endpoint {endpoint}: {e}"))?;
            builder = builder.with_batch_exporter(exporter);
        }
        let provider = builder.build();
        global::set_text_map_propagator(TraceContextPropagator::new());
        global::set_tracer_provider(provider.clone());

        let filter =
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
        let fmt = match format {
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .boxed(),
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .boxed(),
        };
        // The log level filters logs only: spans are kept whatever it is (sampling decides).
        let otel = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service.to_string()))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
        let _already_set = tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .with(otel)
            .try_init();
        Ok(Self { provider })
    }

    /// Flushes queued spans; called on shutdown.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "could not flush spans");
        }
    }
}

/// The trace context carried by incoming headers (empty when there is none).
pub fn extract(headers: &HeaderMap) -> Context {
    global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// Writes the current span's context into outgoing headers (`traceparent`, `tracestate`).
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    let cx = span.context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeaderInjector(headers)));
}

/// Middleware: one server span per request, continuing the caller's trace, with HTTP
/// semantic-convention attributes. HTTP spans are named `METHOD /route/{template}`; gRPC spans
/// `package.Service/Method`, as the RPC conventions name them.
pub async fn server_span(req: Request, next: Next) -> Response {
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"));
    let (name, route) = if grpc {
        let path = req.uri().path();
        (path.trim_start_matches('/').to_string(), path.to_string())
    } else {
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map_or_else(|| req.uri().path().to_string(), |m| m.as_str().to_string());
        (format!("{} {}", req.method(), route), route)
    };
    let span = tracing::info_span!(
        "request",
        otel.name = %name,
        otel.kind = "server",
        otel.status_code = field::Empty,
        http.request.method = %req.method(),
        http.route = %route,
        url.path = %req.uri().path(),
        http.response.status_code = field::Empty,
    );
    if let Err(e) = span.set_parent(extract(req.headers())) {
        tracing::debug!(error = %e, "could not continue the caller's trace");
    }
    let resp = next.run(req).instrument(span.clone()).await;
    span.record(
        "http.response.status_code",
        i64::from(resp.status().as_u16()),
    );
    if resp.status().is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    resp
}
