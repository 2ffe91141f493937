//! Control-plane mode: the proxy keeps one gRPC stream to the control plane, applies each
//! snapshot atomically and answers ACK or NACK, keeps its last good snapshot on disk, and
//! keeps serving whatever happens to the stream; it reconnects with jittered backoff.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sidemesh_api::v1::control_message::Kind as ControlKind;
use sidemesh_api::v1::discovery_client::DiscoveryClient;
use sidemesh_api::v1::proxy_message::Kind as ProxyKind;
use sidemesh_api::v1::{self, ProxyMessage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::drain::Drain;
use crate::routing::snapshot::Snapshot;
use crate::state::Proxy;

const SNAPSHOT_FILE: &str = "last-snapshot.json";

/// Who this proxy is, for its Hello.
#[derive(Debug, Clone)]
pub struct Identity {
    pub control_plane: crate::identity::channel::ControlPlane,
    pub proxy_id: String,
    pub service: String,
    pub namespace: String,
    pub address: Option<std::net::SocketAddr>,
    /// The admin server's address as others reach it.
    pub admin: Option<std::net::SocketAddr>,
    pub upstreams: Vec<String>,
    pub state_dir: Option<PathBuf>,
}

/// What is kept on disk between restarts.
#[derive(Debug, Serialize, Deserialize)]
pub struct Stored {
    pub version: u64,
    pub hash: String,
    pub mesh_yaml: String,
    /// Meshed endpoints: address and the SPIFFE ID its proxy must present.
    #[serde(default)]
    pub meshed: Vec<(std::net::SocketAddr, String)>,
}

/// The meshed endpoints of a pushed snapshot.
fn meshed(snapshot: &v1::Snapshot) -> Vec<(std::net::SocketAddr, String)> {
    snapshot
        .endpoints
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| !e.identity.is_empty())
        .filter_map(|e| Some((e.address.parse().ok()?, e.identity.clone())))
        .collect()
}

fn meshed_map(list: &[(std::net::SocketAddr, String)]) -> crate::routing::snapshot::Meshed {
    list.iter()
        .map(|(addr, id)| (*addr, Arc::from(id.as_str())))
        .collect()
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("cannot connect: {0}")]
    Connect(#[from] crate::identity::channel::ConnectError),
    #[error("stream failed: {}", crate::identity::channel::error_chain(.0))]
    Status(#[from] tonic::Status),
    #[error("the control plane closed the stream")]
    Closed,
}

/// Loads the snapshot kept by an earlier run, if any and still valid.
pub fn load_stored(
    dir: &Path,
    service: &str,
    stores: &crate::routing::snapshot::Stores<'_>,
) -> Option<(Snapshot, String)> {
    let path = dir.join(SNAPSHOT_FILE);
    let text = std::fs::read_to_string(&path).ok()?;
    let stored: Stored = match serde_json::from_str(&text) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable stored snapshot");
            return None;
        }
    };
    let mesh = sidemesh_config::parse_str("stored snapshot", &stored.mesh_yaml).ok()?;
    let snapshot = Snapshot::compile_meshed(
        mesh,
        stored.version,
        service,
        stores,
        &meshed_map(&stored.meshed),
    )
    .ok()?;
    tracing::info!(version = stored.version, path = %path.display(), "serving the stored snapshot until the control plane answers");
    Some((snapshot, stored.hash))
}

fn store(dir: &Path, stored: &Stored) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{SNAPSHOT_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(stored).unwrap_or_default())?;
    std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))
}

/// Runs the stream until the proxy drains, reconnecting with full-jitter exponential backoff
/// (100 ms doubling to 5 s).
pub async fn run(proxy: Arc<Proxy>, me: Identity, mut applied_hash: String, mut drain: Drain) {
    let mut failures = 0u32;
    loop {
        let connected_at = tokio::time::Instant::now();
        let result = tokio::select! {
            r = session(&proxy, &me, &mut applied_hash) => r,
            () = drain.signaled() => return,
        };
        if let Err(e) = result {
            tracing::warn!(control_plane = %me.control_plane.url, error = %e, "control plane unreachable; serving the last good config");
        }
        if connected_at.elapsed() > Duration::from_secs(10) {
            failures = 0;
        }
        let ceiling = Duration::from_millis(100)
            .saturating_mul(1 << failures.min(6))
            .min(Duration::from_secs(5));
        failures += 1;
        let wait = ceiling.mul_f64(fastrand::f64());
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = drain.signaled() => return,
        }
    }
}

