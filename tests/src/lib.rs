//! `sidemesh-tests`: shared harness for the end-to-end tests in `tests/tests/`.
//!
//! - `bin`: builds (once) and locates the workspace's real binaries.
//! - `Proc`: a running binary on port 0; its address is read from its `listening` log line;
//!   killed on drop so a failing test leaves nothing behind.
//! - `http`: a small HTTP/1.1 client returning status, headers and body.
//! - `eventually`: bounded polling with a clear failure message (never sleep and hope).
//! - `servers`: real servers to put behind the proxy (HTTP, WebSocket, TCP, gRPC echo).
//! - `TestProxy`: the real proxy in-process on port 0, with a rewritable routing YAML.
//! - `kube_api`: a local Kubernetes API server (EndpointSlice list and watch, TokenReview).
//! - `netns`: network namespaces (pods simulated as namespaces; root only).
//! - `mesh`: the real control plane and proxies in control-plane mode, with mTLS.
//! - `pki`: CAs and certificates made in tests (roots, intermediates, leaves, servers).
//! - `Rotel`: a real OpenTelemetry collector (`rotel` from PyPI) and the spans it received.
//! - `skip`: skipping with a printed reason, turned into a failure when `SIDEMESH_NO_SKIP=1` (CI).

#![forbid(unsafe_code)]

mod harness;
pub mod kube_api;
pub mod mesh;
pub mod netns;
pub mod pki;
mod proxy;
mod rotel;
pub mod servers;
pub mod wire;

pub use harness::{
    Proc, Response, bin, eventually, http, kubernetes_validate, skip, workspace_root,
};
pub use proxy::TestProxy;
pub use rotel::{Rotel, SeenSpan};
