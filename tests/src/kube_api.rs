//! A local Kubernetes API server for the control plane's Kubernetes support: EndpointSlices
//! listed (with `limit`/`continue` pages and a resource version) and watched (chunked
//! `ADDED`/`MODIFIED`/`DELETED` events, `BOOKMARK`s when asked, and a `410 Gone` `ERROR` event
//! once the history a watch needs has been compacted, which forces a re-list), and TokenReviews
//! answered from a table. Every request is recorded, so tests can tell a watch from a poll.
//!
//! It answers only with the caller's own bearer token, like a real API server.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

const SLICES_PATH: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const REVIEWS_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// A request the server received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: HashMap<String, String>,
    pub authorization: String,
    pub body: Value,
}

impl Seen {
    pub fn is_watch(&self) -> bool {
        self.path == SLICES_PATH && self.query.get("watch").is_some_and(|w| w == "true")
    }

    pub fn is_list(&self) -> bool {
        self.method == Method::GET && self.path == SLICES_PATH && !self.is_watch()
    }
}

#[derive(Debug, Clone)]
enum Change {
    Event {
        kind: &'static str,
        object: Value,
    },
    Bookmark,
    /// Compaction: open watches end with 410 Gone.
    Gone,
}

#[derive(Debug, Default)]
struct State {
    version: u64,
    slices: BTreeMap<String, Value>,
    /// Events after `compacted`, with their resource versions.
    history: Vec<(u64, &'static str, Value)>,
    compacted: u64,
    seen: Vec<Seen>,
    /// Token -> the TokenReview status the API server answers.
    reviews: HashMap<String, Value>,
    /// When the last change was sent to watchers.
    last_sent: Option<Instant>,
    /// Changes are made without telling watchers (inside `compact`).
    silent: bool,
}

/// The running server.
#[derive(Debug, Clone)]
pub struct KubeApi {
    pub addr: SocketAddr,
    token: String,
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<(u64, Change)>,
}

fn key(slice: &Value) -> String {
    format!(
        "{}/{}",
        slice["metadata"]["namespace"].as_str().unwrap_or("default"),
        slice["metadata"]["name"].as_str().unwrap_or_default()
    )
}

impl KubeApi {
    /// Starts on a loopback port; `token` is the only bearer token it accepts.
    pub async fn start(token: &str) -> KubeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let api = KubeApi {
            addr: listener.local_addr().expect("addr"),
            token: token.to_string(),
            state: Arc::new(Mutex::new(State {
                version: 100,
                ..State::default()
            })),
            changes: broadcast::channel(1024).0,
        };
        let server = api.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let server = server.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        api
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The requests received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// When the last change went out to the watchers.
    pub fn last_sent(&self) -> Option<Instant> {
        self.lock().last_sent
    }

    /// What the API server answers for a TokenReview of `token` (its `status`).
    pub fn review(&self, token: &str, status: Value) {
        self.lock().reviews.insert(token.to_string(), status);
    }

    /// Creates or replaces an EndpointSlice (`ADDED` or `MODIFIED` to watchers).
    pub fn apply(&self, mut slice: Value) {
        let mut state = self.lock();
        state.version += 1;
        let version = state.version;
        slice["metadata"]["resourceVersion"] = json!(version.to_string());
        let kind = if state.slices.insert(key(&slice), slice.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        if state.silent {
            return;
        }
        state.history.push((version, kind, slice.clone()));
        state.last_sent = Some(Instant::now());
        let _ = self.changes.send((
            version,
            Change::Event {
                kind,
                object: slice,
            },
        ));
    }

    /// Deletes an EndpointSlice (`DELETED` to watchers).
    pub fn delete(&self, namespace: &str, name: &str) {
        let mut state = self.lock();
        let Some(mut slice) = state.slices.remove(&format!("{namespace}/{name}")) else {
            return;
        };
        state.version += 1;
        let version = state.version;
        slice["metadata"]["resourceVersion"] = json!(version.to_string());
        if state.silent {
            return;
        }
        state.history.push((version, "DELETED", slice.clone()));
        state.last_sent = Some(Instant::now());
        let _ = self.changes.send((
            version,
            Change::Event {
                kind: "DELETED",
                object: slice,
            },
        ));
    }

    /// Sends a `BOOKMARK` with the current resource version to watches that asked for them.
    pub fn bookmark(&self) {
        let version = self.lock().version;
        let _ = self.changes.send((version, Change::Bookmark));
    }

    /// Compacts the history: open watches end with `410 Gone` and a watch from an older
    /// version is refused the same way, so clients must list again. The changes `then` makes
    /// are never sent as events: only a new list shows them.
    pub fn compact(&self, then: impl FnOnce(&KubeApi)) {
        self.lock().silent = true;
        then(self);
        let mut state = self.lock();
        state.silent = false;
        state.version += 1;
        let version = state.version;
        state.compacted = version;
        state.history.clear();
        state.last_sent = Some(Instant::now());
        let _ = self.changes.send((version, Change::Gone));
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<BoxBody<Bytes, Infallible>> {
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.replace("%2F", "/").replace("%2f", "/")))
            .collect();
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        let authorization = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        let body: Value = body
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let seen = Seen {
            method,
            path,
            query,
            authorization,
            body,
        };
        self.lock().seen.push(seen.clone());
        if seen.authorization != format!("Bearer {}", self.token) {
            return status(StatusCode::UNAUTHORIZED, "Unauthorized", 401);
        }
        if seen.is_watch() {
            return self.watch(&seen);
        }
        if seen.is_list() {
            return self.list(&seen);
        }
        if seen.method == Method::POST && seen.path == REVIEWS_PATH {
            let token = seen.body["spec"]["token"].as_str().unwrap_or_default();
            let answer = self.lock().reviews.get(token).cloned().unwrap_or_else(|| {
                json!({"authenticated": false, "error": "[invalid bearer token, service account token has expired]"})
            });
            let mut review = seen.body.clone();
            review["status"] = answer;
            return json_response(StatusCode::CREATED, &review);
        }
        status(StatusCode::NOT_FOUND, "NotFound", 404)
    }