fn hello(proxy: &Proxy, me: &Identity, applied_hash: &str) -> ProxyMessage {
    ProxyMessage {
        kind: Some(ProxyKind::Hello(v1::Hello {
            proxy_id: me.proxy_id.clone(),
            service: me.service.clone(),
            namespace: me.namespace.clone(),
            address: me.address.map(|a| a.to_string()).unwrap_or_default(),
            ports: Vec::new(),
            identity: proxy
                .identity
                .current()
                .map(|c| c.identity.to_string())
                .unwrap_or_default(),
            applied_version: proxy.snapshot.load().version,
            ready: proxy.config_applied.load(Ordering::Acquire),
            upstreams: me.upstreams.clone(),
            applied_hash: applied_hash.to_string(),
            admin_address: me.admin.map(|a| a.to_string()).unwrap_or_default(),
        })),
    }
}

async fn session(
    proxy: &Arc<Proxy>,
    me: &Identity,
    applied_hash: &mut String,
) -> Result<(), StreamError> {
    let channel = me.control_plane.connect(None).await?;
    proxy.identity.control_plane_reachable();
    // Registered as a meshed endpoint only with a certificate to prove it.
    proxy.identity.wait_ready().await;
    let (tx, rx) = mpsc::channel(8);
    let _ = tx.send(hello(proxy, me, applied_hash)).await;
    let mut inbound = DiscoveryClient::new(channel)
        .stream(ReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!(control_plane = %me.control_plane.url, tls = me.control_plane.is_tls(), "connected to the control plane");
    while let Some(message) = inbound.message().await? {
        let Some(ControlKind::Snapshot(snapshot)) = message.kind else {
            continue;
        };
        let was_ready = proxy.config_applied.load(Ordering::Acquire);
        let answer = match apply(proxy, me, &snapshot) {
            Ok(()) => {
                applied_hash.clone_from(&snapshot.content_hash);
                ProxyKind::Ack(v1::Ack {
                    version: snapshot.version,
                    nonce: snapshot.nonce.clone(),
                })
            }
            Err(error) => {
                tracing::warn!(version = snapshot.version, error = %error, "refused a pushed config; keeping the version in force");
                proxy.metrics.reload(false, proxy.snapshot.load().version);
                ProxyKind::Nack(v1::Nack {
                    version: snapshot.version,
                    nonce: snapshot.nonce.clone(),
                    error,
                })
            }
        };
        if tx.send(ProxyMessage { kind: Some(answer) }).await.is_err() {
            return Err(StreamError::Closed);
        }
        // Now ready to be routed to: tell the control plane.
        if !was_ready && proxy.config_applied.load(Ordering::Acquire) {
            let _ = tx.send(hello(proxy, me, applied_hash)).await;
        }
    }
    Err(StreamError::Closed)
}

/// Validates and swaps in a pushed snapshot; the error text is what the NACK says.
fn apply(proxy: &Proxy, me: &Identity, snapshot: &v1::Snapshot) -> Result<(), String> {
    let mesh = sidemesh_config::parse_str("pushed config", &snapshot.mesh_yaml)
        .map_err(|d| d.to_string())?;
    let meshed = meshed(snapshot);
    let compiled = Snapshot::compile_meshed(
        mesh,
        snapshot.version,
        &proxy.service,
        &proxy.stores(),
        &meshed_map(&meshed),
    )
    .map_err(|e| e.to_string())?;
    proxy.tracing.configure(&compiled.mesh.settings.tracing);
    proxy.snapshot.store(Arc::new(compiled));
    proxy.config_applied.store(true, Ordering::Release);
    proxy.metrics.reload(true, snapshot.version);
    tracing::info!(
        version = snapshot.version,
        config_version = snapshot.config_version,
        "pushed config applied"
    );
    if let Some(dir) = &me.state_dir {
        let stored = Stored {
            version: snapshot.version,
            hash: snapshot.content_hash.clone(),
            mesh_yaml: snapshot.mesh_yaml.clone(),
            meshed,
        };
        if let Err(e) = store(dir, &stored) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot store the snapshot; a restart without the control plane would not serve");
        }
    }
    Ok(())
}
