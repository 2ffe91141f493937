//! The wire, below any policy: protocol detection, the HTTP/1.x codec, body types, header hygiene, and a
//! stream that replays the bytes protocol detection read.

pub mod body;
pub mod detect;
pub mod h1;
pub mod headers;
pub mod rewind;
