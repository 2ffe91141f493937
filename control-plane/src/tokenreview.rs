//! Kubernetes credentials: a proxy's projected service-account token, checked with the
//! TokenReview API (the `kubernetes` cargo feature).
//!
//! The control plane posts the token to `/apis/authentication.k8s.io/v1/tokenreviews` with its
//! own service-account token; the API server answers whether it is valid, for which audience,
//! and whose it is (`system:serviceaccount:<namespace>:<name>`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use tokio::net::TcpStream;

/// Where a pod finds its own service-account credentials.
const IN_CLUSTER_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Largest TokenReview answer read.
const MAX_ANSWER: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The API server says the token is not acceptable.
    #[error("{0}")]
    Rejected(String),
    /// The API server could not be asked (the proxy should retry).
    #[error("TokenReview API: {0}")]
    Api(String),
    #[error("kubernetes client setup: {0}")]
    Setup(String),
}

/// A service account, as the API server named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

pub struct Reviewer {
    api: Uri,
    token_file: PathBuf,
    tls: Option<tokio_rustls::TlsConnector>,
    audience: String,
}

impl std::fmt::Debug for Reviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reviewer")
            .field("api", &self.api)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
struct TokenReview {
    #[serde(default)]
    status: ReviewStatus,
}

#[derive(Debug, Default, Deserialize)]
struct ReviewStatus {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    user: Option<UserInfo>,
    #[serde(default)]
    audiences: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct UserInfo {
    #[serde(default)]
    username: String,
}

impl Reviewer {
    /// `api`: the API server (`https://...`, or `http://...` for a local test server);
    /// `token_file`: the control plane's own token; `ca_file`: the API server's CA (https).
    pub fn new(
        api: &str,
        token_file: &Path,
        ca_file: Option<&Path>,
        audience: &str,
    ) -> Result<Self, ReviewError> {
        let api: Uri = api
            .parse()
            .map_err(|e| ReviewError::Setup(format!("bad API server URL `{api}`: {e}")))?;
        let tls = match api.scheme_str() {
            Some("https") => {
                let mut roots = rustls::RootCertStore::empty();
                let ca = ca_file.ok_or_else(|| {
                    ReviewError::Setup("an https API server needs its CA file".into())
                })?;
                for cert in CertificateDer::pem_file_iter(ca)
                    .map_err(|e| ReviewError::Setup(format!("{}: {e}", ca.display())))?
                {
                    let cert =
                        cert.map_err(|e| ReviewError::Setup(format!("{}: {e}", ca.display())))?;
                    roots
                        .add(cert)
                        .map_err(|e| ReviewError::Setup(format!("{}: {e}", ca.display())))?;
                }
                let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| ReviewError::Setup(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
                Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
            }
            Some("http") => None,
            _ => {
                return Err(ReviewError::Setup(format!(
                    "API server URL `{api}` must be http:// or https://"
                )));
            }
        };
        Ok(Self {
            api,
            token_file: token_file.to_path_buf(),
            tls,
            audience: audience.to_string(),
        })
    }

    /// The API server of the cluster this process runs in, from the pod's environment.
    pub fn in_cluster(audience: &str) -> Result<Self, ReviewError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .map_err(|_| ReviewError::Setup("KUBERNETES_SERVICE_HOST is not set".into()))?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let dir = Path::new(IN_CLUSTER_DIR);
        Self::new(
            &format!("https://{host}:{port}"),
            &dir.join("token"),
            Some(&dir.join("ca.crt")),
            audience,
        )
    }

