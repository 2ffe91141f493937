//! Accepting connections: one loop per listener, a cap on open connections, the original
//! destination in transparent mode, then detection and the matching server.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use sidemesh_config::MtlsMode;
use sidemesh_config::Protocol as PortProtocol;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::Mode;
use crate::drain::Drain;
use crate::http::{ConnInfo, Target};
use crate::identity::tls::{self, Carried};
use crate::proto::detect::{self, DetectError, DetectLimits, Protocol};
use crate::proto::rewind::Rewind;
use crate::respond;
use crate::state::Proxy;
use crate::telemetry::metrics::Direction;

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

    // Inbound, mTLS on: every connection is sniffed, since peer proxies speak TLS on any port.
    let mtls = match direction {
        Direction::Inbound => proxy.mtls(),
        Direction::Outbound => MtlsMode::Disabled,
    };
    let mut buf = BytesMut::new();
    let protocol = if port_protocol == Some(PortProtocol::Tcp) && mtls == MtlsMode::Disabled {
        Protocol::Opaque
    } else {
        let limits = DetectLimits {
            first_byte: proxy.timeouts.detect,
            head: proxy.timeouts.header,
            max_head_bytes: proxy.limits.max_header_bytes,
            http_only: matches!(port_protocol, Some(PortProtocol::Http | PortProtocol::Grpc))
                && mtls == MtlsMode::Disabled,
        };
        match detect::sniff(&mut stream, &mut buf, limits).await {
            Ok(protocol) => protocol,
            Err(e) => return refuse(stream, e, &proxy).await,
        }
    };
    let io = Rewind::new(buf.freeze(), stream);
    match (protocol, mtls) {
        (Protocol::Tls, MtlsMode::Strict | MtlsMode::Permissive) => {
            return inbound_tls(io, peer, target, mtls, proxy, drain).await;
        }
        (_, MtlsMode::Strict) => return refuse_plaintext(io, peer, protocol, &proxy).await,
        (Protocol::Opaque, MtlsMode::Permissive) if opaque_allowed(&proxy, None).is_err() => {
            // Detection runs without the HTTP-only rule when mTLS is on (a peer's TLS must get
            // through), so plaintext that is not clearly HTTP is refused here instead.
            proxy.metrics.connection_refused("not-http");
            tracing::info!(client = %peer, "refused a plaintext connection that is not HTTP on an HTTP port");
            return;
        }
        _ => {}
    }
    let _open = proxy
        .metrics
        .connection_opened(direction, protocol_name(protocol), false);
    let conn = ConnInfo::new(peer, direction, target, None, &proxy);
    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            crate::http::serve(io, protocol, conn, proxy, drain).await;
        }
        Protocol::Tls | Protocol::Opaque => opaque(io, conn, &proxy).await,
    }
}

/// Inbound TLS: a peer proxy's mTLS is terminated and what it carries is served; another TLS
/// client is passed to the application as it is (permissive) or refused (strict).
async fn inbound_tls(
    io: Rewind<TcpStream>,
    peer: SocketAddr,
    target: Target,
    mtls: MtlsMode,
    proxy: Arc<Proxy>,
    drain: Drain,
) {
    let credentials = proxy.identity.current();
    let accepted = tls::accept(
        io,
        credentials.as_deref().map(|c| &c.tls),
        proxy.timeouts.header,
        proxy.pool.mux,
    )
    .await;
    match accepted {
        Ok(tls::Accepted::Mesh {
            stream,
            peer: identity,
            carried,
        }) => {
            let protocol = match carried {
                Carried::Http1 => Protocol::Http1,
                Carried::Http2 | Carried::Mux => Protocol::Http2,
                Carried::Opaque => Protocol::Opaque,
            };
            // A multiplexed connection carries HTTP/1.x requests: it counts as the protocol the
            // applications speak, as the connection per request it replaces did.
            let label = match carried {
                Carried::Mux => "http1",
                _ => protocol_name(protocol),
            };
            let _open = proxy
                .metrics
                .connection_opened(Direction::Inbound, label, true);
            if protocol == Protocol::Opaque {
                // Opaque bytes skip the HTTP handler: authorize the connection here, and never
                // splice raw bytes to an HTTP port (they could carry a forged identity header).
                if let Err(why) = opaque_allowed(&proxy, Some(&identity)) {
                    proxy.metrics.connection_refused("forbidden");
                    tracing::info!(client = %peer, identity = %identity, reason = why, "refused an opaque mTLS connection");
                    return;
                }
            }
            let conn = ConnInfo::new(peer, Direction::Inbound, target, Some(identity), &proxy);
            match (protocol, carried) {
                (Protocol::Opaque, _) => opaque(stream, conn, &proxy).await,
                (_, Carried::Mux) => crate::http::mux::serve(stream, conn, proxy, drain).await,
                _ => crate::http::serve(stream, protocol, conn, proxy, drain).await,
            }
        }
        Ok(tls::Accepted::Foreign { .. }) if opaque_allowed(&proxy, None).is_err() => {
            proxy.metrics.connection_refused("not-mesh-tls");
            tracing::info!(client = %peer, "refused a TLS connection that is not from a meshed proxy: the service is HTTP or has an authorization policy");
        }
        Ok(tls::Accepted::Foreign { read, io }) if mtls == MtlsMode::Permissive => {
            let _open = proxy
                .metrics
                .connection_opened(Direction::Inbound, "tls", false);
            let conn = ConnInfo::new(peer, Direction::Inbound, target, None, &proxy);
            opaque(Rewind::new(read, io), conn, &proxy).await;
        }
        Ok(tls::Accepted::Foreign { .. }) => {
            proxy.metrics.connection_refused("not-mesh-tls");
            tracing::info!(client = %peer, "refused a TLS connection that is not from a meshed proxy (mtls: strict)");
        }
        Err(e) => {
            proxy.metrics.connection_refused("tls-handshake");
            tracing::info!(client = %peer, error = %e, "refused a TLS connection: the handshake failed");
        }
    }
}

