//! Span export: finished spans go into a bounded queue without waiting; one task drains it
//! in batches to the OTLP collector (gRPC or HTTP/protobuf). A slow or absent collector costs
//! dropped, counted spans, never a waiting request.

use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _, SpanProcessor};
use prometheus_client::metrics::counter::Counter;
use sidemesh_config::OtlpProtocol;
use tokio::sync::{mpsc, oneshot};

/// Export counters, shared with `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub exported: Counter,
    pub dropped_queue_full: Counter,
    pub dropped_export_failed: Counter,
}

/// Spans waiting for export; beyond this they are dropped (and counted).
const QUEUE: usize = 4096;
/// Spans per export call.
const BATCH: usize = 512;
/// A batch waits at most this long to fill.
const BATCH_DELAY: Duration = Duration::from_millis(500);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// An OTLP exporter for `endpoint`; an HTTP endpoint without a path gets `/v1/traces`.
pub(super) fn exporter(
    endpoint: &str,
    protocol: OtlpProtocol,
) -> Result<opentelemetry_otlp::SpanExporter, String> {
    match protocol {
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
    .map_err(|e| e.to_string())
}

/// Starts the export task for `exporter`: the queue to hand to the tracer provider, and the
/// channel a flush is asked on.
pub(super) fn spawn(
    exporter: opentelemetry_otlp::SpanExporter,
    counters: Counters,
) -> (Queue, mpsc::Sender<oneshot::Sender<()>>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let (flush, flushes) = mpsc::channel(1);
    let queue = Queue {
        tx,
        dropped: counters.dropped_queue_full.clone(),
    };
    tokio::spawn(export_loop(exporter, rx, flushes, counters));
    (queue, flush)
}

/// Hands finished spans to the export task without ever waiting.
#[derive(Debug)]
pub(super) struct Queue {
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
    mut flushes: mpsc::Receiver<oneshot::Sender<()>>,
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
