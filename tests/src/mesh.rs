//! A mesh for end-to-end tests: the real control plane (with its CA in a temporary folder)
//! and real proxies in control-plane mode, certified with the control plane's join token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::{Proc, eventually};

/// A control plane with its CA in a temporary folder, and helpers to start proxies.
#[derive(Debug)]
pub struct Mesh {
    dir: tempfile::TempDir,
    pub cp: Proc,
}

impl Mesh {
    pub fn start(yaml: &str, extra: &[&str]) -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("config")).expect("mkdir");
        std::fs::write(dir.path().join("config/mesh.yaml"), yaml).expect("write");
        Self::start_in(dir, extra)
    }

    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Mesh {
        let config = dir.path().join("config");
        let data = dir.path().join("cp");
        let mut args = vec![
            "--config",
            config.to_str().expect("utf-8"),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        let cp = Proc::start_until("sidemesh-control-plane", &args, "ready");
        Mesh { dir, cp }
    }

    /// The proxies' API (TLS, checked against [`Mesh::trust_bundle`]).
    pub fn grpc(&self) -> String {
        format!("https://{}", self.cp.listener("grpc"))
    }

    /// The trust bundle the control plane wrote to its data folder.
    pub fn trust_bundle(&self) -> PathBuf {
        self.path("cp/trust-bundle.pem")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A proxy for `service` (in namespace demo) with an app behind it and upstreams.
    pub fn proxy(
        &self,
        service: &str,
        app: Option<SocketAddr>,
        upstreams: &[&str],
        extra: &[&str],
    ) -> Proc {
        self.proxy_as(service, service, app, upstreams, extra)
    }

    /// [`Mesh::proxy`] with its own proxy id, for a second replica of a service.
    pub fn proxy_as(
        &self,
        service: &str,
        id: &str,
        app: Option<SocketAddr>,
        upstreams: &[&str],
        extra: &[&str],
    ) -> Proc {
        let token = self.path("cp/join-token");
        let app = app.map(|a| a.to_string());
        let upstreams: Vec<String> = upstreams
            .iter()
            .map(|u| format!("{u}=127.0.0.1:0"))
            .collect();
        let mut args = vec![
            "--control-plane".to_string(),
            self.grpc(),
            "--service".into(),
            format!("{service}.demo"),
            "--proxy-id".into(),
            id.into(),
            "--join-token-file".into(),
            token.to_string_lossy().into_owned(),
            "--trust-bundle".into(),
            self.trust_bundle().to_string_lossy().into_owned(),
            "--admin".into(),
            "127.0.0.1:0".into(),
            "--outbound".into(),
            "127.0.0.1:0".into(),
            "--inbound".into(),
            "127.0.0.1:0".into(),
        ];
        if let Some(app) = app {
            args.extend(["--app".into(), app]);
        }
        for u in upstreams {
            args.extend(["--upstream".into(), u]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::start_until("sidemesh-proxy", &args, "ready")
    }

    /// Waits until `caller` routes `service` to `callee`'s inbound listener as a meshed endpoint.
    pub async fn wait_meshed(&self, caller: &Proc, service: &str, callee: &Proc) {
        let inbound = callee.listener("inbound").to_string();
        eventually(
            &format!("{service} meshed at {inbound} in the caller's config"),
            Duration::from_secs(10),
            || async {
                let dump = caller.config_dump().await?;
                let found = dump["endpoints"]
                    .as_array()?
                    .iter()
                    .any(|e| e["addr"] == inbound.as_str() && e["identity"].is_string());
                found.then_some(())
            },
        )
        .await;
    }
}
