//! The admin server: `/live`, `/ready`, `/metrics` (Prometheus text) and `/config_dump`
//! (the config in force, the proxy's settings and its endpoints, as JSON).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::app::Proxy;
use crate::body::{self, Body};
use crate::drain::Drain;

pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, mut drain: Drain) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = drain.signaled() => break,
        };
        let (proxy, drain) = (proxy.clone(), drain.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                // An application probe is answered by asking the application; the rest at once.
                let probe = proxy.app_probes.get(req.uri().path()).cloned();
                let resp = probe.is_none().then(|| answer(&proxy, &drain, &req));
                async move {
                    Ok::<_, Infallible>(match (resp, probe) {
                        (Some(resp), _) => resp,
                        (None, Some(probe)) => app_probe(&probe).await,
                        (None, None) => text(StatusCode::NOT_FOUND, String::new()),
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The kubelet's HTTP probe of an application container, rewritten by `sidemesh inject` to
/// come here: in strict mTLS mode a plaintext probe to the application's port would be refused
/// by the inbound listener, so the proxy makes it on the kubelet's behalf, over loopback.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct AppProbe {
    pub port: u16,
    pub path: String,
}

async fn app_probe(probe: &AppProbe) -> Response<Body> {
    let ask = async {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", probe.port)).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        let req = Request::get(probe.path.as_str())
            .header(header::HOST, format!("127.0.0.1:{}", probe.port))
            .header(header::USER_AGENT, "sidemesh-probe")
            .body(body::empty())
            .map_err(std::io::Error::other)?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>(resp.status())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), ask).await {
        Ok(Ok(status)) => text(status, format!("application answered {status}\n")),
        Ok(Err(e)) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("application probe on port {} failed: {e}\n", probe.port),
        ),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("application probe on port {} timed out\n", probe.port),
        ),
    }
}

fn answer(proxy: &Proxy, drain: &Drain, req: &Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" => {
            if drain.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
            } else if proxy.is_ready() {
                text(StatusCode::OK, "ready\n".into())
            } else if !proxy.identity.ready() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no workload certificate yet\n".into(),
                )
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: listeners or config not up yet\n".into(),
                )
            }
        }
        "/metrics" => {
            let mut resp = text(StatusCode::OK, proxy.metrics.encode());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/config_dump" => {
            let snapshot = proxy.snapshot.load();
            let dump = serde_json::json!({
                "config": snapshot.dump(),
                "proxy": {
                    "service": proxy.service,
                    "mode": proxy.mode,
                    "mtls": proxy.mtls(),
                    "app": proxy.app,
                    "limits": proxy.limits,
                    "timeouts": proxy.timeouts,
                },
                "identity": proxy.identity.dump(),
                "endpoints": proxy.registry.states(),
            });
            let mut resp = text(
                StatusCode::OK,
                serde_json::to_string_pretty(&dump).unwrap_or_default(),
            );
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /ready, /live, /metrics or /config_dump\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(body::full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
