//! The control plane's own TLS certificate, for the proxies' gRPC API and the admission
//! webhook: issued by the mesh CA for `--server-names` and renewed at about 70 % of its life,
//! or read from `--tls-cert`/`--tls-key` (e.g. from cert-manager) and re-read when the files
//! change. New handshakes use the newest certificate; open connections keep theirs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

use crate::ca::Authority;

/// The names a generated certificate carries by default: the Service of `sidemesh install`,
/// and loopback for one machine (`sidemesh up`, tests).
pub const DEFAULT_SERVER_NAMES: &str = "sidemesh-control-plane.sidemesh-system.svc,sidemesh-control-plane.sidemesh-system.svc.cluster.local,localhost,127.0.0.1,::1";

/// How long a generated serving certificate is valid.
pub const LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("cannot issue the control plane's certificate: {0}")]
    Issue(#[from] crate::ca::SignError),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("the certificate and key do not go together: {0}")]
    Key(rustls::Error),
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Issued here by the mesh CA for these names.
    Issued { names: Vec<String> },
    /// Files, re-read when they change.
    Files { cert: PathBuf, key: PathBuf },
}

/// The certificate in force, swapped atomically.
#[derive(Debug)]
pub struct ServingCert {
    current: ArcSwap<CertifiedKey>,
    /// When the current certificate was made (issued) or its files last changed.
    stamp: ArcSwap<Option<SystemTime>>,
    not_after: ArcSwap<SystemTime>,
    source: Source,
    ca: Arc<Authority>,
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, ServingError> {
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider).map_err(ServingError::Key)
}

fn not_after(cert: &CertificateDer<'_>) -> SystemTime {
    x509_parser::parse_x509_certificate(cert)
        .ok()
        .and_then(|(_, c)| u64::try_from(c.validity().not_after.timestamp()).ok())
        .map_or(SystemTime::UNIX_EPOCH, |secs| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
        })
}

fn read_files(
    cert: &PathBuf,
    key: &PathBuf,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ServingError> {
    let bad = |path: &PathBuf, reason: String| ServingError::File {
        path: path.clone(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert, "no certificate in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
    Ok((chain, key_der))
}

fn modified(paths: &[&PathBuf]) -> Option<SystemTime> {
    paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max()
}

impl ServingCert {
    pub fn new(source: Source, ca: Arc<Authority>) -> Result<Arc<Self>, ServingError> {
        let (key, stamp) = Self::make(&source, &ca)?;
        let expiry = not_after(&key.cert[0]);
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(key),
            stamp: ArcSwap::from_pointee(stamp),
            not_after: ArcSwap::from_pointee(expiry),
            source,
            ca,
        }))
    }

    fn make(
        source: &Source,
        ca: &Authority,
    ) -> Result<(CertifiedKey, Option<SystemTime>), ServingError> {
        match source {
            Source::Issued { names } => {
                let (chain, key) = ca.issue_server(names, LIFETIME)?;
                Ok((certified(chain, key)?, Some(SystemTime::now())))
            }
            Source::Files { cert, key } => {
                let stamp = modified(&[cert, key]);
                let (chain, key) = read_files(cert, key)?;
                Ok((certified(chain, key)?, stamp))
            }
        }
    }

    /// A TLS server configuration that always presents the newest certificate.
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(self.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    pub fn not_after(&self) -> SystemTime {
        **self.not_after.load()
    }

    /// Renews an issued certificate at about 70 % of its life; re-reads changed files every
    /// 2 s. A failure keeps the certificate in force and is retried.
    pub async fn maintain(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let wait = match &self.source {
                Source::Issued { .. } => {
                    let made = (**self.stamp.load()).unwrap_or_else(SystemTime::now);
                    let renew = made + LIFETIME.mul_f64(0.7);
                    renew
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .max(Duration::from_secs(1))
                }
                Source::Files { .. } => Duration::from_secs(2),
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = crate::hub::stopped(&mut stop) => return,
            }
            if let Source::Files { cert, key } = &self.source {
                if modified(&[cert, key]) == **self.stamp.load() {
                    continue;
                }
            }
            match Self::make(&self.source, &self.ca) {
                Ok((key, stamp)) => {
                    let expiry = not_after(&key.cert[0]);
                    self.current.store(Arc::new(key));
                    self.stamp.store(Arc::new(stamp));
                    self.not_after.store(Arc::new(expiry));
                    tracing::info!("control-plane serving certificate renewed");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the control plane's serving certificate; keeping the one in force")
                }
            }
        }
    }
}
