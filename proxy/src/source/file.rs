//! Static mode: the routing YAML is re-read when it changes and swapped in atomically.
//! A change that does not validate is refused with its errors logged; the version in force
//! keeps serving. Polling (not inotify) also catches Kubernetes ConfigMap symlink swaps.

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use sidemesh_config::Source;

use crate::drain::Drain;
use crate::routing::snapshot::Snapshot;
use crate::state::Proxy;

/// A fingerprint of the files' names and contents.
pub fn fingerprint(sources: &[Source]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for s in sources {
        s.file.hash(&mut h);
        s.text.hash(&mut h);
    }
    h.finish()
}

pub async fn watch(proxy: Arc<Proxy>, path: &Path, mut last: u64, mut drain: Drain) {
    let mut last_error = String::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep(proxy.timeouts.reload_interval) => {}
            () = drain.signaled() => return,
        }
        let sources = match sidemesh_config::read_sources(path) {
            Ok(sources) => sources,
            Err(e) => {
                let msg = e.to_string();
                if msg != last_error {
                    tracing::warn!(error = %msg, "cannot read the routing config; keeping the version in force");
                    last_error = msg;
                }
                continue;
            }
        };
        let fp = fingerprint(&sources);
        if fp == last {
            continue;
        }
        last = fp;
        apply(&proxy, &sources);
    }
}

/// Validates and swaps in a new config; returns whether it was applied.
pub fn apply(proxy: &Proxy, sources: &[Source]) -> bool {
    let current = proxy.snapshot.load().version;
    let mesh = match sidemesh_config::validate(sources) {
        Ok(mesh) => mesh,
        Err(diagnostics) => {
            tracing::warn!(errors = %diagnostics, version = current, "routing config refused; keeping the version in force");
            proxy.metrics.reload(false, current);
            return false;
        }
    };
    match Snapshot::compile(mesh, current + 1, &proxy.service, &proxy.stores()) {
        Ok(snapshot) => {
            proxy.tracing.configure(&snapshot.mesh.settings.tracing);
            proxy.snapshot.store(Arc::new(snapshot));
            proxy.metrics.reload(true, current + 1);
            tracing::info!(version = current + 1, "routing config applied");
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, version = current, "routing config refused; keeping the version in force");
            proxy.metrics.reload(false, current);
            false
        }
    }
}
