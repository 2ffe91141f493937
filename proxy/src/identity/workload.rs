//! The workload identity: a certificate for this proxy's SPIFFE ID, asked from the control
//! plane's CA with a CSR (the private key never leaves the process), renewed at about 70 % of
//! its lifetime with retries and backoff, and swapped in atomically: new handshakes use the
//! new certificate, connections already open keep theirs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use sidemesh_api::v1::certify_request::Credential;
use sidemesh_api::v1::identity_client::IdentityClient;
use sidemesh_api::v1::{CertifyRequest, CertifyResponse};
use tokio::sync::watch;

use crate::drain::Drain;
use crate::identity::tls;
use crate::telemetry::metrics::Metrics;

/// Renew when this share of the lifetime has passed.
const RENEW_AT: f64 = 0.7;

/// What proves to the CA which workload this proxy serves.
#[derive(Debug, Clone)]
pub enum CredentialSource {
    /// A local mesh's join token, read from this file at every request.
    JoinTokenFile(PathBuf),
    /// A projected Kubernetes service-account token, re-read at every request (it rotates).
    ServiceAccountTokenFile(PathBuf),
}

/// Where and as whom to ask for certificates.
#[derive(Debug, Clone)]
pub struct Source {
    pub control_plane: crate::identity::channel::ControlPlane,
    /// Where the certificate is kept between runs (the proxy's `--state-dir`).
    pub state_dir: Option<PathBuf>,
    pub namespace: String,
    pub service_account: String,
    pub credential: CredentialSource,
}

