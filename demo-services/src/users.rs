//! user-service: a small in-memory user directory over HTTP/JSON and gRPC, on one port.
//!
//! HTTP: `GET /users`, `GET /users/{id}`, `POST /users {name, email}`, `GET /healthz`.
//! gRPC: `demo.users.v1.UserService/GetUser` and `/ListUsers` (server streaming).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router, middleware};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;
use tokio_stream::Stream;

use crate::faults::{self, Faults};
use crate::proto;
use crate::proto::user_service_server::{UserService, UserServiceServer};
use crate::telemetry;

/// Users kept in memory; beyond this many, creating a user is refused (507) rather than growing without bound.
pub const MAX_USERS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: u64,
    pub name: String,
    pub email: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub name: String,
    pub email: String,
}

/// The directory, shared by the HTTP and gRPC handlers.
#[derive(Debug, Clone)]
pub struct Directory {
    users: Arc<RwLock<BTreeMap<u64, User>>>,
}

impl Directory {
    /// A directory holding the three demo users (ids 1, 2 and 3).
    pub fn with_demo_users() -> Self {
        let users = [
            (1, "Ada Lovelace", "ada@example.com"),
            (2, "Grace Hopper", "grace@example.com"),
            (3, "Alan Turing", "alan@example.com"),
        ]
        .into_iter()
        .map(|(id, name, email)| {
            (
                id,
                User {
                    id,
                    name: name.into(),
                    email: email.into(),
                },
            )
        })
        .collect();
        Self {
            users: Arc::new(RwLock::new(users)),
        }
    }

    pub async fn get(&self, id: u64) -> Option<User> {
        self.users.read().await.get(&id).cloned()
    }

    pub async fn list(&self) -> Vec<User> {
        self.users.read().await.values().cloned().collect()
    }

    async fn create(&self, new: NewUser) -> Option<User> {
        let mut users = self.users.write().await;
        if users.len() >= MAX_USERS {
            return None;
        }
        let id = users.keys().next_back().map_or(1, |last| last + 1);
        let user = User {
            id,
            name: new.name,
            email: new.email,
        };
        users.insert(id, user.clone());
        Some(user)
    }
}

/// The whole service: API routes (with faults and spans) plus an unfaulted `/healthz`.
pub fn app(directory: Directory, faults: Arc<Faults>) -> Router {
    let grpc = tonic::service::Routes::new(UserServiceServer::new(Grpc {
        directory: directory.clone(),
    }))
    .into_axum_router();
    let api = Router::new()
        .route("/users", get(list_users).post(create_user))
        .route("/users/{id}", get(get_user))
        .with_state(directory)
        .merge(grpc)
        .layer(middleware::from_fn_with_state(faults, faults::inject))
        .layer(middleware::from_fn(telemetry::server_span));
    api.route("/healthz", get(|| async { "ok" }))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

async fn list_users(State(dir): State<Directory>) -> Json<Vec<User>> {
    Json(dir.list().await)
}

async fn get_user(State(dir): State<Directory>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("invalid user id `{id}`: expected a number"),
        );
    };
    match dir.get(id).await {
        Some(user) => Json(user).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no user {id}")),
    }
}

async fn create_user(
    State(dir): State<Directory>,
    body: Result<Json<NewUser>, JsonRejection>,
) -> Response {
    let Json(new) = match body {
        Ok(body) => body,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    if new.name.trim().is_empty() || !new.email.contains('@') {
        return error(
            StatusCode::BAD_REQUEST,
            "a user needs a non-empty `name` and an `email` with an @",
        );
    }
    match dir.create(new).await {
        Some(user) => (StatusCode::CREATED, Json(user)).into_response(),
        None => error(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("the directory is full ({MAX_USERS} users)"),
        ),
    }
}

struct Grpc {
    directory: Directory,
}

impl From<User> for proto::User {
    fn from(u: User) -> Self {
        proto::User {
            id: u.id,
            name: u.name,
            email: u.email,
        }
    }
}

type UserStream = Pin<Box<dyn Stream<Item = Result<proto::User, tonic::Status>> + Send + 'static>>;

#[tonic::async_trait]
impl UserService for Grpc {
    async fn get_user(
        &self,
        req: tonic::Request<proto::GetUserRequest>,
    ) -> Result<tonic::Response<proto::User>, tonic::Status> {
        let id = req.into_inner().id;
        match self.directory.get(id).await {
            Some(user) => Ok(tonic::Response::new(user.into())),
            None => Err(tonic::Status::not_found(format!("no user {id}"))),
        }
    }

    type ListUsersStream = UserStream;

    async fn list_users(
        &self,
        _req: tonic::Request<proto::ListUsersRequest>,
    ) -> Result<tonic::Response<Self::ListUsersStream>, tonic::Status> {
        let users = self.directory.list().await;
        let stream = tokio_stream::iter(users.into_iter().map(|u| Ok(u.into())));
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}
