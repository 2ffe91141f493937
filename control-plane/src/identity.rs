//! The gRPC identity service: checks a proxy's credential, then has the CA sign its CSR.
//!
//! Credentials:
//! - a join token (local meshes): a secret shared with the proxies through a file; it may
//!   ask for any identity, like a cluster-admin kubeconfig would;
//! - a Kubernetes service-account token for the mesh audience, checked with the TokenReview
//!   API (`tokenreview`, the `kubernetes` feature); it proves exactly one identity.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use sidemesh_api::v1::certify_request::Credential;
use sidemesh_api::v1::identity_server::Identity;
use sidemesh_api::v1::{CertifyRequest, CertifyResponse};
use tonic::{Request, Response, Status};

use crate::ca::{Authority, SignError};
use crate::hub::Hub;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the join token {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the join token {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the join token file {path} is empty")]
    Empty { path: PathBuf },
}

/// The join token: read from `path`, or generated there (0600) when the file does not exist.
pub fn join_token(path: &Path) -> Result<String, TokenError> {
    if !path.exists() {
        let token: String = crate::ca::random_bytes::<32>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| TokenError::Write {
                path: path.to_path_buf(),
                source,
            })?;
        }
        crate::ca::write_private(path, format!("{token}\n").as_bytes()).map_err(|source| {
            TokenError::Write {
                path: path.to_path_buf(),
                source,
            }
        })?;
        tracing::info!(path = %path.display(), "generated a join token for local proxies");
    }
    let token = std::fs::read_to_string(path)
        .map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .trim()
        .to_string();
    if token.is_empty() {
        return Err(TokenError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(token)
}

#[derive(Clone)]
pub struct IdentityService {
    ca: Arc<Authority>,
    join_token: Option<Arc<str>>,
    hub: Arc<Hub>,
    #[cfg(feature = "kubernetes")]
    reviewer: Option<Arc<crate::tokenreview::Reviewer>>,
}

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService")
            .field("ca", &self.ca)
            .field(
                "join_token",
                &self.join_token.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

impl IdentityService {
    pub fn new(ca: Arc<Authority>, join_token: Option<String>, hub: Arc<Hub>) -> Self {
        Self {
            ca,
            join_token: join_token.map(Arc::from),
            hub,
            #[cfg(feature = "kubernetes")]
            reviewer: None,
        }
    }

    #[cfg(feature = "kubernetes")]
    pub fn with_reviewer(mut self, reviewer: Option<Arc<crate::tokenreview::Reviewer>>) -> Self {
        self.reviewer = reviewer;
        self
    }

    /// Checks the credential against the identity asked for.
    async fn authenticate(&self, req: &CertifyRequest) -> Result<(), Status> {
        match &req.credential {
            Some(Credential::JoinToken(token)) => match &self.join_token {
                Some(expected) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(()),
                Some(_) => Err(Status::unauthenticated("the join token is not valid")),
                None => Err(Status::unauthenticated(
                    "this control plane does not accept join tokens",
                )),
            },
            #[cfg(feature = "kubernetes")]
            Some(Credential::ServiceAccountToken(token)) => {
                use crate::tokenreview::ReviewError;
                let Some(reviewer) = &self.reviewer else {
                    return Err(Status::unauthenticated(
                        "this control plane does not check service-account tokens (no Kubernetes API configured)",
                    ));
                };
                let account = reviewer.review(token).await.map_err(|e| match e {
                    ReviewError::Rejected(why) => {
                        Status::unauthenticated(format!("service-account token rejected: {why}"))
                    }
                    other => Status::unavailable(other.to_string()),
                })?;
                if account.namespace != req.namespace || account.name != req.service_account {
                    return Err(Status::permission_denied(format!(
                        "the token belongs to {}/{}, not {}/{}",
                        account.namespace, account.name, req.namespace, req.service_account
                    )));
                }
                Ok(())
            }
            #[cfg(not(feature = "kubernetes"))]
            Some(Credential::ServiceAccountToken(_)) => Err(Status::unauthenticated(
                "service-account tokens need the control plane's Kubernetes support; use a join token",
            )),
            None => Err(Status::unauthenticated(
                "a credential (join token or service-account token) is required",
            )),
        }
    }
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let req = request.into_inner();
        if let Err(status) = self.authenticate(&req).await {
            self.hub.metrics.certificates_refused.inc();
            tracing::warn!(namespace = %req.namespace, service_account = %req.service_account, reason = %status.message(), "refused a certificate request");
            return Err(status);
        }
        // The trust domain comes from the config: without one, a certificate could name the
        // wrong domain for its whole life.
        let trust_domain = match self.hub.store.current() {
            Some(config) => config.mesh.settings.trust_domain.clone(),
            None => {
                return Err(Status::unavailable(
                    "no valid routing config yet, so the trust domain is unknown; retry",
                ));
            }
        };
        let issued = self
            .ca
            .sign(
                &req.csr,
                &trust_domain,
                &req.namespace,
                &req.service_account,
            )
            .map_err(|e| match e {
                SignError::BadRequest(_) | SignError::BadName(_) => {
                    Status::invalid_argument(e.to_string())
                }
                SignError::Sign(_) => Status::internal(e.to_string()),
            })?;
        self.hub.metrics.certificates_issued.inc();
        tracing::info!(identity = %issued.identity, lifetime = ?self.ca.lifetime, "issued a workload certificate");
        let not_after = issued
            .not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Ok(Response::new(CertifyResponse {
            identity: issued.identity,
            chain: issued.chain.into_iter().map(|c| c.to_vec()).collect(),
            trust_roots: self.ca.roots().iter().map(|c| c.to_vec()).collect(),
            not_after,
        }))
    }
}
