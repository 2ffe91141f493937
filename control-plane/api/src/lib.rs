//! `sidemesh-api`: the wire contract between the control plane and the proxies
//! (`proto/sidemesh.proto`), as generated tonic/prost code.
//!
//! - `v1`: messages (`Hello`, `Snapshot`, `Ack`, `Nack`) and the `Discovery` client and server.

#![forbid(unsafe_code)]

/// Generated code for package `sidemesh.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_debug_implementations)]
    tonic::include_proto!("sidemesh.v1");
}
