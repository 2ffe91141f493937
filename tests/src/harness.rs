//! Processes, HTTP and polling helpers for end-to-end tests.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The workspace root (where `Cargo.toml` with `[workspace]` lives).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

/// Path of a workspace binary, built once per test process with the same profile as the tests.
///
/// `cargo test` builds only the binaries of the package under test, so the end-to-end tests
/// build the others themselves (as `escargot` does); cargo's own lock serialises concurrent builds.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps")
            .to_path_buf();
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // What `cargo test` sets for the test process would make this build differ from the
        // caller's (build scripts watch CARGO_MANIFEST_DIR) and rebuild half the tree.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key == "CARGO_MANIFEST_DIR"
                || key == "CARGO_MANIFEST_PATH"
                || key == "CARGO_CRATE_NAME"
                || key == "CARGO_PRIMARY_PACKAGE"
                || key == "CARGO_TARGET_TMPDIR"
                || key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_BIN_EXE_")
            {
                cmd.env_remove(key.as_ref());
            }
        }
        cmd.current_dir(workspace_root())
            .args(["build", "--workspace", "--bins"]);
        if profile != "debug" {
            cmd.args(["--profile", profile]);
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
        profile_dir
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Prints why a test is skipped; fails instead when `SIDEMESH_NO_SKIP=1` (as CI sets it).
pub fn skip(reason: &str) {
    if std::env::var("SIDEMESH_NO_SKIP").is_ok_and(|v| v == "1") {
        panic!("test cannot be skipped under SIDEMESH_NO_SKIP=1: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

/// A running binary. Killed (SIGKILL) on drop unless it already exited.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    /// The first listener's address.
    pub addr: SocketAddr,
    /// Every `listening` line: the `listener` field (or `main`) -> address.
    pub listeners: Vec<(String, SocketAddr)>,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `name` with `args` and waits (10 s at most) for its `listening` log line.
    pub fn start(name: &str, args: &[&str]) -> Proc {
        Self::start_until(name, args, "listening")
    }

    /// Starts `name` and waits (10 s at most) for a log line whose message is `ready_message`,
    /// collecting every `listening` line before it.
    pub fn start_until(name: &str, args: &[&str], ready_message: &str) -> Proc {
        Self::start_wrapped(name, &[], args, ready_message)
    }

    /// Like `start_until`, with the binary run through `wrapper` (e.g. `ip netns exec <ns>`,
    /// `setpriv --reuid 2102 ...`).
    pub fn start_wrapped(name: &str, wrapper: &[&str], args: &[&str], ready_message: &str) -> Proc {
        let binary = bin(name);
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        let mut child = command
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        let ready_message = ready_message.to_string();
        std::thread::spawn(move || {
            let mut listeners = Vec::new();
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(listener) = listening_addr(&line) {
                    listeners.push(listener);
                }
                if !sent && log_message(&line).as_deref() == Some(ready_message.as_str()) {
                    let _ = tx.send(listeners.clone());
                    sent = true;
                }
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let listeners = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(listeners) if !listeners.is_empty() => listeners,
            _ => {
                let _ = child.kill();
                let logs = logs.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
                panic!("{name} did not log `listening` within 10s; its logs:\n{logs}");
            }
        };
        Proc {
            name: name.to_string(),
            addr: listeners[0].1,
            listeners,
            child,
            logs,
        }
    }

    /// The address of a named listener (`outbound`, `admin`, `upstream:<service>`, ...).
    pub fn listener(&self, name: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| {
                panic!(
                    "{} has no `{name}` listener: {:?}",
                    self.name, self.listeners
                )
            })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A proxy's `/config_dump` (from its `admin` listener) as JSON; `None` while it does not
    /// answer, so callers can poll it with `eventually`.
    pub async fn config_dump(&self) -> Option<serde_json::Value> {
        let url = format!("http://{}/config_dump", self.listener("admin"));
        Some(http(Method::GET, &url, None, &[]).await.ok()?.json())
    }

    /// Sends a signal by name (`TERM`, `INT`) with the system `kill`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log lines written so far (stderr).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn log_message(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    Some(v.get("fields")?.get("message")?.as_str()?.to_string())
}

/// `(listener, addr)` from a JSON log line whose message is `listening`.
fn listening_addr(line: &str) -> Option<(String, SocketAddr)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields")?;
    if fields.get("message")?.as_str()? != "listening" {
        return None;
    }
    let name = fields
        .get("listener")
        .and_then(|l| l.as_str())
        .unwrap_or("main")
        .to_string();
    Some((name, fields.get("addr")?.as_str()?.parse().ok()?))
}

/// What an HTTP response looked like to the client.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Response {
    /// A header's value, when present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request; `body` is sent as JSON when given. Extra headers as `(name, value)`.
pub async fn http(
    method: Method,
    url: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> anyhow::Result<Response> {
    static CLIENT: OnceLock<
        Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    > = OnceLock::new();
    let client = CLIENT.get_or_init(|| Client::builder(TokioExecutor::new()).build_http());
    let mut req = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if body.is_some() {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default().to_string())))?;
    let resp = client.request(req).await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned();
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Polls `check` until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs `kubernetes-validate --strict` on `files`: `Some((passed, output))`, or `None` (after
/// printing why, or failing under `SIDEMESH_NO_SKIP=1`) when the tool is not installed.
pub fn kubernetes_validate(files: &[&Path]) -> Option<(bool, String)> {
    if Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_err()
    {
        skip("kubernetes-validate (pip install kubernetes-validate) is not installed");
        return None;
    }
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .args(files)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), text))
}
