//! HTTP/1.x, written for a proxy that must be invisible: the request target, the method's
//! case, the reason phrase, interim (1xx) responses, trailers and the body's framing pass as
//! they were sent, and every request of a connection goes through one head parser with one
//! set of limits (`head.rs`). hyper serves HTTP/2; HTTP/1.x is ours because hyper's HTTP/1
//! normalises what a transparent proxy must keep (targets with `"` or `<`, bodies on GET,
//! undeclared trailers, 1xx responses).
//!
//! - `head`: request and response heads, trailers.
//! - `body`: framing, chunked decoding and encoding, client-body faults, the body channel.
//! - `server`: one client connection: pipelined requests, keep-alive, upgrades.
//! - `client`: one exchange on an upstream connection, and reuse.
//! - this file: the rules that decide framing, targets and hosts, shared by both sides.

pub mod body;
pub mod client;
pub mod head;
pub mod server;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

pub use body::{ClientBodyError, Framing};

use crate::proto::rewind::Rewind;

/// The request target exactly as the client sent it; the upstream gets these bytes.
#[derive(Debug, Clone)]
pub struct RawTarget(pub Bytes);

/// The request's body came chunked: an upstream gets it chunked too, even when it turns out
/// to be empty (in the request's extensions).
#[derive(Debug, Clone, Copy)]
pub struct Chunked;

/// An upstream's reason phrase, passed on when it is not the standard one.
#[derive(Debug, Clone)]
pub struct Reason(pub Bytes);

/// An interim (1xx) response on its way to the client.
#[derive(Debug)]
pub struct InterimResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

/// Where interim responses for this request go (in the request's extensions). Boxed: a
/// channel allocates a block of slots when it is made, and boxes keep that block small for
/// answers that are rare.
#[derive(Debug, Clone)]
pub struct Interim(pub mpsc::Sender<Box<InterimResponse>>);

/// Anything a connection can be.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// An upstream connection after `101 Switching Protocols` (or a `CONNECT` tunnel), with the
/// bytes the upstream already sent.
pub type Upgraded = Rewind<Box<dyn Io>>;

/// The upstream side of an upgrade, in the response's extensions.
#[derive(Clone)]
pub struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl std::fmt::Debug for OnUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnUpgrade")
    }
}

impl OnUpgrade {
    pub fn new(rx: oneshot::Receiver<Upgraded>) -> Self {
        Self(Arc::new(Mutex::new(Some(rx))))
    }

    pub async fn take(&self) -> Option<Upgraded> {
        let rx = self.0.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        rx.await.ok()
    }
}

/// Appends `name: value\r\n` for every field.
pub fn write_fields(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// `Content-Length`: every value (and every item of a list) must be the same number.
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut found = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for item in value.as_bytes().split(|&b| b == b',') {
            let item = item.trim_ascii();
            if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
                return Err("invalid Content-Length");
            }
            let n: u64 = std::str::from_utf8(item)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("invalid Content-Length")?;
            if found.is_some_and(|f| f != n) {
                return Err("conflicting Content-Length values");
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// `Transfer-Encoding`: `None` without one, `Some(true)` when chunked is the final coding.
fn chunked(headers: &HeaderMap) -> Result<Option<bool>, &'static str> {
    let mut last: Option<Vec<u8>> = None;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        for item in value.as_bytes().split(|&b| b == b',') {
            let item = item.trim_ascii();
            if item.is_empty() {
                return Err("empty transfer coding");
            }
            if last
                .as_deref()
                .is_some_and(|l| l.eq_ignore_ascii_case(b"chunked"))
            {
                return Err("chunked is not the final transfer coding");
            }
            last = Some(item.to_ascii_lowercase());
        }
    }
    Ok(last.map(|l| l == b"chunked"))
}

