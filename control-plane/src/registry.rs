//! Connected proxies, what each was sent and acknowledged, and the service endpoints they
//! register. Endpoints of a disconnected proxy stay for a grace period (a control-plane blip
//! must not empty a service), then go.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use sidemesh_config::ServiceId;
use tokio::sync::watch;

/// What a proxy said about itself in its Hello.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyInfo {
    pub id: String,
    pub service: String,
    pub namespace: String,
    pub address: Option<SocketAddr>,
    /// The proxy's admin server (`/metrics`), when it said.
    pub admin: Option<SocketAddr>,
    pub identity: String,
    pub ready: bool,
    pub upstreams: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Nack {
    pub version: u64,
    pub error: String,
}

#[derive(Debug)]
struct Entry {
    info: ProxyInfo,
    session: u64,
    connected_since: SystemTime,
    disconnected_at: Option<Instant>,
    /// (revision, nonce, hash) of the last snapshot sent and not yet answered.
    in_flight: Option<(u64, String, String)>,
    applied_version: u64,
    applied_hash: String,
    last_nack: Option<Nack>,
}

/// The row `sidemesh status` shows for a proxy.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyStatus {
    #[serde(flatten)]
    pub info: ProxyInfo,
    pub connected: bool,
    pub connected_for_secs: u64,
    pub applied_version: u64,
    pub applied_hash: String,
    pub waiting_for_ack: bool,
    pub last_nack: Option<Nack>,
}

#[derive(Debug, Default)]
struct State {
    proxies: HashMap<String, Entry>,
    sessions: u64,
    /// (revision, first seen) of a config change whose push has not converged yet.
    converging: Option<(u64, Instant)>,
    last_convergence: Option<(u64, Duration)>,
    /// Endpoints from Kubernetes EndpointSlices, once discovery runs.
    discovered: Option<HashMap<ServiceId, Vec<SocketAddr>>>,
}