#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("cannot read the credential {path}: {source}")]
    Credential {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make a key or signing request: {0}")]
    Key(#[from] rcgen::Error),
    #[error("cannot reach the control plane: {0}")]
    Connect(#[from] crate::identity::channel::ConnectError),
    #[error("the control plane refused: {}", .0.message())]
    Refused(#[from] tonic::Status),
    #[error("the issued certificate is not usable: {0}")]
    Unusable(String),
}

/// A certificate in force, with the TLS settings built from it.
pub struct Credentials {
    pub identity: Arc<str>,
    pub not_after: SystemTime,
    pub received: SystemTime,
    pub serial: String,
    pub roots: usize,
    pub tls: tls::Configs,
    /// Set on certificates fresh from the CA, to store them.
    files: Option<Files>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// When to ask for the next certificate.
    fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.received)
            .unwrap_or_default();
        self.received + life.mul_f64(RENEW_AT)
    }
}

/// What `/config_dump` shows of the identity (never the key).
#[derive(Debug, Serialize)]
pub struct IdentityDump {
    pub identity: Option<String>,
    pub not_after_unix: Option<u64>,
    pub serial: Option<String>,
    pub trust_roots: Option<usize>,
    pub renewals: u64,
    pub source: &'static str,
}

/// The proxy's identity state: shared by every connection.
#[derive(Debug)]
pub struct IdentityState {
    pub source: Option<Source>,
    current: ArcSwapOption<Credentials>,
    installed: watch::Sender<u64>,
    /// Wakes a waiting retry: the control plane was just reached.
    retry: tokio::sync::Notify,
}

impl IdentityState {
    pub fn new(source: Option<Source>) -> Self {
        Self {
            source,
            current: ArcSwapOption::empty(),
            installed: watch::channel(0).0,
            retry: tokio::sync::Notify::new(),
        }
    }

    /// The certificate in force, if any.
    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.current.load_full()
    }

    /// Ready to serve: no identity is configured, or an unexpired certificate is in force.
    pub fn ready(&self) -> bool {
        self.source.is_none()
            || self
                .current
                .load()
                .as_ref()
                .is_some_and(|c| c.not_after > SystemTime::now())
    }

    /// Waits until a certificate is in force (returns at once when none is configured).
    pub async fn wait_ready(&self) {
        let mut rx = self.installed.subscribe();
        while !self.ready() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// The control plane answers again: a proxy still without a certificate asks at once
    /// instead of waiting out its backoff.
    pub fn control_plane_reachable(&self) {
        if !self.ready() {
            self.retry.notify_waiters();
        }
    }

    fn installed_any(&self) -> bool {
        *self.installed.borrow() > 0
    }

    pub fn renewals(&self) -> u64 {
        self.installed.borrow().saturating_sub(1)
    }

    /// Starts with a stored certificate (before the first renewal).
    pub fn preload(&self, credentials: Credentials) {
        self.current.store(Some(Arc::new(credentials)));
        self.installed.send_modify(|n| *n += 1);
    }

    fn install(&self, credentials: Credentials) {
        self.current.store(Some(Arc::new(credentials)));
        self.installed.send_modify(|n| *n += 1);
    }

    pub fn dump(&self) -> IdentityDump {
        let current = self.current();
        IdentityDump {
            identity: current.as_ref().map(|c| c.identity.to_string()),
            not_after_unix: current
                .as_ref()
                .and_then(|c| c.not_after.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            serial: current.as_ref().map(|c| c.serial.clone()),
            trust_roots: current.as_ref().map(|c| c.roots),
            renewals: self.renewals(),
            source: match self.source.as_ref().map(|s| &s.credential) {
                None => "none (plaintext only)",
                Some(CredentialSource::JoinTokenFile(_)) => "join token",
                Some(CredentialSource::ServiceAccountTokenFile(_)) => "service-account token",
            },
        }
    }
}

/// Gets the first certificate, then renews it for as long as the proxy runs.
pub async fn run(identity: &IdentityState, metrics: &Metrics, mut drain: Drain) {
    let Some(source) = identity.source.clone() else {
        return;
    };
    let mut failures = 0u32;
    loop {
        let wait = match certify(&source).await {
            Ok(mut credentials) => {
                if let (Some(dir), Some(files)) = (&source.state_dir, credentials.files.take()) {
                    if let Err(e) = store(dir, &files) {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot store the workload certificate; a restart without the control plane would have none");
                    }
                }
                failures = 0;
                // At least a second: a clock far behind the CA's must not make a hot loop.
                let renew_in = credentials
                    .renew_at()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .max(Duration::from_secs(1));
                if let Ok(expiry) = credentials.not_after.duration_since(UNIX_EPOCH) {
                    metrics.identity_expiry(expiry.as_secs());
                }
                let first = !identity.installed_any();
                tracing::info!(identity = %credentials.identity, renew_in = ?renew_in, serial = %credentials.serial, "{}", if first { "workload certificate installed" } else { "workload certificate renewed" });
                identity.install(credentials);
                if !first {
                    metrics.identity_renewed(true);
                }
                renew_in
            }
            Err(e) => {
                failures += 1;
                metrics.identity_renewed(false);
                // Full jitter, 500 ms doubling to 30 s; never later than the expiry needs.
                let ceiling = Duration::from_millis(500)
                    .saturating_mul(1 << failures.min(6))
                    .min(Duration::from_secs(30));
                let wait = ceiling.mul_f64(fastrand::f64().max(0.1));
                let left = identity.current().and_then(|c| {
                    c.not_after
                        .duration_since(SystemTime::now())
                        .ok()
                        .map(|d| d.as_secs())
                });
                tracing::warn!(control_plane = %source.control_plane.url, error = %e, retry_in = ?wait, valid_for_secs = ?left, "cannot get a workload certificate");
                wait
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = identity.retry.notified() => {}
            () = drain.signaled() => return,
        }
    }
}

/// One round trip to the CA: a fresh key, a CSR, the signed chain and the trust roots.
pub async fn certify(source: &Source) -> Result<Credentials, CertifyError> {
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .map_err(|e| CertifyError::Credential {
                path: path.clone(),
                source: e,
            })
    };
    let credential = match &source.credential {
        CredentialSource::JoinTokenFile(path) => Credential::JoinToken(read(path)?),
        CredentialSource::ServiceAccountTokenFile(path) => {
            Credential::ServiceAccountToken(read(path)?)
        }
    };
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key)?;
    let channel = source
        .control_plane
        .connect(Some(Duration::from_secs(10)))
        .await?;
    let response = IdentityClient::new(channel)
        .certify(CertifyRequest {
            namespace: source.namespace.clone(),
            service_account: source.service_account.clone(),
            csr: csr.der().to_vec(),
            credential: Some(credential),
        })
        .await?
        .into_inner();
    credentials(response, key)
}

fn credentials(response: CertifyResponse, key: KeyPair) -> Result<Credentials, CertifyError> {
    let chain: Vec<CertificateDer<'static>> = response
        .chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let roots: Vec<CertificateDer<'static>> = response
        .trust_roots
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let credentials = assemble(&chain, key.clone_key(), &roots)?;
    if *credentials.identity != response.identity {
        return Err(CertifyError::Unusable(format!(
            "the certificate names {}, the answer {}",
            credentials.identity, response.identity
        )));
    }
    Ok(credentials.with_files(chain, key, roots))
}

/// Credentials from a chain (leaf first), its key and the trust roots.
fn assemble(
    chain: &[CertificateDer<'static>],
    key: PrivateKeyDer<'static>,
    trust_roots: &[CertificateDer<'static>],
) -> Result<Credentials, CertifyError> {
    let unusable = |why: String| CertifyError::Unusable(why);
    let leaf = chain
        .first()
        .ok_or_else(|| unusable("no certificate in the chain".into()))?;
    let identity = tls::spiffe_id(leaf).map_err(|e| unusable(e.to_string()))?;
    let (serial, not_after) = x509_parser::parse_x509_certificate(leaf)
        .map(|(_, c)| {
            let secs = u64::try_from(c.validity().not_after.timestamp()).unwrap_or(0);
            (
                c.raw_serial_as_string(),
                UNIX_EPOCH + Duration::from_secs(secs),
            )
        })
        .map_err(|e| unusable(format!("unparsable certificate: {e}")))?;
    let mut roots = RootCertStore::empty();
    for root in trust_roots {
        roots
            .add(root.clone())
            .map_err(|e| unusable(format!("bad trust root: {e}")))?;
    }
    let root_count = roots.len();
    let tls = tls::Configs::new(chain.to_vec(), key, roots).map_err(|e| unusable(e.to_string()))?;
    Ok(Credentials {
        identity: Arc::from(identity),
        not_after,
        received: SystemTime::now(),
        serial,
        roots: root_count,
        tls,
        files: None,
    })
}

const CHAIN_FILE: &str = "workload-chain.pem";
const KEY_FILE: &str = "workload-key.pem";
const ROOTS_FILE: &str = "trust-roots.pem";

/// What is written to the state folder, so a restart while the control plane is down still
/// has a certificate (the key file is 0600, like the CA's).
struct Files {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
}

impl Credentials {
    fn with_files(
        mut self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Self {
        self.files = Some(Files { chain, key, roots });
        self
    }
}

fn pem(label: &str, ders: &[&[u8]]) -> String {
    ders.iter()
        .map(|der| ::pem::encode(&::pem::Pem::new(label, der.to_vec())))
        .collect()
}

fn store(dir: &Path, files: &Files) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    let write = |name: &str, text: String| -> std::io::Result<()> {
        let tmp = dir.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))
    };
    let chain: Vec<&[u8]> = files.chain.iter().map(|c| c.as_ref()).collect();
    let roots: Vec<&[u8]> = files.roots.iter().map(|c| c.as_ref()).collect();
    write(KEY_FILE, pem("PRIVATE KEY", &[files.key.secret_der()]))?;
    write(CHAIN_FILE, pem("CERTIFICATE", &chain))?;
    write(ROOTS_FILE, pem("CERTIFICATE", &roots))
}

/// The certificate a previous run stored, if it is still valid and for this workload.
pub fn load_stored(source: &Source) -> Option<Credentials> {
    let dir = source.state_dir.as_deref()?;
    use rustls_pki_types::pem::PemObject;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join(CHAIN_FILE))
        .ok()?
        .collect::<Result<_, _>>()
        .ok()?;
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join(ROOTS_FILE))
        .ok()?
        .collect::<Result<_, _>>()
        .ok()?;
    let key = PrivateKeyDer::from_pem_file(dir.join(KEY_FILE)).ok()?;
    let credentials = match assemble(&chain, key, &roots) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "ignoring an unusable stored certificate");
            return None;
        }
    };
    let expected = format!("/ns/{}/sa/{}", source.namespace, source.service_account);
    if !credentials.identity.ends_with(&expected) {
        tracing::info!(stored = %credentials.identity, "the stored certificate is for another workload; waiting for a new one");
        return None;
    }
    if credentials.not_after <= SystemTime::now() {
        tracing::info!(dir = %dir.display(), "the stored certificate has expired; waiting for a new one");
        return None;
    }
    tracing::info!(identity = %credentials.identity, "serving with the stored certificate until the control plane answers");
    Some(credentials)
}
