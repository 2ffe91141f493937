//! Traces without a tracing backend: `sidemesh up` runs a small OTLP/gRPC collector that
//! appends every span it receives to a JSON-lines file, and `sidemesh traces` prints that
//! file as trees, one per trace.
//!
//! The file is bounded: past [`ROTATE_BYTES`] it becomes `<file>.1` (replacing the older one)
//! and a new file starts, so a long `sidemesh up` keeps at most twice that on disk.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Where `sidemesh up` keeps spans, relative to the folder it runs in.
pub const DEFAULT_FILE: &str = ".sidemesh/up/traces.jsonl";

/// Size at which the span file is rotated.
pub const ROTATE_BYTES: u64 = 32 * 1024 * 1024;

/// One finished span, as kept in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpanRecord {
    pub trace_id: String,
    pub span_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parent_id: String,
    pub name: String,
    /// The resource's `service.name`.
    pub service: String,
    /// `server`, `client`, `internal`, `producer` or `consumer`.
    pub kind: String,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub error: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BytesValue(b)) => hex(b),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

/// Flattens an OTLP export into records.
pub fn records(request: &ExportTraceServiceRequest) -> Vec<SpanRecord> {
    let mut out = Vec::new();
    for rs in &request.resource_spans {
        let resource = rs
            .resource
            .as_ref()
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        let service = resource
            .get("service.name")
            .cloned()
            .unwrap_or_else(|| "unknown".into());
        for span in rs.scope_spans.iter().flat_map(|s| &s.spans) {
            let kind = match span.kind {
                1 => "internal",
                2 => "server",
                3 => "client",
                4 => "producer",
                5 => "consumer",
                _ => "unspecified",
            };
            out.push(SpanRecord {
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_id: hex(&span.parent_span_id),
                name: span.name.clone(),
                service: service.clone(),
                kind: kind.into(),
                start_unix_nanos: span.start_time_unix_nano,
                end_unix_nanos: span.end_time_unix_nano,
                error: span.status.as_ref().is_some_and(|s| s.code == 2),
                attributes: attributes(&span.attributes),
                events: span.events.iter().map(|e| e.name.clone()).collect(),
            });
        }
    }
    out
}

/// The OTLP trace service: records go to the writer task; a full queue drops the export
/// rather than slowing the mesh down.
struct Collector {
    spans: mpsc::Sender<Vec<SpanRecord>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let records = records(request.get_ref());
        self.spans
            .try_send(records)
            .map_err(|_| tonic::Status::resource_exhausted("the span file is behind"))?;
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Appends records to `path`, rotating it past [`ROTATE_BYTES`].
struct SpanFile {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    written: u64,
}

impl SpanFile {
    fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file: std::io::BufWriter::new(file),
            written,
        })
    }

    fn append(&mut self, records: &[SpanRecord]) -> std::io::Result<()> {
        for record in records {
            let line = serde_json::to_string(record)?;
            self.file.write_all(line.as_bytes())?;
            self.file.write_all(b"\n")?;
            self.written += line.len() as u64 + 1;
        }
        self.file.flush()?;
        if self.written > ROTATE_BYTES {
            std::fs::rename(&self.path, rotated(&self.path))?;
            *self = Self::open(&self.path)?;
        }
        Ok(())
    }
}

fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// A running collector: its address, for the proxies' `--otlp-endpoint`.
#[derive(Debug)]
pub struct LocalCollector {
    pub addr: SocketAddr,
    pub path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl LocalCollector {
    /// Starts the collector on `listen`, appending to `path` (created if missing).
    pub async fn start(
        listen: SocketAddr,
        path: &Path,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<Self> {
        let mut file = SpanFile::open(path)
            .map_err(|e| anyhow::anyhow!("cannot open the span file {}: {e}", path.display()))?;
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (tx, mut rx) = mpsc::channel::<Vec<SpanRecord>>(256);
        let writer = tokio::task::spawn_blocking(move || {
            let mut warned = false;
            while let Some(records) = rx.blocking_recv() {
                if let Err(e) = file.append(&records) {
                    if !std::mem::replace(&mut warned, true) {
                        eprintln!(
                            "warning: cannot write spans to {}: {e}",
                            file.path.display()
                        );
                    }
                }
            }
        });
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector { spans: tx }))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop,
            );
        let task = tokio::spawn(async move {
            if let Err(e) = server.await {
                eprintln!("warning: the local span collector stopped: {e}");
            }
            // The server is gone, and with it the sender: the writer drains and ends.
            let _ = writer.await;
        });
        Ok(Self {
            addr,
            path: path.to_path_buf(),
            task,
        })
    }

    /// Waits until the collector has stopped and every span it accepted is on disk.
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct TracesArgs {
    /// The span file `sidemesh up` writes.
    #[arg(long, default_value = DEFAULT_FILE)]
    pub file: PathBuf,
    /// How many traces to print, the most recent last.
    #[arg(long, short = 'n', default_value_t = 5)]
    pub last: usize,
    /// Only traces with a span of this service.
    #[arg(long)]
    pub service: Option<String>,
    /// Only traces with an error span.
    #[arg(long)]
    pub errors: bool,
    /// One trace, by its ID (as printed, or as in a `traceparent` header).
    #[arg(long)]
    pub trace: Option<String>,
}

/// Reads the span file and its rotated predecessor; unreadable lines are skipped.
pub fn read(path: &Path) -> anyhow::Result<Vec<SpanRecord>> {
    let mut spans = Vec::new();
    let mut found = false;
    for file in [rotated(path), path.to_path_buf()] {
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => anyhow::bail!("cannot read {}: {e}", file.display()),
        };
        found = true;
        spans.extend(
            text.lines()
                .filter_map(|l| serde_json::from_str::<SpanRecord>(l).ok()),
        );
    }
    anyhow::ensure!(
        found,
        "no span file at {}: run `sidemesh up` (without --otlp) in this folder first, or pass --file",
        path.display()
    );
    Ok(spans)
}

/// Groups spans into traces, ordered by their first span's start.
pub fn traces(spans: Vec<SpanRecord>) -> Vec<Vec<SpanRecord>> {
    let mut by_trace: HashMap<String, Vec<SpanRecord>> = HashMap::new();
    for span in spans {
        by_trace
            .entry(span.trace_id.clone())
            .or_default()
            .push(span);
    }
    let mut traces: Vec<Vec<SpanRecord>> = by_trace.into_values().collect();
    for trace in &mut traces {
        trace.sort_by_key(|s| (s.start_unix_nanos, s.end_unix_nanos));
    }
    traces.sort_by_key(|t| t.first().map(|s| s.start_unix_nanos));
    traces
}

fn duration(nanos: u64) -> String {
    let ms = nanos as f64 / 1e6;
    if ms < 10.0 {
        format!("{ms:.2}ms")
    } else if ms < 1000.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{:.2}s", ms / 1000.0)
    }
}

fn line(span: &SpanRecord) -> String {
    let mut text = format!(
        "{} {} ({}) {}",
        span.service,
        span.name,
        span.kind,
        duration(span.end_unix_nanos.saturating_sub(span.start_unix_nanos))
    );
    if let Some(status) = span.attributes.get("http.response.status_code") {
        let _ = write!(text, " {status}");
    }
    if let Some(attempt) = span.attributes.get("sidemesh.attempt") {
        let _ = write!(text, " attempt {attempt}");
    }
    if let Some(peer) = span.attributes.get("sidemesh.peer.identity") {
        let _ = write!(text, " from {peer}");
    }
    if span.error {
        text.push_str(" ERROR");
    }
    for event in &span.events {
        let _ = write!(text, " [{event}]");
    }
    text
}

