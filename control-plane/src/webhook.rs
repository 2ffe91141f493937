//! The mutating admission webhook: `sidemesh inject`'s transformation, as a JSONPatch in an
//! AdmissionReview v1 response, served over TLS (`POST /mutate`).
//!
//! The API server calls it for pods created in namespaces labelled
//! `sidemesh.io/inject=enabled` (the MutatingWebhookConfiguration's `namespaceSelector`).
//! Its serving certificate is signed by the mesh CA for the control plane's Service name,
//! unless one is given; the configuration's `caBundle` is then the CA's root.

use std::convert::Infallible;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::inject::{InjectConfig, Outcome, inject_template};

/// Largest AdmissionReview accepted (a pod spec is far smaller).
const MAX_BODY: usize = 4 << 20;

/// The patch for one AdmissionReview request (`None` when the pod is left alone), and the
/// warnings the API server shows the user (`kubectl` prints them): why a pod was left alone,
/// or what to watch out for. A pod is never blocked: the webhook only adds or skips.
pub fn patch_for(object: &Value, config: &InjectConfig) -> (Option<Vec<Value>>, Vec<String>) {
    if object.get("kind").and_then(Value::as_str) != Some("Pod") {
        return (None, Vec::new());
    }
    let mut pod = object.clone();
    let owner = object
        .pointer("/metadata/generateName")
        .and_then(Value::as_str)
        .map(|g| g.trim_end_matches('-'))
        .or_else(|| object.pointer("/metadata/name").and_then(Value::as_str))
        .unwrap_or("pod")
        .to_string();
    match inject_template(&mut pod, &owner, false, config) {
        Outcome::Injected { notes } => {
            let patch = vec![
                json!({"op": "replace", "path": "/spec", "value": pod["spec"]}),
                json!({"op": "add", "path": "/metadata/annotations", "value": pod["metadata"]["annotations"]}),
            ];
            let warnings = notes
                .into_iter()
                .map(|n| format!("sidemesh: {n}"))
                .collect();
            (Some(patch), warnings)
        }
        Outcome::Skipped(why) | Outcome::Refused(why) => {
            (None, vec![format!("sidemesh: not injected: {why}")])
        }
    }
}

/// The AdmissionReview answering `review`.
pub fn review(review: &Value, config: &InjectConfig) -> Result<Value, String> {
    let request = review
        .get("request")
        .ok_or("an AdmissionReview needs a `request`")?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .ok_or("the request has no `uid`")?;
    let mut response = json!({"uid": uid, "allowed": true});
    if let Some(object) = request.get("object") {
        let (patch, warnings) = patch_for(object, config);
        if let Some(patch) = patch {
            let patch = serde_json::to_vec(&patch).map_err(|e| e.to_string())?;
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
        }
        if !warnings.is_empty() {
            response["warnings"] = json!(warnings);
        }
    }
    Ok(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

/// Serves `POST /mutate` over TLS until `stop`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    config: Arc<InjectConfig>,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => continue,
            },
            () = crate::hub::stopped(&mut stop) => return,
        };
        let (acceptor, config) = (acceptor.clone(), config.clone());
        tokio::spawn(async move {
            let stream = match acceptor.accept(stream).await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(client = %peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
            };
            let service = service_fn(move |req| {
                let config = config.clone();
                async move { Ok::<_, Infallible>(answer(req, &config).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(req: Request<Incoming>, config: &InjectConfig) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if req.method() != Method::POST || req.uri().path() != "/mutate" {
        return reply(
            StatusCode::NOT_FOUND,
            r#"{"error":"POST an AdmissionReview to /mutate"}"#.into(),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": e.to_string()}).to_string(),
            );
        }
    };
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("not JSON: {e}")}).to_string(),
            );
        }
    };
    match review(&parsed, config) {
        Ok(answer) => reply(StatusCode::OK, answer.to_string()),
        Err(why) => reply(StatusCode::BAD_REQUEST, json!({"error": why}).to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> InjectConfig {
        InjectConfig {
            trust_bundle: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            ..InjectConfig::default()
        }
    }

    #[test]
    fn a_pod_gets_a_patch_and_an_opted_out_pod_none() {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "orders-7d9f8b6c5d-", "labels": {"app": "order-service"}},
            "spec": {"containers": [{"name": "app", "image": "orders:1", "ports": [{"containerPort": 8082}]}]}
        });
        let answer = review(
            &json!({"request": {"uid": "u-1", "object": pod}}),
            &config(),
        )
        .expect("review");
        assert_eq!(answer["response"]["uid"], "u-1");
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
        let mut opted = pod.clone();
        opted["metadata"]["annotations"] = json!({"sidemesh.io/inject": "disabled"});
        let answer = review(
            &json!({"request": {"uid": "u-2", "object": opted}}),
            &config(),
        )
        .expect("review");
        assert!(answer["response"].get("patch").is_none());
        assert!(
            answer["response"]["warnings"][0]
                .as_str()
                .is_some_and(|w| w.contains("opted out")),
            "{answer}"
        );
        let mut host = pod.clone();
        host["spec"]["hostNetwork"] = json!(true);
        let answer = review(
            &json!({"request": {"uid": "u-3", "object": host}}),
            &config(),
        )
        .expect("review");
        assert_eq!(answer["response"]["allowed"], true, "never blocked");
        assert!(answer["response"].get("patch").is_none());
        assert!(review(&json!({}), &config()).is_err());
    }
}
