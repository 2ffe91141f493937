//! Real servers to put behind the proxy: HTTP echo (with a health switch), WebSocket echo,
//! TCP echo, and a gRPC server whose stream ends with a non-zero status in trailers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sidemesh_demo::proto::user_service_server::{UserService, UserServiceServer};
use sidemesh_demo::proto::{GetUserRequest, ListUsersRequest, User};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type EchoBody = BoxBody<Bytes, hyper::Error>;

/// An HTTP/1.1 + HTTP/2 (h2c) server for proxy tests.
///
/// - `/echo`: streams the request body back.
/// - `/headers`: the request's version and headers as JSON.
/// - `/slow/{ms}`: answers after a delay; `/slow-first/{ms}` only on the first attempt.
/// - `/status/{code}`: answers with that status.
/// - anything else: 200 with the server's id.
///
/// Every response carries `x-server-id`. When made unhealthy, it answers 500 to everything.
#[derive(Debug, Clone)]
pub struct EchoServer {
    pub addr: SocketAddr,
    pub id: String,
    healthy: Arc<AtomicBool>,
    /// Of each 1000 requests, how many get a 500 (spread evenly).
    failure_permille: Arc<AtomicU64>,
    hits: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    stopped: Arc<tokio::sync::watch::Sender<bool>>,
}

impl EchoServer {
    pub async fn start(id: &str) -> EchoServer {
        Self::start_on(id, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// A server on `addr` (port 0: any), e.g. the address of one that was stopped.
    pub async fn start_on(id: &str, addr: SocketAddr) -> EchoServer {
        let listener = TcpListener::bind(addr).await.expect("bind echo server");
        let addr = listener.local_addr().expect("addr");
        let (stopped, _) = tokio::sync::watch::channel(false);
        let server = EchoServer {
            addr,
            id: id.to_string(),
            healthy: Arc::new(AtomicBool::new(true)),
            failure_permille: Arc::new(AtomicU64::new(0)),
            hits: Arc::new(AtomicU64::new(0)),
            connections: Arc::new(AtomicU64::new(0)),
            stopped: Arc::new(stopped),
        };
        let state = server.clone();
        let mut stop = server.stopped.subscribe();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stop.wait_for(|s| *s) => return,
                };
                let Ok((stream, _)) = accepted else {
                    continue;
                };
                state.connections.fetch_add(1, Ordering::SeqCst);
                let state = state.clone();
                let mut stop = state.stopped.subscribe();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.answer(req).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let serve =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = serve => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                });
            }
        });
        server
    }

    /// Closes the listener and every connection, as an application that crashed.
    pub fn stop(&self) {
        self.stopped.send_replace(true);
    }

    /// Answers 500 to `permille` of each 1000 requests, spread evenly.
    pub fn set_failure_permille(&self, permille: u64) {
        self.failure_permille.store(permille, Ordering::SeqCst);
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<EchoBody> {
        let n = self.hits.fetch_add(1, Ordering::SeqCst);
        let p = self.failure_permille.load(Ordering::SeqCst);
        let unlucky = n * p / 1000 != (n + 1) * p / 1000;
        let path = req.uri().path().to_string();
        let full = |status: StatusCode, body: String| {
            let mut resp = Response::new(
                Full::new(Bytes::from(body))
                    .map_err(|never| match never {})
                    .boxed(),
            );
            *resp.status_mut() = status;
            resp
        };
        let mut resp = if !self.healthy.load(Ordering::SeqCst) || unlucky {
            full(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{} is unhealthy", self.id),
            )
        } else if path == "/echo" {
            Response::new(req.into_body().boxed())
        } else if path == "/headers" {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        serde_json::Value::String(v.to_str().unwrap_or("?").to_string()),
                    )
                })
                .collect();
            let body = serde_json::json!({
                "version": format!("{:?}", req.version()),
                "uri": req.uri().to_string(),
                "headers": headers,
            });
            full(StatusCode::OK, body.to_string())
        } else if let Some(ms) = path
            .strip_prefix("/slow-first/")
            .and_then(|ms| ms.parse().ok())
        {
            // Slow only on the proxy's first attempt: shows a per-try timeout then a success.
            let attempt = req
                .headers()
                .get("x-sidemesh-attempt")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("1")
                .to_string();
            if attempt == "1" {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            full(StatusCode::OK, format!("attempt {attempt}"))
        } else if let Some(ms) = path.strip_prefix("/slow/").and_then(|ms| ms.parse().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            full(StatusCode::OK, format!("slow {ms}ms"))
        } else if let Some(code) = path
            .strip_prefix("/status/")
            .and_then(|c| c.parse::<u16>().ok())
        {
            full(
                StatusCode::from_u16(code).unwrap_or(StatusCode::OK),
                format!("status {code}"),
            )
        } else {
            full(StatusCode::OK, self.id.clone())
        };
        if let Ok(v) = http::HeaderValue::from_str(&self.id) {
            resp.headers_mut().insert("x-server-id", v);
        }
        resp
    }
}

/// A WebSocket server that echoes every message.
pub async fn websocket_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind ws");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A TCP server that echoes bytes until the client half-closes, then says how many it got
/// (`\n<count> bytes\n`) and closes: so a test sees that half-close passed through.
pub async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind tcp echo");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let mut total = 0usize;
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            total += n;
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = stream
                    .write_all(format!("\n{total} bytes\n").as_bytes())
                    .await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// A gRPC UserService whose `ListUsers` streams two users and then fails with DATA_LOSS, so
/// the status can only arrive in HTTP/2 trailers.
#[derive(Debug, Default)]
pub struct TrailerService;

#[tonic::async_trait]
impl UserService for TrailerService {
    async fn get_user(
        &self,
        req: tonic::Request<GetUserRequest>,
    ) -> Result<tonic::Response<User>, tonic::Status> {
        let id = req.get_ref().id;
        if id == 0 {
            return Err(tonic::Status::invalid_argument("id 0 is not a user"));
        }
        Ok(tonic::Response::new(User {
            id,
            name: format!("user {id}"),
            email: format!("{id}@example.com"),
        }))
    }

    type ListUsersStream = tokio_stream::Iter<std::vec::IntoIter<Result<User, tonic::Status>>>;

    async fn list_users(
        &self,
        _: tonic::Request<ListUsersRequest>,
    ) -> Result<tonic::Response<Self::ListUsersStream>, tonic::Status> {
        let items = vec![
            Ok(User {
                id: 1,
                name: "one".into(),
                email: "1@example.com".into(),
            }),
            Ok(User {
                id: 2,
                name: "two".into(),
                email: "2@example.com".into(),
            }),
            Err(tonic::Status::data_loss("stream cut short on purpose")),
        ];
        Ok(tonic::Response::new(tokio_stream::iter(items)))
    }
}

/// Serves `TrailerService` over h2c.
pub async fn grpc_trailers() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(UserServiceServer::new(TrailerService))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}