/// Whether bytes the HTTP handler will not see may reach the application: only on a TCP
/// port, and only for callers the service's authorization policy (if any) allows.
fn opaque_allowed(proxy: &Proxy, identity: Option<&str>) -> Result<(), &'static str> {
    let snapshot = proxy.snapshot.load();
    let Some(service) = snapshot.local_service() else {
        return Ok(());
    };
    if service.protocol != PortProtocol::Tcp {
        return Err("the service's port is HTTP: only HTTP is accepted");
    }
    match &service.authorization {
        Some(policy) if !policy.allows(identity) => Err("not allowed by the service's policy"),
        _ => Ok(()),
    }
}

/// Strict mode: plaintext to the inbound port is refused; an HTTP/1 client is told why.
async fn refuse_plaintext(
    mut io: Rewind<TcpStream>,
    peer: SocketAddr,
    protocol: Protocol,
    proxy: &Proxy,
) {
    proxy.metrics.connection_refused("plaintext");
    tracing::info!(client = %peer, "refused a plaintext connection: this mesh requires mutual TLS (mtls: strict)");
    if protocol == Protocol::Http1 {
        let _ = io.write_all(&respond::plaintext_refusal()).await;
    }
    let _ = io.shutdown().await;
}

/// Opaque TCP: forwarded byte for byte; to a meshed endpoint, inside mutual TLS.
async fn opaque<IO>(client: IO, conn: ConnInfo, proxy: &Proxy)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let endpoint = match &conn.target {
        Target::App(addr) => proxy.registry.pinned(*addr, None),
        Target::OriginalDst(addr) => {
            let meshed = proxy.snapshot.load().meshed.get(addr).cloned();
            proxy.registry.pinned(*addr, meshed)
        }
        Target::Service(name) => {
            let snapshot = proxy.snapshot.load();
            let Some(service) = snapshot.service_named(name) else {
                tracing::info!(service = %name, "opaque connection for a service not in the config; closing");
                return;
            };
            match service.balancer.pick(None) {
                Ok(endpoint) => endpoint.clone(),
                Err(e) => {
                    tracing::info!(service = %name, error = ?e, "no endpoint for an opaque connection; closing");
                    return;
                }
            }
        }
        Target::ByAuthority => return,
    };
    let credentials = match &endpoint.identity {
        Some(_) if proxy.mtls() != MtlsMode::Disabled => match proxy.identity.current() {
            Some(c) => Some(c),
            None => {
                tracing::info!(upstream = %endpoint.addr, "no workload certificate yet for a meshed endpoint; closing");
                return;
            }
        },
        _ => None,
    };
    let via = crate::upstream::endpoint::Via {
        pool: &proxy.pool,
        tls: credentials.as_deref(),
        breaker: None,
    };
    let server = match endpoint.connect(&via, Carried::Opaque, None).await {
        Ok(server) => server.into_inner(),
        Err(e) => {
            tracing::info!(error = %e, "opaque connection: cannot reach the upstream; closing");
            return;
        }
    };
    if let Err(e) = crate::conn::tcp::splice(client, server).await {
        tracing::debug!(upstream = %endpoint.addr, error = %e, "opaque connection ended with an error");
    }
}

/// Answers a connection refused during detection (when it spoke HTTP) and closes it.
async fn refuse(mut stream: TcpStream, error: DetectError, proxy: &Proxy) {
    let Some((reason, answer)) = respond::detect_refusal(&error) else {
        return;
    };
    proxy.metrics.connection_refused(reason);
    let _ = stream.write_all(&answer).await;
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
