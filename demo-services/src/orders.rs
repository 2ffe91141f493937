//! order-service: takes orders and embeds the user it looks up in user-service over gRPC.
//!
//! `POST /orders {user_id, items}` -> 201 with the order; 422 for an unknown user; 503 when
//! user-service cannot be reached or is unavailable; 504 when it does not answer in time.
//! `GET /orders`, `GET /orders/{id}`, `GET /healthz`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router, middleware};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use crate::faults::{self, Faults};
use crate::proto::GetUserRequest;
use crate::proto::user_service_client::UserServiceClient;
use crate::telemetry;
use crate::users::User;

/// Orders kept in memory; the oldest are dropped beyond this, so a long demo stays bounded.
pub const MAX_ORDERS: usize = 10_000;
/// How long an order waits for user-service before answering 504.
pub const USER_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    pub quantity: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: u64,
    pub user: User,
    pub items: Vec<Item>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    pub user_id: u64,
    pub items: Vec<Item>,
}

#[derive(Debug, Clone)]
struct AppState {
    orders: Arc<RwLock<BTreeMap<u64, Order>>>,
    next_id: Arc<AtomicU64>,
    users: UserServiceClient<Channel>,
}

/// A lazily connected channel to user-service at `url` (e.g. `http://127.0.0.1:8081`, or the
/// local sidecar's listener when meshed); connection problems surface per request as 503.
pub fn user_service_channel(url: &str) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| anyhow::anyhow!("invalid user-service address `{url}`: {e}"))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(USER_LOOKUP_TIMEOUT);
    Ok(endpoint.connect_lazy())
}

/// The whole service: API routes (with faults and spans) plus an unfaulted `/healthz`.
pub fn app(users: Channel, faults: Arc<Faults>) -> Router {
    let state = AppState {
        orders: Arc::default(),
        next_id: Arc::new(AtomicU64::new(1)),
        users: UserServiceClient::new(users),
    };
    let api = Router::new()
        .route("/orders", get(list_orders).post(create_order))
        .route("/orders/{id}", get(get_order))
        .with_state(state)
        .layer(middleware::from_fn_with_state(faults, faults::inject))
        .layer(middleware::from_fn(telemetry::server_span));
    api.route("/healthz", get(|| async { "ok" }))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

async fn list_orders(State(state): State<AppState>) -> Json<Vec<Order>> {
    Json(state.orders.read().await.values().cloned().collect())
}

async fn get_order(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("invalid order id `{id}`: expected a number"),
        );
    };
    match state.orders.read().await.get(&id) {
        Some(order) => Json(order.clone()).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no order {id}")),
    }
}

async fn create_order(
    State(state): State<AppState>,
    body: Result<Json<NewOrder>, JsonRejection>,
) -> Response {
    let Json(new) = match body {
        Ok(body) => body,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    if new.items.is_empty()
        || new
            .items
            .iter()
            .any(|i| i.quantity == 0 || i.sku.is_empty())
    {
        return error(
            StatusCode::BAD_REQUEST,
            "an order needs at least one item, each with a `sku` and a `quantity` of 1 or more",
        );
    }
    let user = match lookup_user(state.users.clone(), new.user_id).await {
        Ok(user) => user,
        Err(resp) => return resp,
    };
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let order = Order {
        id,
        user,
        items: new.items,
    };
    let mut orders = state.orders.write().await;
    if orders.len() >= MAX_ORDERS {
        orders.pop_first();
    }
    orders.insert(id, order.clone());
    (StatusCode::CREATED, Json(order)).into_response()
}

/// One gRPC call to user-service in a client span, with the trace context passed on.
async fn lookup_user(mut client: UserServiceClient<Channel>, id: u64) -> Result<User, Response> {
    let span = tracing::info_span!(
        "grpc",
        otel.name = "demo.users.v1.UserService/GetUser",
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = "demo.users.v1.UserService",
        rpc.method = "GetUser",
        rpc.grpc.status_code = tracing::field::Empty,
    );
    let mut req = tonic::Request::new(GetUserRequest { id });
    req.set_timeout(USER_LOOKUP_TIMEOUT);
    let mut headers = std::mem::take(req.metadata_mut()).into_headers();
    telemetry::inject(&span, &mut headers);
    *req.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers);

    let result = client.get_user(req).instrument(span.clone()).await;
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    };
    span.record("rpc.grpc.status_code", code as i32);
    match result {
        Ok(resp) => {
            let u = resp.into_inner();
            Ok(User {
                id: u.id,
                name: u.name,
                email: u.email,
            })
        }
        Err(status) => Err(match status.code() {
            tonic::Code::NotFound => error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("unknown user {id}"),
            ),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => error(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "user-service did not answer within {}s",
                    USER_LOOKUP_TIMEOUT.as_secs()
                ),
            ),
            // A connection that breaks under a call in flight (user-service killed) comes
            // back as `Unknown: transport error`: user-service is as unavailable as when the
            // connect fails.
            tonic::Code::Unavailable | tonic::Code::Unknown if unavailable(&status) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("user-service unavailable: {}", status.message()),
            ),
            // Backpressure passes on as backpressure: a 429 tells the caller to slow down,
            // where a 5xx would look like a broken order-service (and get it ejected).
            tonic::Code::ResourceExhausted => error(
                StatusCode::TOO_MANY_REQUESTS,
                format!("user-service is limiting our calls: {}", status.message()),
            ),
            other => error(
                StatusCode::BAD_GATEWAY,
                format!("user-service failed: {other:?}: {}", status.message()),
            ),
        }),
    }
}

/// Whether a failed call means user-service could not be reached: `Unavailable`, or the
/// transport failing under the call (tonic's `Unknown` with the message "transport error").
fn unavailable(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable || status.message() == "transport error"
}
