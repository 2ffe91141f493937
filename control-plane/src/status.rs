//! `sidemesh status`: every proxy, the config version and its files, the last refused config
//! with its line and column, and how long the last push took to converge.

use std::fmt::Write;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::admin::Status;

/// Fetches `/status` from a control plane's admin address.
pub async fn fetch(admin_url: &str) -> anyhow::Result<Status> {
    let url = format!("{}/status", admin_url.trim_end_matches('/'));
    let uri: http::Uri = url
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid control-plane address `{admin_url}`: {e}"))?;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let resp = client
        .get(uri)
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the control plane at {admin_url}: {e}"))?;
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// The table `sidemesh status` prints.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    match &status.config {
        Some(c) => {
            let _ = writeln!(
                out,
                "config      version {} (hash {}, revision {})",
                c.version, c.hash, status.revision
            );
            let _ = writeln!(out, "files       {}", c.files.join(", "));
        }
        None => {
            let _ = writeln!(out, "config      none in force yet");
        }
    }
    if let Some(e) = &status.config_error {
        let _ = writeln!(
            out,
            "REFUSED     the last change was not pushed ({} error{}):",
            e.errors.len(),
            if e.errors.len() == 1 { "" } else { "s" }
        );
        for line in &e.errors {
            let _ = writeln!(out, "              {line}");
        }
    }
    match &status.last_convergence {
        Some(c) => {
            let _ = writeln!(
                out,
                "last push   converged in {:.1} ms (revision {})",
                c.millis, c.revision
            );
        }
        None => {
            let _ = writeln!(out, "last push   none since start");
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<24} {:<22} {:<22} {:<10} {:>8}  {:<8} LAST NACK",
        "PROXY", "SERVICE", "ADDRESS", "CONNECTED", "APPLIED", "STATE"
    );
    for p in &status.proxies {
        let state = match (p.connected, p.synced, p.ready) {
            (false, _, _) => "gone",
            (true, false, _) => "pushing",
            (true, true, false) => "notready",
            (true, true, true) => "synced",
        };
        let nack = p.last_nack.as_ref().map_or_else(
            || "-".to_string(),
            |n| format!("v{}: {}", n.version, n.error),
        );
        let _ = writeln!(
            out,
            "{:<24} {:<22} {:<22} {:<10} {:>8}  {:<8} {}",
            p.id,
            format!("{}.{}", p.service, p.namespace),
            p.address.as_deref().unwrap_or("-"),
            if p.connected {
                duration(p.connected_for_secs)
            } else {
                "no".into()
            },
            p.applied_version,
            state,
            nack
        );
    }
    if status.proxies.is_empty() {
        let _ = writeln!(out, "(no proxies connected)");
    }
    out
}
