//! `sidemesh-control-plane`: the control plane and the `sidemesh` operator CLI.
//!
//! - `cli`: the `sidemesh` subcommands (`validate`, `schema`, `status`, `up`).
//! - `server`: the control-plane process (gRPC for proxies, admin HTTP).
//! - `store`: watches, validates and versions the routing YAML.
//! - `registry`: connected proxies, their ACKs and NACKs, their endpoints.
//! - `view`: each proxy's slice of the mesh, as YAML.
//! - `hub`: revisions (config + endpoints) that proxy streams watch.
//! - `discovery`: the gRPC stream with each proxy.
//! - `ca`: the certificate authority (generated root or mounted files).
//! - `serving`: the control plane's own TLS certificate (proxies' API, webhook), renewed.
//! - `identity`: the gRPC identity service: credential check, then a signed certificate.
//! - `inject`: `sidemesh inject`, the proxy added to pod templates (also the webhook's patch).
//! - `install`: `sidemesh install` / `uninstall`, the control plane as one manifest.
//! - `k8syaml`: manifests read and written as Kubernetes reads them (YAML 1.1 scalars).
//! - `webhook`: the mutating admission webhook (AdmissionReview v1, JSONPatch, TLS).
//! - `status`: `sidemesh status`.
//! - `stat`: `sidemesh stat`, live per-service traffic from the proxies' metrics.
//! - `admin`, `metrics`: `/status`, `/metrics`, `/debug/config`.
//! - `up`: `sidemesh up`, the demo on one machine.
//! - `traces`: the span file `sidemesh up` keeps without a collector, and `sidemesh traces`.
//! - `summary`: one-line descriptions of a validated mesh for operators.
//! - `endpointslices`: service discovery from Kubernetes EndpointSlices (`kubernetes` feature).
//! - `tokenreview`: Kubernetes service-account tokens, checked by the API server (`kubernetes` feature).

#![forbid(unsafe_code)]

pub mod admin;
pub mod ca;
pub mod cli;
pub mod discovery;
#[cfg(feature = "kubernetes")]
pub mod endpointslices;
pub mod hub;
pub mod identity;
pub mod inject;
pub mod install;
pub mod k8syaml;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod serving;
pub mod stat;
pub mod status;
pub mod store;
pub mod summary;
#[cfg(feature = "kubernetes")]
pub mod tokenreview;
pub mod traces;
pub mod up;
pub mod view;
pub mod webhook;
