//! `sidemesh-proxy`: the per-pod data plane.
//!
//! The data path (accept -> detect protocol -> TLS -> route -> authorize -> rate limit ->
//! retry/timeout -> balance -> connect) is built stage by stage; see `../shared/DESIGN.md`.

#![forbid(unsafe_code)]
