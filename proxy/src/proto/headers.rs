//! Header hygiene between hops: connection-specific headers are not forwarded, the caller's
//! address is added inbound, and the request target is rewritten for the upstream's HTTP
//! version while Host / `:authority` stay what the client sent.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Uri, Version};

/// Headers that describe one connection, not the message (RFC 9110 section 7.6.1).
/// `Trailer` is not among them: it describes the message's trailers and is forwarded.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    HeaderName::from_static("http2-settings"),
];

/// Fields a `Connection` header may not remove: the ones that say where a message goes and
/// how long it is. Removing them on a client's word would let it change what the upstream
/// sees after routing and framing were decided.
const PROTECTED: [HeaderName; 2] = [header::HOST, header::CONTENT_LENGTH];

/// Whether the request asks to switch protocols (after `strip_hop_by_hop`: WebSocket only).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Whether an `Upgrade` offer names WebSocket, the one upgrade the proxy lets through: its
/// frames carry no further HTTP requests, so nothing on the connection escapes routing,
/// identity and limits. Every other offer (`h2c` above all, which would carry requests the
/// proxy never sees) is removed, and the request goes on as a plain one, as it would to a
/// server that does not speak the offered protocol.
fn websocket_offer(headers: &HeaderMap) -> bool {
    headers.get_all(header::UPGRADE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',').any(|t| {
                let t = t.trim();
                t.eq_ignore_ascii_case("websocket")
                    || t.to_ascii_lowercase().starts_with("websocket/")
            })
        })
    })
}

/// The fields `strip_hop_by_hop` looks at, found in one pass over a head's names (most heads
/// have none of them, so nothing is looked up by name at all).
#[derive(Default)]
struct Found {
    connection: bool,
    hop_by_hop: bool,
    te: bool,
    upgrade: bool,
}

fn found(headers: &HeaderMap) -> Found {
    let mut found = Found::default();
    for name in headers.keys() {
        if name == header::CONNECTION {
            found.connection = true;
        } else if name == header::TE {
            found.te = true;
        } else if name == header::UPGRADE {
            found.upgrade = true;
        } else if HOP_BY_HOP.contains(name) {
            found.hop_by_hop = true;
        }
    }
    found
}

/// Removes hop-by-hop headers, and those the `Connection` header names (but never Host or
/// Content-Length). `TE: trailers` is kept (gRPC needs it); a WebSocket upgrade keeps
/// `Connection: upgrade` and `Upgrade: websocket`; other upgrade offers are dropped.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let found = found(headers);
    let upgrade =
        found.upgrade && found.connection && is_upgrade(headers) && websocket_offer(headers);
    if found.connection {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(PROTECTED.contains(n) || (upgrade && n == header::UPGRADE)))
            .collect();
        for name in &named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    if found.hop_by_hop {
        for name in &HOP_BY_HOP[1..] {
            headers.remove(name);
        }
    }
    if found.te
        && let Some(te) = headers.get(header::TE)
        && te.as_bytes() != b"trailers"
    {
        let trailers = te.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
        headers.remove(header::TE);
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let only_websocket = headers.get_all(header::UPGRADE).iter().count() == 1
            && headers
                .get(header::UPGRADE)
                .is_some_and(|v| !v.as_bytes().contains(&b','));
        if !only_websocket {
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
    } else if found.upgrade {
        headers.remove(header::UPGRADE);
    }
}

/// Appends the client's address to `x-forwarded-for`.
pub fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    let value = match headers.get(&XFF).and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing}, {client}"),
        None => client.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(XFF, v);
    }
}

/// The authority the client addressed: the URI's (HTTP/2, absolute-form) or the Host header.
pub fn authority(parts: &Parts) -> Option<&str> {
    parts.uri.authority().map(|a| a.as_str()).or_else(|| {
        parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

/// `host` in lowercase, copied only when it has uppercase letters (hosts are case-insensitive;
/// config keys are lowercase).
pub fn lowercase(host: &str) -> std::borrow::Cow<'_, str> {
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

/// The host part of an authority, without port, lowercase comparison left to the caller.
pub fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority.rsplit_once(':').map_or(authority, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            authority
        }
    })
}

