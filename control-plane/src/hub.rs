//! What the control plane's parts share: the config store, the registry, metrics, and the
//! current revision (config version + endpoints) that every proxy stream watches.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sidemesh_config::ServiceId;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::registry::{ProxyInfo, Registry};
use crate::store::{ConfigVersion, Store};
use crate::view::{self, View};

/// Resolves once `stop` turns true (the guard `wait_for` returns is not `Send`, so it is
/// dropped here rather than held by a `select!`).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// What proxies' views are computed from. `number` grows with every change.
#[derive(Debug, Clone, Default)]
pub struct Revision {
    pub number: u64,
    pub config: Option<Arc<ConfigVersion>>,
    pub endpoints: Arc<HashMap<ServiceId, Vec<(SocketAddr, String)>>>,
}

#[derive(Debug)]
pub struct Hub {
    pub store: Arc<Store>,
    pub registry: Registry,
    pub metrics: Metrics,
    revision: watch::Sender<Revision>,
    /// Until then, proxies that already hold a view are not pushed to: after a restart the
    /// registry is empty, and a view computed before every proxy has registered again would
    /// lack endpoints that are in fact alive.
    pub hold_until: Instant,
    /// Views of the current revision by (service, namespace, upstreams): replicas of a service
    /// share one, so a push to 10,000 proxies computes a handful of views, not 10,000.
    views: std::sync::Mutex<(u64, HashMap<ViewKey, Arc<View>>)>,
}

type ViewKey = (String, String, Vec<String>);

impl Hub {
    pub fn new(store: Arc<Store>, metrics: Metrics, startup_grace: Duration) -> Arc<Hub> {
        let config = store.current();
        if let Some(c) = &config {
            metrics.config_version.set(c.number);
        }
        let (revision, _) = watch::channel(Revision {
            number: 1,
            config,
            endpoints: Arc::default(),
        });
        Arc::new(Hub {
            store,
            registry: Registry::default(),
            metrics,
            revision,
            hold_until: Instant::now() + startup_grace,
            views: std::sync::Mutex::new((0, HashMap::new())),
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<Revision> {
        self.revision.subscribe()
    }

    pub fn revision(&self) -> Revision {
        self.revision.borrow().clone()
    }

    /// `proxy`'s view of `revision` (which must carry a config), computed once per revision
    /// for every proxy with the same service and upstreams.
    pub fn view(
        &self,
        revision: &Revision,
        config: &ConfigVersion,
        proxy: &ProxyInfo,
    ) -> Arc<View> {
        let key = (
            proxy.service.clone(),
            proxy.namespace.clone(),
            proxy.upstreams.clone(),
        );
        let mut cache = self.views.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 != revision.number {
            *cache = (revision.number, HashMap::new());
        }
        cache
            .1
            .entry(key)
            .or_insert_with(|| Arc::new(view::compute(config, proxy, &revision.endpoints)))
            .clone()
    }

    pub fn converged(&self, took: Duration) {
        self.metrics.converged(took);
        tracing::info!(
            took_ms = took.as_secs_f64() * 1000.0,
            "config push converged"
        );
    }

    /// Turns config and endpoint changes into new revisions, and forgets proxies gone for
    /// longer than `grace`.
    pub async fn drive(self: Arc<Self>, grace: Duration, mut stop: watch::Receiver<bool>) {
        let mut configs = self.store.subscribe();
        let mut endpoints = self.registry.subscribe_endpoints();
        let mut reap = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                changed = configs.changed() => {
                    if changed.is_err() { return; }
                    let config = configs.borrow_and_update().clone();
                    let since = config.as_ref().map_or_else(Instant::now, |c| c.changed_at);
                    if let Some(c) = &config {
                        self.metrics.config_version.set(c.number);
                    }
                    let mut number = 0;
                    self.revision.send_modify(|r| {
                        r.number += 1;
                        r.config = config;
                        number = r.number;
                    });
                    self.registry.config_changed(number, since);
                    // Give the streams a moment to send; if nobody was affected, settle now.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if let Some(took) = self.registry.settle() {
                        self.converged(took);
                    }
                }
                changed = endpoints.changed() => {
                    if changed.is_err() { return; }
                    endpoints.borrow_and_update();
                    let current = Arc::new(self.registry.endpoints());
                    self.revision.send_if_modified(|r| {
                        if *r.endpoints == *current {
                            return false;
                        }
                        r.number += 1;
                        r.endpoints = current;
                        true
                    });
                }
                _ = reap.tick() => self.registry.reap(grace),
                () = stopped(&mut stop) => return,
            }
        }
    }
}
