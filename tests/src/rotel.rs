//! A real OpenTelemetry collector for tests: `rotel` (PyPI package `rotel`, which ships the
//! Rust `rotel-agent` binary). It listens for OTLP over gRPC and HTTP and prints every span it
//! receives; `spans()` parses that print-out.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// A span as the collector received it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeenSpan {
    /// `service.name` of the resource that sent it.
    pub service: String,
    pub trace_id: String,
    /// Empty for a root span.
    pub parent_id: String,
    pub span_id: String,
    pub name: String,
    /// e.g. `SPAN_KIND_SERVER`.
    pub kind: String,
    pub status: String,
    pub attributes: Vec<(String, String)>,
    /// Names of the span's events.
    pub events: Vec<String>,
    /// Attributes of the resource that sent it (`service.namespace`, `k8s.pod.name`, ...).
    pub resource: Vec<(String, String)>,
}

impl SeenSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A running collector; killed on drop.
#[derive(Debug)]
pub struct Rotel {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
}

impl Rotel {
    /// Finds `rotel-agent`: `$ROTEL_AGENT`, or inside the `rotel` Python package.
    pub fn agent_path() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("ROTEL_AGENT") {
            return Some(PathBuf::from(p));
        }
        let out = Command::new("python3")
            .args([
                "-c",
                "import rotel, os; print(os.path.dirname(rotel.__file__))",
            ])
            .output()
            .ok()?;
        let dir = String::from_utf8(out.stdout).ok()?;
        let path = PathBuf::from(dir.trim()).join("rotel-agent");
        path.exists().then_some(path)
    }

    /// Starts the collector on free loopback ports, or returns `None` when rotel is not installed.
    pub fn start() -> Option<Rotel> {
        Self::start_on(std::net::IpAddr::from([127, 0, 0, 1]))
    }

    /// Like `start`, listening on `ip` (e.g. an address network namespaces can reach).
    pub fn start_on(ip: std::net::IpAddr) -> Option<Rotel> {
        let agent = Self::agent_path()?;
        let grpc = free_port(ip);
        let http = free_port(ip);
        let mut child = Command::new(agent)
            .args([
                "start",
                "--otlp-grpc-endpoint",
                &grpc.to_string(),
                "--otlp-http-endpoint",
                &http.to_string(),
                "--exporter",
                "blackhole",
                "--debug-log",
                "traces",
                "--debug-log-verbosity",
                "detailed",
                "--log-file",
                "/dev/null",
                "--pid-file",
                &std::env::temp_dir()
                    .join(format!("rotel-{}.pid", grpc.port()))
                    .to_string_lossy(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let stdout = child.stdout.take()?;
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        // Ready once it accepts connections on its gRPC port.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(grpc).is_err() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Some(Rotel {
            grpc,
            http,
            child,
            output,
        })
    }

    /// The OTLP/gRPC endpoint URL, e.g. `http://127.0.0.1:4317`.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// The collector's print-out so far (to show when an assertion fails).
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<SeenSpan> {
        parse(&self.output.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port(ip: std::net::IpAddr) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).expect("bind a free port");
    l.local_addr().expect("local addr")
}

/// Parses rotel's `--debug-log traces --debug-log-verbosity detailed` output.
fn parse(lines: &[String]) -> Vec<SeenSpan> {
    let mut spans = Vec::new();
    let mut service = String::new();
    let mut resource: Vec<(String, String)> = Vec::new();
    let mut current: Option<SeenSpan> = None;
    let mut in_span_attributes = false;
    let mut in_events = false;
    for line in lines {
        let trimmed = line.trim();
        if line.starts_with("ResourceSpans #") {
            spans.extend(current.take());
            service.clear();
            resource.clear();
            in_span_attributes = false;
        } else if current.is_none() && trimmed.starts_with("-> ") {
            // Resource attributes come before the first span of a ResourceSpans block.
            if let Some((k, v)) = trimmed.trim_start_matches("-> ").split_once(": ") {
                let v = v
                    .split_once('(')
                    .map_or(v, |(_, inner)| inner.strip_suffix(')').unwrap_or(inner));
                if k == "service.name" {
                    service = v.to_string();
                }
                resource.push((k.to_string(), v.to_string()));
            }
        } else if trimmed.starts_with("Span #") {
            spans.extend(current.take());
            current = Some(SeenSpan {
                service: service.clone(),
                resource: resource.clone(),
                ..SeenSpan::default()
            });
            in_span_attributes = false;
            in_events = false;
        } else if let Some(span) = current.as_mut() {
            let field = |prefix: &str| {
                trimmed
                    .strip_prefix(prefix)
                    .map(|v| v.trim_start_matches([' ', ':']).trim().to_string())
            };
            if let Some(v) = field("Trace ID") {
                span.trace_id = v;
            } else if let Some(v) = field("Parent ID") {
                span.parent_id = v;
            } else if let Some(v) = field("ID") {
                span.span_id = v;
            } else if let Some(v) = field("Name") {
                span.name = v;
            } else if let Some(v) = field("Kind") {
                span.kind = v;
            } else if let Some(v) = field("Status code") {
                span.status = v;
            } else if trimmed == "Attributes:" {
                in_span_attributes = true;
                in_events = false;
            } else if trimmed.starts_with("Events:") {
                in_span_attributes = false;
                in_events = true;
            } else if trimmed.starts_with("Links:") || trimmed.starts_with("ScopeSpans") {
                in_span_attributes = false;
                in_events = false;
            } else if in_events {
                if let Some(name) = trimmed.strip_prefix("-> Name: ") {
                    span.events.push(name.trim().to_string());
                }
            } else if in_span_attributes {
                if let Some((k, v)) = trimmed.trim_start_matches("-> ").split_once(": ") {
                    let v = v
                        .split_once('(')
                        .map_or(v, |(_, inner)| inner.strip_suffix(')').unwrap_or(inner));
                    span.attributes.push((k.to_string(), v.to_string()));
                }
            }
        }
    }
    spans.extend(current);
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rotel_detailed_output() {
        let text = "ResourceSpans #0\nResource attributes:\n     -> service.name: Str(user-service)\nScopeSpans #0\nSpan #0\n    Trace ID       : 0af7651916cd43dd8448eb211c80319c\n    Parent ID      : b7ad6b7169203331\n    ID             : bc35c7f5a0f5600a\n    Name           : GET /users/{id}\n    Kind           : SPAN_KIND_SERVER\n    Status code    : STATUS_CODE_UNSET\nAttributes:\n     -> http.route: Str(/users/{id})\n     -> http.response.status_code: Int(200)\nSpan #1\n    Trace ID       : 1\n    Parent ID      : \n    ID             : 2\n    Name           : x\n";
        let lines: Vec<String> = text.lines().map(String::from).collect();
        let spans = parse(&lines);
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0].service, "user-service");
        assert_eq!(spans[0].parent_id, "b7ad6b7169203331");
        assert_eq!(spans[0].span_id, "bc35c7f5a0f5600a");
        assert_eq!(spans[0].name, "GET /users/{id}");
        assert_eq!(spans[0].attribute("http.response.status_code"), Some("200"));
        assert_eq!(spans[1].parent_id, "");
        assert_eq!(spans[1].service, "user-service");
    }
}