/// Rewrites the request for an upstream speaking `version`: origin-form URI plus Host for
/// HTTP/1.1, absolute URI (which becomes `:authority`) for HTTP/2.
pub fn for_upstream(parts: &mut Parts, version: Version) {
    use http::uri::{Authority, PathAndQuery, Scheme};
    parts.version = version;
    // The URI's pieces are moved, not copied: each is a shared buffer already.
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    match version {
        Version::HTTP_2 => {
            if uri.authority.is_none() {
                uri.authority = parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| Authority::try_from(h.as_bytes()).ok());
            }
            if uri.authority.is_some() {
                uri.scheme = Some(Scheme::HTTP);
            }
            parts.headers.remove(header::HOST);
        }
        _ => {
            if let Some(a) = &uri.authority
                && !parts.headers.contains_key(header::HOST)
                && let Ok(v) = HeaderValue::from_str(a.as_str())
            {
                parts.headers.insert(header::HOST, v);
            }
            uri.scheme = None;
            uri.authority = None;
        }
    }
    parts.uri = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped_but_te_trailers_and_upgrades_survive() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-app"]);
        assert_eq!(h[header::TE], "trailers");

        let mut ws = HeaderMap::new();
        ws.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        ws.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut ws);
        assert_eq!(ws[header::CONNECTION], "upgrade");
        assert_eq!(ws[header::UPGRADE], "websocket");
    }

    #[test]
    fn only_websocket_upgrades_survive_and_connection_cannot_remove_host() {
        let mut h2c = HeaderMap::new();
        h2c.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, HTTP2-Settings"),
        );
        h2c.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h2c.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAAQCAAAAAAIAAAAA"),
        );
        strip_hop_by_hop(&mut h2c);
        assert!(h2c.is_empty(), "{h2c:?}");
        assert!(!is_upgrade(&h2c));

        let mut mixed = HeaderMap::new();
        mixed.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        mixed.insert(header::UPGRADE, HeaderValue::from_static("h2c, websocket"));
        strip_hop_by_hop(&mut mixed);
        assert_eq!(mixed[header::UPGRADE], "websocket");

        let mut named = HeaderMap::new();
        named.insert(
            header::CONNECTION,
            HeaderValue::from_static("host, content-length, trailer"),
        );
        named.insert(header::HOST, HeaderValue::from_static("users"));
        named.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        named.insert(header::TRAILER, HeaderValue::from_static("x-sum"));
        strip_hop_by_hop(&mut named);
        assert_eq!(named[header::HOST], "users");
        assert_eq!(named[header::CONTENT_LENGTH], "3");
        assert!(
            !named.contains_key(header::TRAILER),
            "named by Connection, so removed"
        );
        let mut declared = HeaderMap::new();
        declared.insert(header::TRAILER, HeaderValue::from_static("x-sum"));
        strip_hop_by_hop(&mut declared);
        assert_eq!(declared[header::TRAILER], "x-sum");
    }

    #[test]
    fn te_trailers_alone_is_kept_and_other_te_values_go() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h[header::TE], "trailers");
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key(header::TE));
    }

    #[test]
    fn hosts_are_lowercased_only_when_needed() {
        assert!(matches!(
            lowercase("user-service"),
            std::borrow::Cow::Borrowed("user-service")
        ));
        assert_eq!(lowercase("User-Service.Demo"), "user-service.demo");
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1".parse().expect("ip"));
        append_forwarded_for(&mut h, "10.0.0.2".parse().expect("ip"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2");
    }

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(host_of("user-service:8080"), "user-service");
        assert_eq!(host_of("user-service"), "user-service");
        assert_eq!(host_of("[::1]:80"), "::1");
    }
}
