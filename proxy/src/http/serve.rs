//! Serving one client connection: the HTTP/1 server of `proto::h1`, or hyper's HTTP/2 server
//! with the same head limits the HTTP/1 parser applies.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::ConnInfo;
use super::handler::handle;
use crate::drain::Drain;
use crate::proto::body;
use crate::proto::detect::Protocol;
use crate::proto::headers;
use crate::respond::{self, ProxyError};
use crate::state::Proxy;

pub async fn serve<I>(
    io: I,
    protocol: Protocol,
    conn: ConnInfo,
    proxy: Arc<Proxy>,
    mut drain: Drain,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(conn);
    match protocol {
        Protocol::Http2 => {
            let service = {
                let proxy = proxy.clone();
                service_fn(move |req: Request<Incoming>| {
                    let (proxy, conn) = (proxy.clone(), conn.clone());
                    async move {
                        Ok::<_, Infallible>(handle(proxy, conn, req.map(body::incoming)).await)
                    }
                })
            };
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                // The application's own `date` (or none) reaches the client, as without a
                // proxy; gRPC trailers-only answers get no `date` field in their metadata.
                .auto_date_header(false)
                .max_concurrent_streams(proxy.limits.max_concurrent_streams)
                // hyper's own refusal is a backstop beyond the proxy's limit, which the
                // handler applies with the marked 431 every other request gets.
                .max_header_list_size(
                    u32::try_from(h2_header_list_ceiling(&proxy.limits)).unwrap_or(u32::MAX),
                );
            let connection = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = drain.signaled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        }
        _ => {
            let cfg = crate::proto::h1::server::Config {
                limits: crate::proto::h1::head::HeadLimits {
                    max_bytes: proxy.limits.max_header_bytes,
                    max_headers: proxy.limits.max_headers,
                },
                header_timeout: proxy.timeouts.header,
                keepalive_timeout: proxy.timeouts.keepalive,
                body_timeout: proxy.timeouts.body,
            };
            crate::proto::h1::server::serve(
                io,
                cfg,
                drain,
                |req| handle(proxy.clone(), conn.clone(), req),
                |refusal| {
                    let (reason, answer) = respond::head_refusal(refusal);
                    proxy.metrics.connection_refused(reason);
                    answer
                },
            )
            .await;
        }
    }
}

/// hyper's HTTP/2 header-list bound: well above the proxy's own limit (which counts the
/// same way, RFC 9113 section 6.5.2), so the proxy's marked 431 is what clients see.
fn h2_header_list_ceiling(limits: &crate::config::Limits) -> usize {
    (limits.max_header_bytes + 32 * limits.max_headers).saturating_mul(2)
}

/// The checks every HTTP/2 request gets that the HTTP/1 parser applies to HTTP/1 heads:
/// the same size and count limits, and one authority (`:authority` and `Host` must agree).
pub(super) fn admit_h2(proxy: &Proxy, parts: &http::request::Parts) -> Result<(), ProxyError> {
    if parts.version != http::Version::HTTP_2 {
        return Ok(());
    }
    let limits = &proxy.limits;
    if parts.headers.len() > limits.max_headers {
        return Err(ProxyError::HeadersTooLarge {
            why: format!("more than {} header fields", limits.max_headers),
        });
    }
    let bytes: usize = parts
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum::<usize>()
        + parts.uri.authority().map_or(0, |a| a.as_str().len())
        + parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
    if bytes > limits.max_header_bytes + 32 * limits.max_headers {
        return Err(ProxyError::HeadersTooLarge {
            why: format!("request head larger than {} bytes", limits.max_header_bytes),
        });
    }
    let hosts = parts.headers.get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err(ProxyError::BadRequest {
            why: "more than one Host header".into(),
        });
    }
    if let (Some(authority), Some(host)) = (parts.uri.authority(), parts.headers.get(header::HOST))
    {
        if !host
            .as_bytes()
            .eq_ignore_ascii_case(authority.as_str().as_bytes())
        {
            return Err(ProxyError::BadRequest {
                why: "`:authority` and `Host` name different hosts".into(),
            });
        }
    }
    if let Some(authority) = headers::authority(parts) {
        crate::proto::h1::valid_authority(authority, false).map_err(|why| {
            ProxyError::BadRequest {
                why: format!("invalid authority: {why}"),
            }
        })?;
    }
    Ok(())
}
