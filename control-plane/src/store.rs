//! The config store: watches the folder of routing YAML, debounces bursts of writes, validates
//! with `sidemesh-config`, and publishes each good config as a new version. A config that does
//! not validate is never published; its errors are kept for `sidemesh status` and the logs.
//!
//! The folder is polled rather than watched with inotify: polling follows a Kubernetes
//! ConfigMap's atomic symlink swap (`..data -> ..2026_11_21...`) without special cases.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use sidemesh_config::spec::MeshDocument;
use sidemesh_config::{LoadError, Mesh, Source};
use tokio::sync::watch;

/// A good config, as published to the proxies.
#[derive(Debug)]
pub struct ConfigVersion {
    /// 1, 2, 3, ... for each good config since this control plane started.
    pub number: u64,
    /// FNV-1a of the files' names and contents.
    pub hash: String,
    pub files: Vec<PathBuf>,
    pub mesh: Mesh,
    pub spec: MeshDocument,
    /// When the change was first seen on disk (start of convergence).
    pub changed_at: Instant,
    pub loaded_at: SystemTime,
}

/// The last refused config.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigError {
    pub at_unix_ms: u128,
    pub errors: Vec<String>,
}

#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    /// Counts refused configs (the `config_errors` metric).
    errors: prometheus_client::metrics::counter::Counter,
    current: watch::Sender<Option<Arc<ConfigVersion>>>,
    last_error: Mutex<Option<ConfigError>>,
    seen_hash: Mutex<String>,
}

/// Stable across processes and releases (unlike `DefaultHasher`), so replicas agree.
pub fn fnv64(parts: &[&[u8]]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn sources_hash(sources: &[Source]) -> String {
    let mut parts: Vec<&[u8]> = Vec::new();
    for s in sources {
        parts.push(s.file.as_os_str().as_encoded_bytes());
        parts.push(s.text.as_bytes());
    }
    fnv64(&parts)
}

fn unix_ms(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

impl Store {
    /// Reads the config once. An invalid or unreadable config is recorded, not fatal: the
    /// control plane serves nothing until a good one appears, and proxies keep what they have.
    pub fn open(path: &Path, errors: prometheus_client::metrics::counter::Counter) -> Arc<Store> {
        let (current, _) = watch::channel(None);
        let store = Arc::new(Store {
            path: path.to_path_buf(),
            errors,
            current,
            last_error: Mutex::new(None),
            seen_hash: Mutex::new(String::new()),
        });
        match sidemesh_config::read_sources(path) {
            Ok(sources) => {
                let hash = sources_hash(&sources);
                store.consider(&sources, hash, Instant::now());
            }
            Err(e) => store.refuse(&e),
        }
        store
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<ConfigVersion>>> {
        self.current.subscribe()
    }

    pub fn current(&self) -> Option<Arc<ConfigVersion>> {
        self.current.borrow().clone()
    }

    pub fn last_error(&self) -> Option<ConfigError> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn refuse(&self, error: &LoadError) {
        let errors = match error {
            LoadError::Invalid(d) => d.0.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        };
        let version = self.current().map_or(0, |v| v.number);
        self.errors.inc();
        for e in &errors {
            tracing::warn!(error = %e, version_in_force = version, "routing config refused; nothing pushed");
        }
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(ConfigError {
            at_unix_ms: unix_ms(SystemTime::now()),
            errors,
        });
    }

    /// Validates sources whose hash differs from the last ones seen; publishes them if good.
    fn consider(&self, sources: &[Source], hash: String, changed_at: Instant) -> Option<bool> {
        {
            let mut seen = self.seen_hash.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == hash {
                return None;
            }
            seen.clone_from(&hash);
        }
        if self.current().is_some_and(|c| c.hash == hash) {
            // Back to the version in force (a bad edit was reverted).
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return None;
        }
        match sidemesh_config::validate_with_spec(sources) {
            Ok((mesh, spec)) => {
                let number = self.current().map_or(1, |c| c.number + 1);
                let version = ConfigVersion {
                    number,
                    hash,
                    files: sources.iter().map(|s| s.file.clone()).collect(),
                    mesh,
                    spec,
                    changed_at,
                    loaded_at: SystemTime::now(),
                };
                tracing::info!(version = number, hash = %version.hash, "routing config accepted");
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                self.current.send_replace(Some(Arc::new(version)));
                Some(true)
            }
            Err(diagnostics) => {
                self.refuse(&LoadError::Invalid(diagnostics));
                Some(false)
            }
        }
    }

    /// Polls the folder every `interval`; a change is acted on once the files have been
    /// stable for `debounce` (an editor or `kubectl` writes several files in a burst).
    pub async fn watch(
        self: Arc<Self>,
        interval: Duration,
        debounce: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut pending: Option<(String, Instant, Instant)> = None; // (hash, first seen, last change)
        let mut last_read_error = String::new();
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = crate::hub::stopped(&mut stop) => return,
            }
            let sources = match sidemesh_config::read_sources(&self.path) {
                Ok(sources) => sources,
                Err(e) => {
                    let msg = e.to_string();
                    if msg != last_read_error {
                        self.refuse(&e);
                        last_read_error = msg;
                    }
                    continue;
                }
            };
            last_read_error.clear();
            let hash = sources_hash(&sources);
            if *self.seen_hash.lock().unwrap_or_else(|p| p.into_inner()) == hash {
                pending = None;
                continue;
            }
            let now = Instant::now();
            pending = match pending {
                Some((h, first, last)) if h == hash => Some((h, first, last)),
                Some((_, first, _)) => Some((hash.clone(), first, now)),
                None => Some((hash.clone(), now, now)),
            };
            if let Some((h, first, last)) = &pending {
                if now.duration_since(*last) >= debounce {
                    self.consider(&sources, h.clone(), *first);
                    pending = None;
                }
            }
        }
    }
}
