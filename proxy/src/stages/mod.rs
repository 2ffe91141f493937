//! The request stages that decide before any upstream work: authorize, rate limit, adaptive
//! concurrency, timeout, retry. Each is a plain function over the state it needs; `pipeline.rs` calls them in order.

pub mod authorize;
pub mod concurrency;
pub mod ratelimit;
pub mod retry;
pub mod timeout;