/// How a request's body is framed (RFC 9112 section 6.3). Anything two parsers could read
/// differently is refused: both `Transfer-Encoding` and `Content-Length`, a coding other
/// than chunked, or `Transfer-Encoding` in HTTP/1.0.
pub fn request_framing(version: Version, headers: &HeaderMap) -> Result<Framing, &'static str> {
    let length = content_length(headers)?;
    match chunked(headers)? {
        Some(_) if version == Version::HTTP_10 => Err("Transfer-Encoding in an HTTP/1.0 request"),
        Some(_) if length.is_some() => Err("both Transfer-Encoding and Content-Length"),
        Some(true) => Ok(Framing::Chunked),
        Some(false) => Err("a transfer coding other than chunked"),
        None => Ok(length.map_or(Framing::Empty, Framing::Length)),
    }
}

/// How a response's body is framed, given the request it answers.
pub fn response_framing(
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<Framing, &'static str> {
    if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || (method == Method::CONNECT && status.is_success())
    {
        return Ok(Framing::Empty);
    }
    match chunked(headers)? {
        Some(true) => Ok(Framing::Chunked),
        Some(false) => Ok(Framing::Close),
        None => Ok(content_length(headers)?.map_or(Framing::Close, Framing::Length)),
    }
}

/// The tokens of every `Connection` field, lowercase.
pub fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The form of a request target (RFC 9112 section 3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetForm {
    /// `/path?query`
    Origin,
    /// `http://authority/path`: the authority is where the request goes.
    Absolute { authority: String, path: String },
    /// `host:port`, CONNECT only.
    Authority,
    /// `*`, OPTIONS only.
    Asterisk,
}

/// Classifies a target; the forms a method cannot have, a fragment, and userinfo are refused.
pub fn target_form(method: &Method, target: &[u8]) -> Result<TargetForm, &'static str> {
    if target.contains(&b'#') {
        return Err("a fragment in the request target");
    }
    if method == Method::CONNECT {
        let authority = std::str::from_utf8(target).map_err(|_| "invalid CONNECT target")?;
        return match valid_authority(authority, true) {
            Ok(()) => Ok(TargetForm::Authority),
            Err(_) => Err("a CONNECT target must be host:port"),
        };
    }
    if target == b"*" {
        return if method == Method::OPTIONS {
            Ok(TargetForm::Asterisk)
        } else {
            Err("`*` is only a target for OPTIONS")
        };
    }
    if target.first() == Some(&b'/') {
        return Ok(TargetForm::Origin);
    }
    let text = std::str::from_utf8(target).map_err(|_| "invalid request target")?;
    let rest = strip_scheme(text).ok_or("the request target is not a path or an absolute URI")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.contains('@') {
        return Err("userinfo in the request target");
    }
    valid_authority(authority, false).map_err(|_| "invalid authority in the request target")?;
    let path = if path.is_empty() || path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    Ok(TargetForm::Absolute {
        authority: authority.to_string(),
        path,
    })
}

fn strip_scheme(target: &str) -> Option<&str> {
    for scheme in ["http://", "https://"] {
        if target.len() > scheme.len() && target[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return Some(&target[scheme.len()..]);
        }
    }
    None
}

/// `uri-host [":" port]` (RFC 9112 section 3.2): a registered name or an IP literal, no
/// userinfo, no path; `port_required` for CONNECT.
pub fn valid_authority(authority: &str, port_required: bool) -> Result<(), &'static str> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (literal, after) = rest.split_once(']').ok_or("unclosed IP literal")?;
        if literal.is_empty()
            || !literal
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err("invalid IP literal");
        }
        match after.strip_prefix(':') {
            Some(port) => ("ip", Some(port)),
            None if after.is_empty() => ("ip", None),
            None => return Err("junk after an IP literal"),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("empty host");
    }
    let reg_name = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b);
    if !host.bytes().all(reg_name) {
        return Err("invalid character in the host");
    }
    match port {
        Some(p) if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) => {
            Err("invalid port")
        }
        None if port_required => Err("no port"),
        _ => Ok(()),
    }
}

