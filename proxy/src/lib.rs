//! `sidemesh-proxy`: the per-pod data plane.
//!
//! A request crosses the modules in this order; [`pipeline`] lists the per-request stages with
//! the reason for each.
//!
//! | Module | What it does |
//! |---|---|
//! | [`conn`] | listeners, the connection cap, original destination, TLS termination of meshed callers, opaque TCP |
//! | [`proto`] | the wire: protocol detection, the HTTP/1.x codec, bodies, header hygiene |
//! | [`http`] | serving an HTTP/1.x or HTTP/2 connection; the per-request handler (route, authorize, span) |
//! | [`routing`] | the compiled config snapshot, route matching, the chosen destination |
//! | [`pipeline`] | the stages in order: rate limit, deadline, retries, one attempt |
//! | [`stages`] | authorize, rate limit, timeout, retry: plain functions |
//! | [`upstream`] | balancing, endpoints and their outlier state, pools, connect with mTLS, send |
//! | [`respond`] | every error the proxy answers itself, turned into a response in one place |
//!
//! Beside the path: [`state`] (the shared [`state::Proxy`], a leaf the others read),
//! [`identity`] (the workload certificate, mTLS, the control-plane channel), [`source`]
//! (config from a file or the control plane), [`telemetry`] (metrics, spans, OTLP export),
//! [`admin`] (health, metrics, `/config_dump`), [`config`] (flags and environment),
//! [`drain`] (graceful shutdown), [`keep`] (limits and counts kept across config changes),
//! [`app`] (build and run), [`init`] (a pod's iptables rules).
//!
//! **Layering.** Modules only use the ones below them in this order, which
//! `tests/layers.rs` checks from the source: keep, drain, proto, respond, telemetry, identity,
//! upstream, stages, routing, config, state, pipeline, http, conn, source, admin, app, init.
//!
//! **Stages are plain async functions, not tower layers.** The request path is fixed and
//! short; plain functions over one typed context ([`pipeline::Ctx`]) cost no boxed future and
//! no per-request service stack, let the compiler inline across stages, and read top to
//! bottom in one file. Per-route state (limiters, retry budgets, balancers) is built once per
//! config snapshot, not per request. The profile (`bench/run.sh --only profile`, in
//! BENCHMARKS.md) decided the rest: what a request costs is mostly allocation, copies of
//! large futures and header-map work, so one future is boxed per request (the handler's, which
//! idle connections would otherwise hold), the rare paths (connects, retries) are boxed so the
//! common one stays small, and a whole request with an answer already read runs in the
//! caller's task (`proto::h1::client`).

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod conn;
pub mod drain;
pub mod http;
pub mod identity;
pub mod init;
pub mod keep;
pub mod pipeline;
pub mod proto;
pub mod respond;
pub mod routing;
pub mod source;
pub mod stages;
pub mod state;
pub mod telemetry;
pub mod upstream;