/// One trace as a tree: children under their parent, in start order. Spans whose parent is
/// not in the file (it was sampled elsewhere, or rotated away) are printed as roots.
pub fn render(trace: &[SpanRecord]) -> String {
    let ids: std::collections::HashSet<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
    let mut children: HashMap<&str, Vec<&SpanRecord>> = HashMap::new();
    let mut roots = Vec::new();
    for span in trace {
        if !span.parent_id.is_empty() && ids.contains(span.parent_id.as_str()) {
            children.entry(&span.parent_id).or_default().push(span);
        } else {
            roots.push(span);
        }
    }
    let first = trace.first().map_or(0, |s| s.start_unix_nanos);
    let last = trace
        .iter()
        .map(|s| s.end_unix_nanos)
        .max()
        .unwrap_or(first);
    let mut out = format!(
        "trace {}  {} span{}  {}\n",
        trace.first().map_or("", |s| &s.trace_id),
        trace.len(),
        if trace.len() == 1 { "" } else { "s" },
        duration(last.saturating_sub(first)),
    );
    fn walk(
        out: &mut String,
        span: &SpanRecord,
        prefix: &str,
        last: bool,
        root: bool,
        children: &HashMap<&str, Vec<&SpanRecord>>,
    ) {
        let (branch, next) = match (root, last) {
            (true, _) => ("", String::new()),
            (false, true) => ("└─ ", format!("{prefix}   ")),
            (false, false) => ("├─ ", format!("{prefix}│  ")),
        };
        let _ = writeln!(out, "{prefix}{branch}{}", line(span));
        let kids = children.get(span.span_id.as_str()).map_or(&[][..], |v| v);
        for (i, child) in kids.iter().enumerate() {
            walk(out, child, &next, i + 1 == kids.len(), false, children);
        }
    }
    for root in roots {
        walk(&mut out, root, "", true, true, &children);
    }
    out
}

/// `sidemesh traces`.
pub fn print(args: &TracesArgs) -> anyhow::Result<()> {
    let mut all = traces(read(&args.file)?);
    if let Some(id) = &args.trace {
        let id = id.to_ascii_lowercase();
        all.retain(|t| t.first().is_some_and(|s| s.trace_id == id));
        anyhow::ensure!(!all.is_empty(), "no trace {id} in {}", args.file.display());
    }
    if let Some(service) = &args.service {
        all.retain(|t| t.iter().any(|s| &s.service == service));
    }
    if args.errors {
        all.retain(|t| t.iter().any(|s| s.error));
    }
    if all.is_empty() {
        println!("no traces yet in {}", args.file.display());
        return Ok(());
    }
    let skip = all.len().saturating_sub(args.last);
    let mut out = std::io::stdout().lock();
    for trace in &all[skip..] {
        match writeln!(out, "{}", render(trace)) {
            Ok(()) => {}
            // `sidemesh traces | head`: the reader has seen enough.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: &str, parent: &str, service: &str, start: u64, end: u64) -> SpanRecord {
        SpanRecord {
            trace_id: "t1".into(),
            span_id: id.into(),
            parent_id: parent.into(),
            name: "GET /orders/*".into(),
            service: service.into(),
            kind: "server".into(),
            start_unix_nanos: start,
            end_unix_nanos: end,
            error: false,
            attributes: BTreeMap::from([("http.response.status_code".into(), "200".into())]),
            events: Vec::new(),
        }
    }

    #[test]
    fn renders_children_under_their_parents_in_start_order() {
        let trace = traces(vec![
            span("c", "b", "user-service", 3_000_000, 4_000_000),
            span("a", "", "loadgen", 1_000_000, 6_000_000),
            span("b", "a", "order-service", 2_000_000, 5_000_000),
            span("d", "a", "order-service", 5_500_000, 5_900_000),
            span("x", "gone", "elsewhere", 1_500_000, 1_600_000),
        ]);
        assert_eq!(trace.len(), 1);
        let text = render(&trace[0]);
        let expected = "\
trace t1  5 spans  5.00ms
loadgen GET /orders/* (server) 5.00ms 200
├─ order-service GET /orders/* (server) 3.00ms 200
│  └─ user-service GET /orders/* (server) 1.00ms 200
└─ order-service GET /orders/* (server) 0.40ms 200
elsewhere GET /orders/* (server) 0.10ms 200
";
        assert_eq!(text, expected);
    }

    #[test]
    fn the_file_rotates_and_both_halves_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spans.jsonl");
        let mut file = SpanFile::open(&path).expect("open");
        file.append(&[span("a", "", "one", 1, 2)]).expect("append");
        file.written = ROTATE_BYTES;
        file.append(&[span("b", "a", "two", 2, 3)]).expect("append");
        assert!(rotated(&path).exists());
        file.append(&[span("c", "b", "three", 3, 4)])
            .expect("append");
        let spans = read(&path).expect("read");
        let ids: Vec<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        let missing = read(&dir.path().join("none.jsonl")).expect_err("no file");
        assert!(
            missing.to_string().contains("run `sidemesh up`"),
            "{missing}"
        );
    }
}