/// A `Uri` for routing and for the request stages, from any target: characters `http::Uri`
/// does not hold (`"`, `<`, `>`, `{`, ...) are percent-encoded in this copy only; the
/// upstream gets the raw target.
pub fn routing_uri(target: &str) -> http::Uri {
    if let Ok(uri) = target.parse() {
        return uri;
    }
    let mut encoded = String::with_capacity(target.len() + 16);
    for b in target.bytes() {
        let plain = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b);
        if plain {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    encoded
        .parse()
        .unwrap_or_else(|_| http::Uri::from_static("/"))
}

/// The standard reason phrase, or the upstream's own.
pub fn reason_phrase(status: StatusCode, reason: Option<&Reason>) -> &[u8] {
    match reason {
        Some(r) => &r.0,
        None => status.canonical_reason().unwrap_or("").as_bytes(),
    }
}

/// A header value from a string the proxy made.
pub fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(fields: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in fields {
            m.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        m
    }

    #[test]
    fn framing_refuses_every_ambiguity() {
        let v11 = Version::HTTP_11;
        assert_eq!(request_framing(v11, &h(&[])), Ok(Framing::Empty));
        assert_eq!(
            request_framing(v11, &h(&[("content-length", "5")])),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            request_framing(
                v11,
                &h(&[("content-length", "5"), ("content-length", "5, 5")])
            ),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            request_framing(v11, &h(&[("transfer-encoding", "Chunked")])),
            Ok(Framing::Chunked)
        );
        for bad in [
            &[("content-length", "5"), ("content-length", "6")][..],
            &[("content-length", "+5")],
            &[("content-length", "0x5")],
            &[("content-length", "")],
            &[("transfer-encoding", "chunked"), ("content-length", "5")],
            &[("transfer-encoding", "gzip")],
            &[("transfer-encoding", "chunked, gzip")],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
        ] {
            assert!(request_framing(v11, &h(bad)).is_err(), "{bad:?}");
        }
        assert!(
            request_framing(Version::HTTP_10, &h(&[("transfer-encoding", "chunked")])).is_err()
        );
        assert_eq!(
            response_framing(
                &Method::HEAD,
                StatusCode::OK,
                &h(&[("content-length", "9")])
            ),
            Ok(Framing::Empty)
        );
        assert_eq!(
            response_framing(&Method::GET, StatusCode::OK, &h(&[])),
            Ok(Framing::Close)
        );
    }

    #[test]
    fn targets_are_classified_and_odd_ones_refused() {
        let get = Method::GET;
        assert_eq!(target_form(&get, b"/a?b"), Ok(TargetForm::Origin));
        assert_eq!(
            target_form(&get, b"http://users:80?x"),
            Ok(TargetForm::Absolute {
                authority: "users:80".into(),
                path: "/?x".into()
            })
        );
        assert_eq!(
            target_form(&Method::CONNECT, b"db:5432"),
            Ok(TargetForm::Authority)
        );
        assert_eq!(
            target_form(&Method::OPTIONS, b"*"),
            Ok(TargetForm::Asterisk)
        );
        for bad in [
            &b"nopath"[..],
            b"evil:80",
            b"*",
            b"http://a@b/",
            b"/a#f",
            b"http:///x",
        ] {
            assert!(
                target_form(&get, bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(target_form(&Method::CONNECT, b"/").is_err());
        assert!(target_form(&Method::CONNECT, b"host").is_err());
    }

    #[test]
    fn authorities_are_host_and_port_only() {
        for good in ["users", "users:8080", "[::1]:80", "10.0.0.1", "a.b-c_d"] {
            assert!(valid_authority(good, false).is_ok(), "{good}");
        }
        for bad in [
            "",
            "backend@evil",
            "a b",
            "a/b",
            "a:",
            "a:x",
            "[zz]",
            ":80",
            "a:123456",
        ] {
            assert!(valid_authority(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn routing_uris_hold_any_target() {
        assert_eq!(routing_uri("/a?q={\"x\":<1>}").path(), "/a");
        assert_eq!(
            routing_uri("/a?q={\"x\":<1>}").query(),
            Some("q=%7B%22x%22:%3C1%3E%7D")
        );
    }
}
