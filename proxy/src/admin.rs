//! The admin server: `/live`, `/ready`, `/metrics` (Prometheus text) and `/config_dump`
//! (the config in force, the proxy's settings and its endpoints, as JSON), the application
//! probes `sidemesh inject` points the kubelet at, and `POST /shutdown` from loopback.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::drain::Drain;
use crate::proto::body::{self, Body};
use crate::state::Proxy;

pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, mut drain: Drain) {
    loop {
        let (stream, peer) = tokio::select! {
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
        let mut closing = drain.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                // An application probe is answered by asking the application; the rest at once.
                let probe = proxy.app_probes.get(req.uri().path()).cloned();
                let resp = probe.is_none().then(|| answer(&proxy, &drain, &req, peer));
                async move {
                    Ok::<_, Infallible>(match (resp, probe) {
                        (Some(resp), _) => resp,
                        (None, Some(probe)) => app_probe(&probe).await,
                        (None, None) => text(StatusCode::NOT_FOUND, String::new()),
                    })
                }
            });
            // Idle keep-alive connections (a scraper's, a probe's) must not hold up a drain:
            // on shutdown, finish the request in progress and close.
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = closing.signaled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

pub use crate::config::{AppProbe, ProbeHeader, ProbeKind};

/// How long one probe of the application may take (the kubelet's own timeout is usually
/// shorter and answers for it).
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn app_probe(probe: &AppProbe) -> Response<Body> {
    let port = probe.port;
    let result = tokio::time::timeout(PROBE_TIMEOUT, async {
        match probe.kind {
            ProbeKind::Tcp => tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(|_| {
                    (
                        StatusCode::OK,
                        format!("application accepted a connection on port {port}\n"),
                    )
                }),
            ProbeKind::Grpc => grpc_probe(port, probe.service.as_deref().unwrap_or_default()).await,
            ProbeKind::Http | ProbeKind::Https => http_probe(probe).await,
        }
    })
    .await;
    match result {
        Ok(Ok((status, message))) => text(status, message),
        Ok(Err(e)) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("application probe on port {port} failed: {e}\n"),
        ),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("application probe on port {port} timed out\n"),
        ),
    }
}

async fn http_probe(probe: &AppProbe) -> std::io::Result<(StatusCode, String)> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", probe.port)).await?;
    let mut req = Request::get(probe.path.as_str())
        .header(header::HOST, format!("127.0.0.1:{}", probe.port))
        .header(header::USER_AGENT, "sidemesh-probe");
    for h in &probe.headers {
        req = req.header(h.name.as_str(), h.value.as_str());
    }
    let req = req.body(body::empty()).map_err(std::io::Error::other)?;
    let status = if probe.kind == ProbeKind::Https {
        let tls = tokio_rustls::TlsConnector::from(insecure_probe_tls());
        let name = rustls_pki_types::ServerName::from(std::net::IpAddr::from([127, 0, 0, 1]));
        send_probe(tls.connect(name, stream).await?, req).await?
    } else {
        send_probe(stream, req).await?
    };
    Ok((status, format!("application answered {status}\n")))
}

async fn send_probe<I>(io: I, req: Request<Body>) -> std::io::Result<StatusCode>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(std::io::Error::other)?;
    Ok(resp.status())
}

/// The kubelet does not check the certificate of an HTTPS probe, so neither does its stand-in.
fn insecure_probe_tls() -> Arc<rustls::ClientConfig> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    #[derive(Debug)]
    struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &rustls_pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Arc::new(config)
}

/// grpc.health.v1 `Check`, as the kubelet's gRPC probe makes it: SERVING is healthy.
async fn grpc_probe(port: u16, service: &str) -> std::io::Result<(StatusCode, String)> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .map_err(std::io::Error::other)?
        .connect()
        .await
        .map_err(std::io::Error::other)?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await;
    Ok(match answer {
        Ok(resp) if resp.get_ref().status == ServingStatus::Serving as i32 => {
            (StatusCode::OK, "application is SERVING\n".into())
        }
        Ok(resp) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "application health is {:?}\n",
                ServingStatus::try_from(resp.get_ref().status).unwrap_or(ServingStatus::Unknown)
            ),
        ),
        Err(status) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("application health check failed: {}\n", status.message()),
        ),
    })
}

fn answer(
    proxy: &Proxy,
    drain: &Drain,
    req: &Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<Body> {
    match req.uri().path() {
        // A job's last step (legacy sidecars) stops the proxy so the pod can complete. Only
        // from inside the pod: the admin port is reachable from the pod network.
        "/shutdown" if req.method() != http::Method::POST => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST /shutdown to stop the proxy\n".into(),
        ),
        "/shutdown" if !peer.ip().is_loopback() => text(
            StatusCode::FORBIDDEN,
            "/shutdown is only accepted from inside the pod (loopback)\n".into(),
        ),
        "/shutdown" => {
            tracing::info!("shutdown requested on the admin port");
            proxy.shutdown.send_replace(true);
            text(StatusCode::OK, "shutting down\n".into())
        }
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
            "not found: try /ready, /live, /metrics, /config_dump or POST /shutdown\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(body::full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
