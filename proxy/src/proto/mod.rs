//! The wire, below any policy: protocol detection, the HTTP/1.x codec, HTTP/1.x carried over
//! HTTP/2 between proxies (`mux`), body types, header hygiene, and a stream that replays the
//! bytes protocol detection read.

pub mod body;
pub mod detect;
pub mod h1;
pub mod headers;
pub mod mux;
pub mod rewind;
