//! The gRPC stream with each proxy: Hello, then Snapshots whenever its view changes, answered
//! by ACK or NACK.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sidemesh_api::v1::control_message::Kind as ControlKind;
use sidemesh_api::v1::discovery_server::Discovery;
use sidemesh_api::v1::proxy_message::Kind as ProxyKind;
use sidemesh_api::v1::{self, ControlMessage, ProxyMessage};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::hub::Hub;
use crate::registry::ProxyInfo;

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct DiscoveryService {
    hub: Arc<Hub>,
}

impl DiscoveryService {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

type ControlStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

fn info(hello: &v1::Hello) -> Result<ProxyInfo, Status> {
    if hello.proxy_id.is_empty() || hello.service.is_empty() {
        return Err(Status::invalid_argument(
            "hello needs a proxy_id and a service",
        ));
    }
    let address = if hello.address.is_empty() {
        None
    } else {
        Some(hello.address.parse::<SocketAddr>().map_err(|e| {
            Status::invalid_argument(format!(
                "hello address `{}` is not ip:port: {e}",
                hello.address
            ))
        })?)
    };
    // An unreadable admin address only costs `sidemesh stat` this proxy: not worth a refusal.
    let admin = hello.admin_address.parse::<SocketAddr>().ok();
    let (service, namespace) = match hello.service.split_once('.') {
        Some((s, ns)) => (s.to_string(), ns.to_string()),
        None => (
            hello.service.clone(),
            if hello.namespace.is_empty() {
                sidemesh_config::DEFAULT_NAMESPACE.to_string()
            } else {
                hello.namespace.clone()
            },
        ),
    };
    Ok(ProxyInfo {
        id: hello.proxy_id.clone(),
        service,
        namespace,
        address,
        admin,
        identity: hello.identity.clone(),
        ready: hello.ready,
        upstreams: hello.upstreams.clone(),
    })
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = ControlStream;

    async fn stream(
        &self,
        request: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10s"))??;
        let Some(ProxyMessage {
            kind: Some(ProxyKind::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message must be a hello",
            ));
        };
        let proxy = info(&hello)?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(serve(
            self.hub.clone(),
            proxy,
            hello.applied_hash,
            inbound,
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One proxy's stream, until it ends.
async fn serve(
    hub: Arc<Hub>,
    mut proxy: ProxyInfo,
    applied_hash: String,
    mut inbound: Streaming<ProxyMessage>,
    tx: mpsc::Sender<Result<ControlMessage, Status>>,
) {
    let id = proxy.id.clone();
    let session = hub.registry.hello(proxy.clone(), applied_hash);
    hub.metrics.connected.inc();
    tracing::info!(proxy = %id, service = %proxy.service, address = ?proxy.address, "proxy connected");
    let mut revisions = hub.subscribe();
    let mut last_hash = hub.registry.applied_hash(&id);
    // A proxy that already serves a view waits out the start-up grace (see `Hub::hold_until`).
    let hold = (!last_hash.is_empty()).then_some(hub.hold_until);
    loop {
        // Push when this proxy's view differs from what it has.
        let revision = revisions.borrow_and_update().clone();
        let holding = hold.is_some_and(|until| std::time::Instant::now() < until);
        if let (Some(config), false) = (&revision.config, holding) {
            let view = hub.view(&revision, config, &proxy);
            if view.hash != last_hash {
                let nonce = format!("{:016x}", fastrand::u64(..));
                hub.registry.sent(
                    &id,
                    session,
                    revision.number,
                    nonce.clone(),
                    view.hash.clone(),
                );
                let snapshot = v1::Snapshot {
                    version: revision.number,
                    nonce,
                    content_hash: view.hash.clone(),
                    mesh_yaml: view.yaml.clone(),
                    endpoints: view.endpoints.clone(),
                    config_version: config.number,
                };
                if tx
                    .send(Ok(ControlMessage {
                        kind: Some(ControlKind::Snapshot(snapshot)),
                    }))
                    .await
                    .is_err()
                {
                    break;
                }
                hub.metrics.pushes.inc();
                last_hash.clone_from(&view.hash);
            }
        }
        tokio::select! {
            () = tokio::time::sleep_until(hold.unwrap_or_else(std::time::Instant::now).into()), if holding => {}
            changed = revisions.changed() => if changed.is_err() { break },
            message = inbound.message() => match message {
                Ok(Some(ProxyMessage { kind: Some(kind) })) => match kind {
                    ProxyKind::Ack(ack) => {
                        hub.metrics.acks.inc();
                        if let Some(took) = hub.registry.acked(&id, session, ack.version, &ack.nonce) {
                            hub.converged(took);
                        }
                    }
                    ProxyKind::Nack(nack) => {
                        hub.metrics.nacks.inc();
                        tracing::warn!(proxy = %id, version = nack.version, error = %nack.error, "proxy refused a snapshot");
                        if let Some(took) = hub.registry.nacked(&id, session, nack.version, &nack.nonce, nack.error) {
                            hub.converged(took);
                        }
                    }
                    ProxyKind::Hello(hello) => match info(&hello) {
                        Ok(updated) => {
                            proxy = updated;
                            hub.registry.update(&id, session, proxy.clone());
                        }
                        Err(status) => {
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                    },
                },
                Ok(Some(ProxyMessage { kind: None })) => {}
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(proxy = %id, error = %e, "proxy stream failed");
                    break;
                }
            },
        }
    }
    hub.registry.disconnected(&id, session);
    hub.metrics.connected.dec();
    tracing::info!(proxy = %id, "proxy disconnected");
}