#[derive(Debug)]
pub struct Registry {
    state: Mutex<State>,
    /// Bumped whenever the set of endpoints changes.
    endpoints: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            state: Mutex::new(State::default()),
            endpoints: watch::channel(0).0,
        }
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe_endpoints(&self) -> watch::Receiver<u64> {
        self.endpoints.subscribe()
    }

    fn endpoints_changed(&self) {
        self.endpoints.send_modify(|n| *n += 1);
    }

    /// Registers (or updates) a proxy; returns the session id of this stream.
    pub fn hello(&self, info: ProxyInfo, applied_hash: String) -> u64 {
        let changed;
        let session;
        {
            let mut state = self.lock();
            state.sessions += 1;
            session = state.sessions;
            let old = state.proxies.get(&info.id);
            changed = old.is_none_or(|e| {
                e.info.address != info.address
                    || e.info.ready != info.ready
                    || e.disconnected_at.is_some()
            });
            let (connected_since, applied_version, last_nack) = old
                .map_or((SystemTime::now(), 0, None), |e| {
                    (e.connected_since, e.applied_version, e.last_nack.clone())
                });
            state.proxies.insert(
                info.id.clone(),
                Entry {
                    info,
                    session,
                    connected_since,
                    disconnected_at: None,
                    in_flight: None,
                    applied_version,
                    applied_hash,
                    last_nack,
                },
            );
        }
        if changed {
            self.endpoints_changed();
        }
        session
    }

    /// An update of the same session (e.g. the proxy became ready).
    pub fn update(&self, id: &str, session: u64, info: ProxyInfo) {
        let changed = {
            let mut state = self.lock();
            match state.proxies.get_mut(id).filter(|e| e.session == session) {
                Some(e) => {
                    let changed = e.info.address != info.address || e.info.ready != info.ready;
                    e.info = info;
                    changed
                }
                None => false,
            }
        };
        if changed {
            self.endpoints_changed();
        }
    }

    pub fn disconnected(&self, id: &str, session: u64) {
        let mut state = self.lock();
        if let Some(e) = state.proxies.get_mut(id).filter(|e| e.session == session) {
            e.disconnected_at = Some(Instant::now());
            e.in_flight = None;
        }
    }

    /// Forgets proxies disconnected for longer than `grace`; their endpoints go.
    pub fn reap(&self, grace: Duration) {
        let removed = {
            let mut state = self.lock();
            let before = state.proxies.len();
            state
                .proxies
                .retain(|_, e| e.disconnected_at.is_none_or(|t| t.elapsed() < grace));
            before != state.proxies.len()
        };
        if removed {
            self.endpoints_changed();
        }
    }

    /// The last view hash a proxy has applied (to skip identical pushes).
    pub fn applied_hash(&self, id: &str) -> String {
        self.lock()
            .proxies
            .get(id)
            .map(|e| e.applied_hash.clone())
            .unwrap_or_default()
    }

    pub fn sent(&self, id: &str, session: u64, revision: u64, nonce: String, hash: String) {
        let mut state = self.lock();
        if let Some(e) = state.proxies.get_mut(id).filter(|e| e.session == session) {
            e.in_flight = Some((revision, nonce, hash));
        }
    }

    /// Records an ACK; returns the convergence time when this ACK completed a config push.
    pub fn acked(&self, id: &str, session: u64, version: u64, nonce: &str) -> Option<Duration> {
        let mut state = self.lock();
        let e = state.proxies.get_mut(id).filter(|e| e.session == session)?;
        match e.in_flight.take() {
            Some((revision, sent_nonce, hash)) if sent_nonce == nonce && revision == version => {
                e.applied_version = revision;
                e.applied_hash = hash;
            }
            other => {
                e.in_flight = other;
                return None;
            }
        }
        Self::check_convergence(&mut state)
    }

    pub fn nacked(
        &self,
        id: &str,
        session: u64,
        version: u64,
        nonce: &str,
        error: String,
    ) -> Option<Duration> {
        let mut state = self.lock();
        let e = state.proxies.get_mut(id).filter(|e| e.session == session)?;
        if e.in_flight.as_ref().is_some_and(|(_, n, _)| n == nonce) {
            e.in_flight = None;
        }
        e.last_nack = Some(Nack { version, error });
        Self::check_convergence(&mut state)
    }

    /// A config change at `revision`, first seen at `since`, starts converging.
    pub fn config_changed(&self, revision: u64, since: Instant) {
        self.lock().converging = Some((revision, since));
    }

    /// Converged once no connected proxy waits on a snapshot (a NACK is an answer too).
    fn check_convergence(state: &mut State) -> Option<Duration> {
        let (revision, since) = state.converging?;
        let waiting = state.proxies.values().any(|e| {
            e.disconnected_at.is_none()
                && e.in_flight.as_ref().is_some_and(|(r, _, _)| *r >= revision)
        });
        if waiting {
            return None;
        }
        state.converging = None;
        let took = since.elapsed();
        state.last_convergence = Some((revision, took));
        Some(took)
    }

    /// Nobody was sent anything for a change (no affected proxies): converged at once.
    pub fn settle(&self) -> Option<Duration> {
        Self::check_convergence(&mut self.lock())
    }

    pub fn last_convergence(&self) -> Option<(u64, Duration)> {
        self.lock().last_convergence
    }

    pub fn connected(&self) -> usize {
        self.lock()
            .proxies
            .values()
            .filter(|e| e.disconnected_at.is_none())
            .count()
    }

    /// Endpoints from Kubernetes EndpointSlices: from now on they, not the registrations,
    /// say which addresses serve a service (a registration only lends its identity).
    pub fn set_discovered(&self, discovered: HashMap<ServiceId, Vec<SocketAddr>>) {
        let changed = {
            let mut state = self.lock();
            let changed = state.discovered.as_ref() != Some(&discovered);
            state.discovered = Some(discovered);
            changed
        };
        if changed {
            self.endpoints_changed();
        }
    }

    /// Ready endpoints by service (connected, or disconnected within the grace period), or
    /// the discovered ones with the identity of the proxy registered at each address.
    pub fn endpoints(&self) -> HashMap<ServiceId, Vec<(SocketAddr, String)>> {
        let state = self.lock();
        if let Some(discovered) = &state.discovered {
            let identities: HashMap<SocketAddr, &str> = state
                .proxies
                .values()
                .filter_map(|e| Some((e.info.address?, e.info.identity.as_str())))
                .collect();
            return discovered
                .iter()
                .map(|(id, addrs)| {
                    let eps = addrs
                        .iter()
                        .map(|a| {
                            (
                                *a,
                                identities.get(a).copied().unwrap_or_default().to_string(),
                            )
                        })
                        .collect();
                    (id.clone(), eps)
                })
                .collect();
        }
        let mut out: HashMap<ServiceId, Vec<(SocketAddr, String)>> = HashMap::new();
        for e in state.proxies.values() {
            if let (true, Some(addr)) = (e.info.ready, e.info.address) {
                let id = ServiceId {
                    name: e.info.service.clone(),
                    namespace: e.info.namespace.clone(),
                };
                out.entry(id)
                    .or_default()
                    .push((addr, e.info.identity.clone()));
            }
        }
        for eps in out.values_mut() {
            eps.sort();
        }
        out
    }

    pub fn statuses(&self) -> Vec<ProxyStatus> {
        let state = self.lock();
        let mut rows: Vec<ProxyStatus> = state
            .proxies
            .values()
            .map(|e| ProxyStatus {
                info: e.info.clone(),
                connected: e.disconnected_at.is_none(),
                connected_for_secs: e.connected_since.elapsed().map_or(0, |d| d.as_secs()),
                applied_version: e.applied_version,
                applied_hash: e.applied_hash.clone(),
                waiting_for_ack: e.in_flight.is_some(),
                last_nack: e.last_nack.clone(),
            })
            .collect();
        rows.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        rows
    }
}
