//! The state every connection and request shares: settings, the routing snapshot in force,
//! live endpoints, metrics, the workload certificate. A leaf of the crate: it holds the other
//! layers' state and calls into none of them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use sidemesh_config::MtlsMode;

use crate::config::{AppProbes, Limits, Mode, Timeouts};
use crate::identity::workload::IdentityState;
use crate::routing::snapshot::{Snapshot, Stores};
use crate::stages::ratelimit::Limiters;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::trace::Tracing;
use crate::upstream::endpoint::{PoolConfig, Registry};

/// State shared by every connection and request.
#[derive(Debug)]
pub struct Proxy {
    pub service: String,
    pub mode: Mode,
    pub app: Option<SocketAddr>,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub pool: PoolConfig,
    pub snapshot: ArcSwap<Snapshot>,
    pub registry: Registry,
    /// Rate limiters by scope and settings, kept across config changes.
    pub limiters: Limiters,
    pub metrics: Metrics,
    /// The workload certificate (control-plane mode with a credential).
    pub identity: IdentityState,
    /// Spans, while the config names a collector.
    pub tracing: Tracing,
    /// Application probes answered on the admin port (`/app-health/...`).
    pub app_probes: AppProbes,
    /// Listeners are up.
    pub ready: AtomicBool,
    /// A config (static file, pushed, or stored) is in force.
    pub config_applied: AtomicBool,
    /// Set by `POST /shutdown` on the admin port: stop as on SIGTERM.
    pub shutdown: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    /// The mTLS mode in force. A proxy without an identity source (a static config, or no
    /// credential) cannot do mTLS: for it the mode is `disabled`.
    pub fn mtls(&self) -> MtlsMode {
        if self.identity.source.is_none() {
            return MtlsMode::Disabled;
        }
        self.snapshot.load().mesh.settings.mtls
    }

    /// The live state a compiled snapshot draws on.
    pub fn stores(&self) -> Stores<'_> {
        Stores {
            registry: &self.registry,
            limiters: &self.limiters,
            metrics: &self.metrics,
        }
    }

    /// Serving: listeners up, a config in force, and a certificate when one is needed.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.identity.ready()
    }
}