    /// Asks the API server whose `token` is.
    pub async fn review(&self, token: &str) -> Result<ServiceAccount, ReviewError> {
        let own = std::fs::read_to_string(&self.token_file).map_err(|e| {
            ReviewError::Setup(format!(
                "cannot read the control plane's token {}: {e}",
                self.token_file.display()
            ))
        })?;
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": { "token": token, "audiences": [self.audience] },
        });
        let answer = tokio::time::timeout(TIMEOUT, self.post(own.trim(), body.to_string()))
            .await
            .map_err(|_| ReviewError::Api(format!("no answer within {TIMEOUT:?}")))??;
        let review: TokenReview = serde_json::from_slice(&answer)
            .map_err(|e| ReviewError::Api(format!("unreadable TokenReview answer: {e}")))?;
        self.account(review.status)
    }

    fn account(&self, status: ReviewStatus) -> Result<ServiceAccount, ReviewError> {
        if !status.authenticated {
            return Err(ReviewError::Rejected(
                status
                    .error
                    .unwrap_or_else(|| "the token is not valid".into()),
            ));
        }
        if let Some(audiences) = &status.audiences {
            if !audiences.contains(&self.audience) {
                return Err(ReviewError::Rejected(format!(
                    "the token is not for the audience `{}`",
                    self.audience
                )));
            }
        }
        let username = status.user.map(|u| u.username).unwrap_or_default();
        let account = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .map(|(namespace, name)| ServiceAccount {
                namespace: namespace.to_string(),
                name: name.to_string(),
            });
        account
            .ok_or_else(|| ReviewError::Rejected(format!("`{username}` is not a service account")))
    }

    /// `GET path` with the control plane's own token (e.g. a list of EndpointSlices).
    pub async fn get(&self, path: &str) -> Result<Bytes, ReviewError> {
        let own = std::fs::read_to_string(&self.token_file).map_err(|e| {
            ReviewError::Setup(format!(
                "cannot read the control plane's token {}: {e}",
                self.token_file.display()
            ))
        })?;
        tokio::time::timeout(
            TIMEOUT,
            self.request(http::Method::GET, path, own.trim(), None),
        )
        .await
        .map_err(|_| ReviewError::Api(format!("no answer within {TIMEOUT:?}")))?
    }

    async fn post(&self, bearer: &str, body: String) -> Result<Bytes, ReviewError> {
        self.request(
            http::Method::POST,
            "/apis/authentication.k8s.io/v1/tokenreviews",
            bearer,
            Some(body),
        )
        .await
    }

    async fn request(
        &self,
        method: http::Method,
        path: &str,
        bearer: &str,
        body: Option<String>,
    ) -> Result<Bytes, ReviewError> {
        let api = |e: &dyn std::fmt::Display| ReviewError::Api(e.to_string());
        let host = self
            .api
            .host()
            .unwrap_or("localhost")
            .trim_matches(['[', ']']);
        let port = self
            .api
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| api(&e))?;
        let _ = tcp.set_nodelay(true);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(
                header::HOST,
                self.api.authority().map_or(host, |a| a.as_str()),
            )
            .header(header::AUTHORIZATION, format!("Bearer {bearer}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| api(&e))?;
        let resp = match &self.tls {
            Some(tls) => {
                let name = ServerName::try_from(host.to_string()).map_err(|e| api(&e))?;
                let stream = tls.connect(name, tcp).await.map_err(|e| api(&e))?;
                send(TokioIo::new(stream), req).await?
            }
            None => send(TokioIo::new(tcp), req).await?,
        };
        Ok(resp)
    }
}

async fn send<I>(io: I, req: Request<Full<Bytes>>) -> Result<Bytes, ReviewError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let api = |e: &dyn std::fmt::Display| ReviewError::Api(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| api(&e))?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| api(&e))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| api(&*e))?
        .to_bytes();
    if !status.is_success() {
        return Err(ReviewError::Api(format!(
            "{status}: {}",
            String::from_utf8_lossy(&body)
                .chars()
                .take(300)
                .collect::<String>()
        )));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reviewer() -> Reviewer {
        Reviewer::new(
            "http://127.0.0.1:1",
            Path::new("/nonexistent"),
            None,
            "sidemesh",
        )
        .expect("reviewer")
    }

    #[test]
    fn a_recorded_review_names_the_service_account() {
        // An API server answer in the shape of authentication.k8s.io/v1 (tests/fixtures).
        let answer = include_str!("../../tests/fixtures/tokenreview-authenticated.json");
        let review: TokenReview = serde_json::from_str(answer).expect("parse");
        assert_eq!(
            reviewer().account(review.status).expect("valid"),
            ServiceAccount {
                namespace: "demo".into(),
                name: "order-service".into()
            }
        );
    }

    #[test]
    fn rejected_and_foreign_reviews_say_why() {
        let answer = include_str!("../../tests/fixtures/tokenreview-expired.json");
        let review: TokenReview = serde_json::from_str(answer).expect("parse");
        let err = reviewer().account(review.status).expect_err("rejected");
        assert!(err.to_string().contains("expired"), "{err}");

        let wrong_audience = ReviewStatus {
            authenticated: true,
            error: None,
            user: Some(UserInfo {
                username: "system:serviceaccount:demo:order-service".into(),
            }),
            audiences: Some(vec!["https://kubernetes.default.svc".into()]),
        };
        let err = reviewer().account(wrong_audience).expect_err("audience");
        assert!(err.to_string().contains("audience `sidemesh`"), "{err}");

        let user = ReviewStatus {
            authenticated: true,
            error: None,
            user: Some(UserInfo {
                username: "kubernetes-admin".into(),
            }),
            audiences: None,
        };
        let err = reviewer().account(user).expect_err("not an SA");
        assert!(err.to_string().contains("not a service account"), "{err}");
    }
}
