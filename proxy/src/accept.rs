//! Accepting connections: one loop per listener, a cap on open connections, the original
//! destination in transparent mode, then detection and the matching server.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use http::StatusCode;
use sidemesh_config::Protocol as PortProtocol;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::app::Proxy;
use crate::config::Mode;
use crate::detect::{self, DetectError, DetectLimits, Protocol};
use crate::drain::Drain;
use crate::http::{ConnInfo, Target};
use crate::metrics::Direction;
use crate::respond;
use crate::rewind::Rewind;

/// What a listener is for.
#[derive(Debug, Clone)]
pub enum ListenerKind {
    /// Calls from the local application to the mesh.
    Outbound,
    /// Explicit mode: calls from the local application to one service.
    Upstream(Arc<str>),
    /// Calls from the mesh to the local application.
    Inbound,
}

impl ListenerKind {
    pub fn name(&self) -> String {
        match self {
            ListenerKind::Outbound => "outbound".into(),
            ListenerKind::Upstream(s) => format!("upstream:{s}"),
            ListenerKind::Inbound => "inbound".into(),
        }
    }
}

pub async fn serve(listener: TcpListener, kind: ListenerKind, proxy: Arc<Proxy>, mut drain: Drain) {
    let open = Arc::new(Semaphore::new(proxy.limits.max_connections));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = drain.signaled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!(listener = %kind.name(), error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            proxy.metrics.connection_refused("connection-limit");
            tracing::warn!(listener = %kind.name(), limit = proxy.limits.max_connections, "connection limit reached; closing a new connection");
            continue;
        };
        let (kind, proxy, drain) = (kind.clone(), proxy.clone(), drain.clone());
        tokio::spawn(async move {
            handle(stream, peer, kind, proxy, drain).await;
            drop(permit);
        });
    }
}

async fn handle(
    mut stream: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    proxy: Arc<Proxy>,
    drain: Drain,
) {
    let _ = stream.set_nodelay(true);
    let snapshot = proxy.snapshot.load_full();
    let transparent = proxy.mode == Mode::Transparent;
    let (direction, target, port_protocol) = match &kind {
        ListenerKind::Outbound if transparent => match original_dst(&stream) {
            Ok(dst) => (Direction::Outbound, Target::OriginalDst(dst), None),
            Err(e) => {
                tracing::warn!(error = %e, "no original destination on a transparent connection; closing");
                return;
            }
        },
        ListenerKind::Outbound => (
            Direction::Outbound,
            Target::ByAuthority,
            Some(PortProtocol::Http),
        ),
        ListenerKind::Upstream(name) => {
            let protocol = snapshot
                .service_named(name)
                .map_or(PortProtocol::Http, |s| s.protocol);
            (
                Direction::Outbound,
                Target::Service(name.clone()),
                Some(protocol),
            )
        }
        ListenerKind::Inbound => {
            let app = match (proxy.app, transparent) {
                (Some(app), _) => app,
                (None, true) => match original_dst(&stream) {
                    Ok(dst) => SocketAddr::from(([127, 0, 0, 1], dst.port())),
                    Err(e) => {
                        tracing::warn!(error = %e, "no original destination on an inbound connection; closing");
                        return;
                    }
                },
                (None, false) => return,
            };
            let protocol = snapshot.local_service().map(|s| s.protocol);
            (Direction::Inbound, Target::App(app), protocol)
        }
    };

    let mut buf = BytesMut::new();
    let protocol = if port_protocol == Some(PortProtocol::Tcp) {
        Protocol::Opaque
    } else {
        let limits = DetectLimits {
            first_byte: proxy.timeouts.detect,
            head: proxy.timeouts.header,
            max_head_bytes: proxy.limits.max_header_bytes,
            max_headers: proxy.limits.max_headers,
            http_only: matches!(port_protocol, Some(PortProtocol::Http | PortProtocol::Grpc)),
        };
        match detect::sniff(&mut stream, &mut buf, limits).await {
            Ok(protocol) => protocol,
            Err(e) => return refuse(stream, e, &proxy).await,
        }
    };
    let _open = proxy
        .metrics
        .connection_opened(direction, protocol_name(protocol));
    let conn = ConnInfo {
        client: peer,
        direction,
        target,
    };
    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            crate::http::serve(
                Rewind::new(buf.freeze(), stream),
                protocol,
                conn,
                proxy,
                drain,
            )
            .await;
        }
        Protocol::Tls | Protocol::Opaque => opaque(stream, buf, conn, &proxy).await,
    }
}

/// Opaque TCP (and, until mTLS lands, TLS): forwarded byte for byte.
async fn opaque(stream: TcpStream, buf: BytesMut, conn: ConnInfo, proxy: &Proxy) {
    let upstream = match &conn.target {
        Target::App(addr) | Target::OriginalDst(addr) => *addr,
        Target::Service(name) => {
            let snapshot = proxy.snapshot.load();
            let Some(service) = snapshot.service_named(name) else {
                tracing::info!(service = %name, "opaque connection for a service not in the config; closing");
                return;
            };
            match service.balancer.pick(None) {
                Ok(endpoint) => endpoint.addr,
                Err(e) => {
                    tracing::info!(service = %name, error = ?e, "no endpoint for an opaque connection; closing");
                    return;
                }
            }
        }
        Target::ByAuthority => return,
    };
    if let Err(e) =
        crate::tcp::forward(stream, buf.freeze(), upstream, proxy.timeouts.connect).await
    {
        tracing::debug!(upstream = %upstream, error = %e, "opaque connection ended with an error");
    }
}

/// Answers a connection refused during detection (when it spoke HTTP) and closes it.
async fn refuse(mut stream: TcpStream, error: DetectError, proxy: &Proxy) {
    let (status, code, reason) = match &error {
        DetectError::HeadTooLarge { .. } | DetectError::TooManyHeaders { .. } => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers-too-large",
            "headers-too-large",
        ),
        DetectError::Malformed { .. } => (
            StatusCode::BAD_REQUEST,
            "malformed-request",
            "malformed-request",
        ),
        DetectError::HeadTimeout { .. } => (
            StatusCode::REQUEST_TIMEOUT,
            "header-timeout",
            "header-timeout",
        ),
        DetectError::Closed | DetectError::Io(_) => return,
    };
    proxy.metrics.connection_refused(reason);
    tracing::debug!(error = %error, "refused a connection during detection");
    let _ = stream
        .write_all(&respond::raw_http1(status, code, &error.to_string()))
        .await;
    let _ = stream.shutdown().await;
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Http1 => "http1",
        Protocol::Http2 => "http2",
        Protocol::Tls => "tls",
        Protocol::Opaque => "opaque",
    }
}

/// The address the application connected to before iptables redirected it here.
///
/// socket2 wraps getsockopt(SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST), so no `unsafe` is needed
/// in this crate.
fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket()
        .ok_or_else(|| std::io::Error::other("original destination is not an IP address"))
}
