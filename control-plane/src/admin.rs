//! The control plane's admin server: `/ready`, `/live`, `/metrics`, `/debug/config` (the config
//! in force), `/status` (the JSON behind `sidemesh status`) and `/stat` (every proxy's traffic
//! metrics, read at once, behind `sidemesh stat`).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::hub::Hub;
use crate::registry::ProxyStatus;
use crate::store::ConfigError;

/// What `sidemesh status` shows.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Status {
    pub config: Option<ConfigStatus>,
    pub config_error: Option<ConfigErrorStatus>,
    pub revision: u64,
    pub last_convergence: Option<ConvergenceStatus>,
    pub proxies: Vec<ProxyRow>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ConfigStatus {
    pub version: u64,
    pub hash: String,
    pub files: Vec<String>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ConfigErrorStatus {
    pub at_unix_ms: u128,
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ConvergenceStatus {
    pub revision: u64,
    pub millis: f64,
}

/// A proxy as `sidemesh status` lists it (the same fields as the registry's `ProxyStatus`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ProxyRow {
    pub id: String,
    pub service: String,
    pub namespace: String,
    pub address: Option<String>,
    /// Admin server (`/metrics`) of the proxy.
    #[serde(default)]
    pub admin: Option<String>,
    pub ready: bool,
    pub connected: bool,
    pub connected_for_secs: u64,
    pub applied_version: u64,
    pub synced: bool,
    pub last_nack: Option<NackRow>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct NackRow {
    pub version: u64,
    pub error: String,
}

impl From<ProxyStatus> for ProxyRow {
    fn from(p: ProxyStatus) -> Self {
        ProxyRow {
            id: p.info.id,
            service: p.info.service,
            namespace: p.info.namespace,
            address: p.info.address.map(|a| a.to_string()),
            admin: p.info.admin.map(|a| a.to_string()),
            ready: p.info.ready,
            connected: p.connected,
            connected_for_secs: p.connected_for_secs,
            applied_version: p.applied_version,
            synced: p.connected && !p.waiting_for_ack,
            last_nack: p.last_nack.map(|n| NackRow {
                version: n.version,
                error: n.error,
            }),
        }
    }
}

pub fn status(hub: &Hub) -> Status {
    Status {
        config: hub.store.current().map(|c| ConfigStatus {
            version: c.number,
            hash: c.hash.clone(),
            files: c.files.iter().map(|f| f.display().to_string()).collect(),
        }),
        config_error: hub
            .store
            .last_error()
            .map(|ConfigError { at_unix_ms, errors }| ConfigErrorStatus { at_unix_ms, errors }),
        revision: hub.revision().number,
        last_convergence: hub.registry.last_convergence().map(|(revision, took)| {
            ConvergenceStatus {
                revision,
                millis: took.as_secs_f64() * 1000.0,
            }
        }),
        proxies: hub
            .registry
            .statuses()
            .into_iter()
            .map(ProxyRow::from)
            .collect(),
    }
}

pub async fn serve(listener: TcpListener, hub: Arc<Hub>, mut stop: watch::Receiver<bool>) {
    let collector = crate::stat::Collector::default();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => continue,
            },
            () = crate::hub::stopped(&mut stop) => return,
        };
        let (hub, collector) = (hub.clone(), collector.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (hub, collector) = (hub.clone(), collector.clone());
                async move {
                    let resp = if req.uri().path() == "/stat" {
                        // Reads every proxy: the one answer that waits on the network.
                        let stat = collector.collect(status(&hub)).await;
                        json(&stat)
                    } else {
                        answer(&hub, req.uri().path())
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(
        serde_json::to_string(value).unwrap_or_default(),
    )));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn answer(hub: &Hub, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/live" => (StatusCode::OK, "text/plain", "live\n".to_string()),
        "/ready" => match hub.store.current() {
            Some(_) => (StatusCode::OK, "text/plain", "ready\n".to_string()),
            None => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "no valid config yet\n".to_string(),
            ),
        },
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            hub.metrics.encode(),
        ),
        "/status" => (
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&status(hub)).unwrap_or_default(),
        ),
        "/debug/config" => {
            let body = match hub.store.current() {
                Some(c) => serde_json::json!({
                    "version": c.number,
                    "hash": c.hash,
                    "files": c.files,
                    "mesh": c.mesh,
                }),
                None => serde_json::json!({ "version": null, "error": hub.store.last_error() }),
            };
            (
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&body).unwrap_or_default(),
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /ready, /live, /metrics, /status, /stat, /debug/config\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_str(content_type)
            .unwrap_or(http::HeaderValue::from_static("text/plain")),
    );
    resp
}