    /// A page of the list: `limit` items from the `continue` offset.
    fn list(&self, seen: &Seen) -> Response<BoxBody<Bytes, Infallible>> {
        let state = self.lock();
        let start: usize = seen
            .query
            .get("continue")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let limit: usize = seen
            .query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let items: Vec<&Value> = state.slices.values().skip(start).take(limit).collect();
        let next = start + items.len();
        let more = next < state.slices.len();
        json_response(
            StatusCode::OK,
            &json!({
                "kind": "EndpointSliceList",
                "apiVersion": "discovery.k8s.io/v1",
                "metadata": {
                    "resourceVersion": state.version.to_string(),
                    "continue": if more { next.to_string() } else { String::new() },
                },
                "items": items,
            }),
        )
    }

    /// A chunked stream of watch events from `resourceVersion`.
    fn watch(&self, seen: &Seen) -> Response<BoxBody<Bytes, Infallible>> {
        let from: u64 = seen
            .query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bookmarks = seen
            .query
            .get("allowWatchBookmarks")
            .is_some_and(|b| b == "true");
        let timeout = seen
            .query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map_or(Duration::from_secs(290), Duration::from_secs);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
        let line = |value: Value| Ok(Frame::data(Bytes::from(format!("{value}\n"))));
        let gone = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410
        }});
        let (backlog, expired, mut changes) = {
            let state = self.lock();
            let backlog: Vec<Value> = state
                .history
                .iter()
                .filter(|(v, _, _)| *v > from)
                .map(|(_, kind, object)| json!({"type": kind, "object": object}))
                .collect();
            (backlog, from < state.compacted, self.changes.subscribe())
        };
        tokio::spawn(async move {
            if expired {
                let _ = tx.send(line(gone)).await;
                return;
            }
            for event in backlog {
                if tx.send(line(event)).await.is_err() {
                    return;
                }
            }
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            loop {
                let change = tokio::select! {
                    () = &mut deadline => return,
                    change = changes.recv() => change,
                };
                let event = match change {
                    Ok((v, _)) if v <= from => continue,
                    Ok((_, Change::Event { kind, object })) => {
                        json!({"type": kind, "object": object})
                    }
                    Ok((v, Change::Bookmark)) if bookmarks => {
                        json!({"type": "BOOKMARK", "object": {
                            "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                            "metadata": {"resourceVersion": v.to_string()}
                        }})
                    }
                    Ok((_, Change::Bookmark)) => continue,
                    Ok((_, Change::Gone)) | Err(_) => {
                        let _ = tx.send(line(gone.clone())).await;
                        return;
                    }
                };
                if tx.send(line(event)).await.is_err() {
                    return;
                }
            }
        });
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(body))
            .expect("response")
    }
}

fn json_response(code: StatusCode, value: &Value) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("response")
}

fn status(code: StatusCode, reason: &str, n: u16) -> Response<BoxBody<Bytes, Infallible>> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": n}),
    )
}

/// An EndpointSlice of `service` in `namespace` with ready `addresses` on `port`.
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    port: u16,
    ready: &[&str],
    not_ready: &[&str],
) -> Value {
    let endpoint = |ip: &&str, ready: bool| json!({"addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": !ready}});
    let endpoints: Vec<Value> = ready
        .iter()
        .map(|ip| endpoint(ip, true))
        .chain(not_ready.iter().map(|ip| endpoint(ip, false)))
        .collect();
    json!({
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "protocol": "TCP", "port": port}],
    })
}
