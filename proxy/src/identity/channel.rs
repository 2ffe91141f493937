//! The connection to the control plane. Certificate requests carry the workload's credential
//! (a service-account token or the join token) and the answers carry its certificate and the
//! routing config, so the connection is TLS and the control plane's certificate is checked
//! against the mesh's trust bundle only (never the system's roots), for the name the control
//! plane serves (its Service name in a cluster, `localhost` on one machine). Plaintext needs
//! `--insecure-plaintext` and is logged as a warning at every connection.

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Where the trust bundle comes from.
#[derive(Debug, Clone)]
pub enum Bundle {
    /// A PEM file (e.g. a mounted ConfigMap), read at every connection so a rotated bundle
    /// takes effect without a restart.
    File(PathBuf),
    /// PEM text (the `SIDEMESH_TRUST_BUNDLE` variable `sidemesh inject` sets).
    Pem(String),
}

#[derive(Debug, Clone)]
struct Tls {
    bundle: Bundle,
    server_name: String,
}

/// How to reach the control plane.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    pub url: String,
    tls: Option<Tls>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("--control-plane `{url}` is not a URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error(
        "--control-plane `{url}` is plaintext: the credential and the workload's config would cross the network in clear. Use https:// with --trust-bundle, or pass --insecure-plaintext (debugging only)"
    )]
    Plaintext { url: String },
    #[error(
        "--control-plane `{url}` is TLS, but no trust bundle was given to check its certificate: pass --trust-bundle <file> (or set SIDEMESH_TRUST_BUNDLE to the PEM text)"
    )]
    NoBundle { url: String },
    #[error(
        "--control-plane `{url}`: the scheme must be https:// (or http:// with --insecure-plaintext)"
    )]
    Scheme { url: String },
}

/// Why a connection failed; the message carries every cause (the TLS alert, the certificate
/// problem), since "transport error" alone helps nobody.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read the trust bundle {path}: {source}")]
    Bundle {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Transport(String),
}

impl From<tonic::transport::Error> for ConnectError {
    fn from(e: tonic::transport::Error) -> Self {
        ConnectError::Transport(error_chain(&e))
    }
}

/// An error and its causes, `a: b: c`, without repeats.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

impl ControlPlane {
    /// Checks the settings: `https://` with a bundle, or `http://` only when plaintext was
    /// asked for. `server_name` defaults to the URL's host.
    pub fn new(
        url: &str,
        bundle: Option<Bundle>,
        server_name: Option<&str>,
        insecure_plaintext: bool,
    ) -> Result<Self, SetupError> {
        let uri: http::Uri =
            url.parse()
                .map_err(|e: http::uri::InvalidUri| SetupError::BadUrl {
                    url: url.to_string(),
                    reason: e.to_string(),
                })?;
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
        match uri.scheme_str() {
            Some("http") if insecure_plaintext => Ok(Self {
                url: url.to_string(),
                tls: None,
            }),
            Some("http") => Err(SetupError::Plaintext {
                url: url.to_string(),
            }),
            Some("https") => {
                let bundle = bundle.ok_or_else(|| SetupError::NoBundle {
                    url: url.to_string(),
                })?;
                Ok(Self {
                    url: url.to_string(),
                    tls: Some(Tls {
                        bundle,
                        server_name: server_name.unwrap_or(host).to_string(),
                    }),
                })
            }
            _ => Err(SetupError::Scheme {
                url: url.to_string(),
            }),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A gRPC channel; `timeout` bounds each request on it.
    pub async fn connect(&self, timeout: Option<Duration>) -> Result<Channel, ConnectError> {
        let mut endpoint = Endpoint::from_shared(self.url.clone())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        if let Some(timeout) = timeout {
            endpoint = endpoint.timeout(timeout);
        }
        match &self.tls {
            Some(tls) => {
                let pem = match &tls.bundle {
                    Bundle::Pem(pem) => pem.clone(),
                    Bundle::File(path) => {
                        std::fs::read_to_string(path).map_err(|source| ConnectError::Bundle {
                            path: path.clone(),
                            source,
                        })?
                    }
                };
                // Only the bundle's roots: no system roots, no webpki roots.
                let config = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(pem))
                    .domain_name(tls.server_name.clone());
                endpoint = endpoint.tls_config(config)?;
            }
            None => tracing::warn!(
                control_plane = %self.url,
                "PLAINTEXT connection to the control plane (--insecure-plaintext): the credential and the config cross the network unencrypted"
            ),
        }
        Ok(endpoint.connect().await?)
    }
}
