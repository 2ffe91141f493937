//! Kubernetes credentials: a proxy's projected service-account token, checked with the
//! TokenReview API (the `kubernetes` cargo feature), through the same kube-rs client as
//! EndpointSlice discovery.
//!
//! The API server answers whether the token is valid, for which audience, and whose it is
//! (`system:serviceaccount:<namespace>:<name>`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};

/// How long the API server has to answer one review.
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

/// Where the control plane finds the API server and its own credentials.
#[derive(Debug, Clone, Default)]
pub struct ApiSettings {
    /// `https://...` (or `http://...` for a local test server); `None`: the cluster this
    /// process runs in.
    pub url: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

/// Where a pod finds its own service-account credentials.
const IN_CLUSTER_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// A kube-rs client for `settings`. The token file is re-read as it rotates.
pub fn client(settings: &ApiSettings) -> Result<kube::Client, ReviewError> {
    let setup = |e: &dyn std::fmt::Display| ReviewError::Setup(e.to_string());
    let config = match &settings.url {
        Some(url) => {
            let uri: http::Uri = url
                .parse()
                .map_err(|e| ReviewError::Setup(format!("bad API server URL `{url}`: {e}")))?;
            if !matches!(uri.scheme_str(), Some("https" | "http")) {
                return Err(ReviewError::Setup(format!(
                    "API server URL `{url}` must be http:// or https://"
                )));
            }
            let dir = Path::new(IN_CLUSTER_DIR);
            let mut config = kube::Config::new(uri.clone());
            let token = settings
                .token_file
                .clone()
                .unwrap_or_else(|| dir.join("token"));
            config.auth_info.token_file = Some(token.to_string_lossy().into_owned());
            if uri.scheme_str() == Some("https") {
                let ca = settings
                    .ca_file
                    .clone()
                    .unwrap_or_else(|| dir.join("ca.crt"));
                let pem = std::fs::read(&ca)
                    .map_err(|e| ReviewError::Setup(format!("{}: {e}", ca.display())))?;
                let roots = ::pem::parse_many(&pem)
                    .map_err(|e| ReviewError::Setup(format!("{}: {e}", ca.display())))?
                    .into_iter()
                    .map(|p| p.into_contents())
                    .collect();
                config.root_cert = Some(roots);
            }
            config
        }
        None => kube::Config::incluster().map_err(|e| setup(&e))?,
    };
    kube::Client::try_from(config).map_err(|e| setup(&e))
}

/// Checks proxies' tokens for one audience.
#[derive(Clone)]
pub struct Reviewer {
    api: Api<TokenReview>,
    audience: String,
}

impl std::fmt::Debug for Reviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reviewer")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl Reviewer {
    pub fn new(client: kube::Client, audience: &str) -> Self {
        Self {
            api: Api::all(client),
            audience: audience.to_string(),
        }
    }

    /// Asks the API server whose `token` is.
    pub async fn review(&self, token: &str) -> Result<ServiceAccount, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let answer =
            tokio::time::timeout(TIMEOUT, self.api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| ReviewError::Api(format!("no answer within {TIMEOUT:?}")))?
                .map_err(|e| ReviewError::Api(e.to_string()))?;
        self.account(answer.status.unwrap_or_default())
    }

    fn account(&self, status: TokenReviewStatus) -> Result<ServiceAccount, ReviewError> {
        if status.authenticated != Some(true) {
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
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .map(|(namespace, name)| ServiceAccount {
                namespace: namespace.to_string(),
                name: name.to_string(),
            })
            .ok_or_else(|| ReviewError::Rejected(format!("`{username}` is not a service account")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    /// A client that is never used: `account` only reads the answer.
    fn reviewer() -> Reviewer {
        let config = kube::Config::new("http://127.0.0.1:1".parse().expect("uri"));
        let client = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async { kube::Client::try_from(config).expect("client") });
        Reviewer::new(client, "sidemesh")
    }

    #[test]
    fn a_recorded_review_names_the_service_account() {
        // An API server answer in the shape of authentication.k8s.io/v1 (tests/fixtures).
        let answer = include_str!("../../tests/fixtures/tokenreview-authenticated.json");
        let review: TokenReview = serde_json::from_str(answer).expect("parse");
        assert_eq!(
            reviewer()
                .account(review.status.expect("status"))
                .expect("valid"),
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
        let err = reviewer()
            .account(review.status.expect("status"))
            .expect_err("rejected");
        assert!(err.to_string().contains("expired"), "{err}");

        let user = |name: &str| UserInfo {
            username: Some(name.into()),
            ..UserInfo::default()
        };
        let wrong_audience = TokenReviewStatus {
            authenticated: Some(true),
            user: Some(user("system:serviceaccount:demo:order-service")),
            audiences: Some(vec!["https://kubernetes.default.svc".into()]),
            error: None,
        };
        let err = reviewer().account(wrong_audience).expect_err("audience");
        assert!(err.to_string().contains("audience `sidemesh`"), "{err}");

        let admin = TokenReviewStatus {
            authenticated: Some(true),
            user: Some(user("kubernetes-admin")),
            audiences: None,
            error: None,
        };
        let err = reviewer().account(admin).expect_err("not an SA");
        assert!(err.to_string().contains("not a service account"), "{err}");
    }
}
