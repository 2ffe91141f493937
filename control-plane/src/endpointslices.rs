//! Kubernetes service discovery (`kubernetes` feature): the endpoints of each service come from
//! its EndpointSlices, the cluster's source of truth, shared by every control-plane replica.
//! The slices are listed periodically; a change is pushed to the proxies like any other.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sidemesh_config::ServiceId;
use tokio::sync::watch;

use crate::hub::Hub;
use crate::tokenreview::Reviewer;

const PATH: &str = "/apis/discovery.k8s.io/v1/endpointslices";

/// Ready endpoints by service, from an `EndpointSliceList`. An endpoint is `address:port` for
/// the slice's first port; endpoints not ready (or terminating) are left out.
pub fn parse(list: &Value) -> HashMap<ServiceId, Vec<SocketAddr>> {
    let mut out: HashMap<ServiceId, Vec<SocketAddr>> = HashMap::new();
    for slice in list["items"].as_array().into_iter().flatten() {
        let Some(name) = slice
            .pointer("/metadata/labels/kubernetes.io~1service-name")
            .and_then(Value::as_str)
        else {
            continue;
        };
        let namespace = slice
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let Some(port) = slice
            .pointer("/ports/0/port")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        let id = ServiceId {
            name: name.to_string(),
            namespace: namespace.to_string(),
        };
        let entry = out.entry(id).or_default();
        for endpoint in slice["endpoints"].as_array().into_iter().flatten() {
            // `ready` absent means ready (the API's documented default).
            if endpoint.pointer("/conditions/ready") == Some(&Value::Bool(false)) {
                continue;
            }
            for address in endpoint["addresses"].as_array().into_iter().flatten() {
                if let Some(ip) = address.as_str().and_then(|a| a.parse::<IpAddr>().ok()) {
                    entry.push(SocketAddr::new(ip, port));
                }
            }
        }
        entry.sort();
        entry.dedup();
    }
    out
}

/// Lists the EndpointSlices every `interval` and hands changes to the registry until `stop`.
pub async fn run(
    client: Arc<Reviewer>,
    hub: Arc<Hub>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        match client.get(PATH).await {
            Ok(body) => match serde_json::from_slice::<Value>(&body) {
                Ok(list) => {
                    if failing {
                        tracing::info!("EndpointSlices readable again");
                        failing = false;
                    }
                    hub.registry.set_discovered(parse(&list));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable EndpointSlice list; keeping the last one")
                }
            },
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot list EndpointSlices; keeping the last endpoints");
                }
                failing = true;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = crate::hub::stopped(&mut stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_endpoints_by_service() {
        let list: Value =
            serde_json::from_str(include_str!("../../tests/fixtures/k8s/endpointslices.json"))
                .expect("fixture");
        let found = parse(&list);
        let users = ServiceId {
            name: "user-service".into(),
            namespace: "demo".into(),
        };
        let addrs: Vec<String> = found[&users].iter().map(ToString::to_string).collect();
        assert_eq!(
            addrs,
            ["10.244.1.7:8081", "10.244.2.9:8081"],
            "the terminating pod is out"
        );
    }
}
