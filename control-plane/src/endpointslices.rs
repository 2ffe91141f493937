//! Kubernetes service discovery (`kubernetes` feature): the endpoints of each service come from
//! its EndpointSlices, the cluster's source of truth, shared by every control-plane replica.
//!
//! The slices are listed once and then watched (kube-rs' watcher: bookmarks, and a re-list
//! only when the API server answers 410 Gone), so a change reaches the proxies as soon as the
//! API server reports it, and a cluster with thousands of endpoints is not listed again and
//! again. Until the first list completes the proxies' own registrations stay in force.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use sidemesh_config::ServiceId;
use tokio::sync::watch;

use crate::hub::Hub;

/// Only slices that belong to a Service carry this label.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";

/// A slice's service and its ready endpoints (`address:port` for the slice's first TCP
/// port); endpoints not ready (or terminating) are left out. `None` for a slice of no service.
pub fn endpoints_of(slice: &EndpointSlice) -> Option<(ServiceId, Vec<SocketAddr>)> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_LABEL)?;
    let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
    let port = slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())?;
    let mut addrs: Vec<SocketAddr> = slice
        .endpoints
        .iter()
        // `ready` absent means ready (the API's documented default).
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| &e.addresses)
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    addrs.sort();
    addrs.dedup();
    Some((
        ServiceId {
            name: name.clone(),
            namespace: namespace.to_string(),
        },
        addrs,
    ))
}

/// Every slice seen, by `namespace/name`.
#[derive(Debug, Default)]
struct Slices {
    current: HashMap<String, (ServiceId, Vec<SocketAddr>)>,
    /// A (re-)list in progress: it replaces `current` when complete, so slices deleted while
    /// the watch was broken disappear.
    listing: Option<HashMap<String, (ServiceId, Vec<SocketAddr>)>>,
    listed: bool,
}

fn key(slice: &EndpointSlice) -> String {
    format!(
        "{}/{}",
        slice.metadata.namespace.as_deref().unwrap_or_default(),
        slice.metadata.name.as_deref().unwrap_or_default()
    )
}

impl Slices {
    /// Applies one event; true when the endpoints the proxies see may have changed.
    fn apply(&mut self, event: watcher::Event<EndpointSlice>) -> bool {
        match event {
            watcher::Event::Init => {
                self.listing = Some(HashMap::new());
                false
            }
            watcher::Event::InitApply(slice) => {
                if let (Some(listing), Some(entry)) = (&mut self.listing, endpoints_of(&slice)) {
                    listing.insert(key(&slice), entry);
                }
                false
            }
            watcher::Event::InitDone => {
                self.current = self.listing.take().unwrap_or_default();
                self.listed = true;
                tracing::info!(
                    slices = self.current.len(),
                    "EndpointSlices listed; watching for changes"
                );
                true
            }
            watcher::Event::Apply(slice) => {
                match endpoints_of(&slice) {
                    Some(entry) => self.current.insert(key(&slice), entry),
                    None => self.current.remove(&key(&slice)),
                };
                self.listed
            }
            watcher::Event::Delete(slice) => {
                self.current.remove(&key(&slice)).is_some() && self.listed
            }
        }
    }

    fn by_service(&self) -> HashMap<ServiceId, Vec<SocketAddr>> {
        let mut out: HashMap<ServiceId, Vec<SocketAddr>> = HashMap::new();
        for (service, addrs) in self.current.values() {
            out.entry(service.clone()).or_default().extend(addrs);
        }
        for addrs in out.values_mut() {
            addrs.sort();
            addrs.dedup();
        }
        out
    }
}

/// Watches the EndpointSlices and hands every change to the registry until `stop`.
pub async fn run(client: kube::Client, hub: Arc<Hub>, mut stop: watch::Receiver<bool>) {
    let api: Api<EndpointSlice> = Api::all(client);
    let config = watcher::Config::default().labels(SERVICE_LABEL);
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut slices = Slices::default();
    let mut failing = false;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            () = crate::hub::stopped(&mut stop) => return,
        };
        let mut changed = false;
        let mut next = event;
        // Apply everything already received before pushing once (a re-list, a rollout).
        while let Some(item) = next {
            match item {
                Ok(event) => {
                    if failing {
                        tracing::info!("EndpointSlice watch restored");
                        failing = false;
                    }
                    changed |= slices.apply(event);
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "EndpointSlice watch failed; keeping the last endpoints and retrying");
                    }
                    failing = true;
                }
            }
            next = events.next().now_or_never().flatten();
        }
        if changed {
            hub.registry.set_discovered(slices.by_service());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_endpoints_by_service() {
        let list: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/k8s/endpointslices.json"))
                .expect("fixture");
        let mut slices = Slices::default();
        slices.apply(watcher::Event::Init);
        for item in list["items"].as_array().expect("items") {
            let slice: EndpointSlice = serde_json::from_value(item.clone()).expect("slice");
            slices.apply(watcher::Event::InitApply(slice));
        }
        assert!(slices.apply(watcher::Event::InitDone));
        let users = ServiceId {
            name: "user-service".into(),
            namespace: "demo".into(),
        };
        let found = slices.by_service();
        let addrs: Vec<String> = found[&users].iter().map(ToString::to_string).collect();
        assert_eq!(
            addrs,
            ["10.244.1.7:8081", "10.244.2.9:8081"],
            "the terminating pod is out"
        );
        // A re-list that no longer has a slice drops it.
        slices.apply(watcher::Event::Init);
        assert!(slices.apply(watcher::Event::InitDone));
        assert!(slices.by_service().is_empty());
    }
}
