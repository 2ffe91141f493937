//! Trace context on the wire: W3C `traceparent`/`tracestate` read first, then B3 (single or
//! multi header); what goes upstream carries this proxy's span in W3C form, and a caller's B3
//! headers are rewritten to the same span.

use http::HeaderMap;
use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// Writes `cx` as `traceparent` (and `tracestate` only when it has entries). A caller's B3
/// headers are rewritten to the same span, so an application that reads either format sees
/// one parent, not two that disagree.
pub(super) fn inject(cx: &Context, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
    if headers.get("tracestate").is_some_and(|v| v.is_empty()) {
        headers.remove("tracestate");
    }
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return;
    }
    let (trace, span) = (sc.trace_id().to_string(), sc.span_id().to_string());
    let sampled = if sc.is_sampled() { "1" } else { "0" };
    let set = |headers: &mut HeaderMap, name: &'static str, value: String| {
        if let Ok(v) = http::HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    if headers.contains_key("b3") {
        set(headers, "b3", format!("{trace}-{span}-{sampled}"));
    }
    if headers.contains_key("x-b3-traceid") || headers.contains_key("x-b3-spanid") {
        set(headers, "x-b3-traceid", trace);
        set(headers, "x-b3-spanid", span);
        set(headers, "x-b3-sampled", sampled.to_string());
        headers.remove("x-b3-parentspanid");
        headers.remove("x-b3-flags");
    }
}

/// The caller's trace: W3C first, then B3 (single header, then multi header).
pub fn extract(headers: &HeaderMap) -> Context {
    if headers.contains_key("traceparent") {
        return TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    }
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let b3 = match text("b3") {
        Some(single) => parse_b3_single(single),
        None => parse_b3_multi(
            text("x-b3-traceid"),
            text("x-b3-spanid"),
            text("x-b3-sampled"),
            text("x-b3-flags"),
        ),
    };
    match b3 {
        Some(sc) => Context::new().with_remote_span_context(sc),
        None => Context::new(),
    }
}

/// `{trace}-{span}[-{sampled}[-{parent}]]`; a 64-bit trace id is left-padded.
fn parse_b3_single(value: &str) -> Option<SpanContext> {
    let mut parts = value.split('-');
    let trace = parts.next()?;
    let span = parts.next()?;
    let sampled = parts.next();
    b3_context(trace, span, sampled, None)
}

fn parse_b3_multi(
    trace: Option<&str>,
    span: Option<&str>,
    sampled: Option<&str>,
    flags: Option<&str>,
) -> Option<SpanContext> {
    b3_context(trace?, span?, sampled, flags)
}

fn b3_context(
    trace: &str,
    span: &str,
    sampled: Option<&str>,
    flags: Option<&str>,
) -> Option<SpanContext> {
    if !(trace.len() == 16 || trace.len() == 32) || span.len() != 16 {
        return None;
    }
    let trace_id = TraceId::from_hex(&format!("{trace:0>32}")).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    // `d` (debug) and `1` sample; `0` does not; absent defers (we sample: the ratio applies
    // only to traces that start here).
    let sampled = flags == Some("1") || !matches!(sampled, Some("0") | Some("false"));
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    Some(SpanContext::new(
        trace_id,
        span_id,
        flags,
        true,
        TraceState::default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_context_rewrites_b3_to_the_same_span_and_adds_no_empty_tracestate() {
        let mut incoming = HeaderMap::new();
        incoming.insert(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"
                .parse()
                .expect("value"),
        );
        incoming.insert(
            "x-b3-traceid",
            "80f198ee56343ba864fe8b2a57d3eff7".parse().expect("value"),
        );
        incoming.insert("x-b3-spanid", "e457b5a2e4d86bd1".parse().expect("value"));
        incoming.insert(
            "x-b3-parentspanid",
            "05e3ac9a4f6e3b90".parse().expect("value"),
        );
        // The proxy's own span: same trace, a new span id.
        let ours = SpanContext::new(
            TraceId::from_hex("80f198ee56343ba864fe8b2a57d3eff7").expect("hex"),
            SpanId::from_hex("1111111111111111").expect("hex"),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let cx = Context::new().with_remote_span_context(ours);
        let mut h = incoming.clone();
        inject(&cx, &mut h);
        assert_eq!(
            h["traceparent"],
            "00-80f198ee56343ba864fe8b2a57d3eff7-1111111111111111-01"
        );
        assert!(!h.contains_key("tracestate"), "{h:?}");
        assert_eq!(
            h["b3"],
            "80f198ee56343ba864fe8b2a57d3eff7-1111111111111111-1"
        );
        assert_eq!(h["x-b3-spanid"], "1111111111111111");
        assert_eq!(h["x-b3-sampled"], "1");
        assert!(!h.contains_key("x-b3-parentspanid"));
    }

    #[test]
    fn b3_single_and_multi_headers_continue_the_trace() {
        let mut h = HeaderMap::new();
        h.insert(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90"
                .parse()
                .expect("value"),
        );
        let cx = extract(&h);
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        assert_eq!(sc.span_id().to_string(), "e457b5a2e4d86bd1");
        assert!(sc.is_sampled() && sc.is_remote());

        let mut h = HeaderMap::new();
        h.insert("x-b3-traceid", "64fe8b2a57d3eff7".parse().expect("value"));
        h.insert("x-b3-spanid", "05e3ac9a4f6e3b90".parse().expect("value"));
        h.insert("x-b3-sampled", "0".parse().expect("value"));
        let sc = extract(&h).span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "000000000000000064fe8b2a57d3eff7"
        );
        assert!(!sc.is_sampled());

        // W3C wins when both are present.
        h.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .expect("value"),
        );
        let sc = extract(&h).span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );

        let mut h = HeaderMap::new();
        h.insert("b3", "not-a-trace".parse().expect("value"));
        assert!(!extract(&h).span().span_context().is_valid());
    }
}
