//! A real proxy (`sidemesh_proxy::app::build`) in-process on port 0, with its routing YAML in
//! a temporary folder that tests can rewrite.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::Method;
use sidemesh_proxy::app::{self, Addrs};
use sidemesh_proxy::config::Args;
use tokio::sync::oneshot;

use crate::harness::{eventually, http};

#[derive(Debug)]
pub struct TestProxy {
    pub addrs: Addrs,
    dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl TestProxy {
    /// Starts a proxy for `service` with `yaml` as its routing config; `upstreams` are the
    /// services that get an explicit listener. `tweak` may change any other setting.
    pub async fn start(
        yaml: &str,
        service: &str,
        upstreams: &[&str],
        tweak: impl FnOnce(&mut Args),
    ) -> TestProxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, yaml).expect("write config");
        let mut args = Args::local(path, service);
        args.timeouts.reload_interval = Duration::from_millis(50);
        args.upstreams = upstreams
            .iter()
            .map(|s| (s.to_string(), SocketAddr::from(([127, 0, 0, 1], 0))))
            .collect();
        tweak(&mut args);
        let app = app::build(args)
            .await
            .unwrap_or_else(|e| panic!("proxy failed to start: {e}"));
        let addrs = app.addrs.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(app.run(async {
            let _ = stopped.await;
        }));
        TestProxy {
            addrs,
            dir,
            stop: Some(stop),
            done: Some(done),
        }
    }

    /// The explicit listener for `service`.
    pub fn upstream(&self, service: &str) -> SocketAddr {
        self.addrs
            .upstreams
            .iter()
            .find(|(s, _)| s == service)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no upstream listener for {service}"))
    }

    pub fn url(&self, service: &str, path: &str) -> String {
        format!("http://{}{path}", self.upstream(service))
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{path}", self.addrs.admin)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("mesh.yaml")
    }

    /// The config version in force, from `/config_dump`.
    pub async fn version(&self) -> u64 {
        let dump = http(Method::GET, &self.admin("/config_dump"), None, &[])
            .await
            .expect("config_dump")
            .json();
        dump["config"]["version"].as_u64().expect("version")
    }

    /// Replaces the routing YAML atomically (write + rename, as a ConfigMap update does) and
    /// waits until the proxy has applied it.
    pub async fn rewrite(&self, yaml: &str) {
        let before = self.version().await;
        let tmp = self.dir.path().join(".mesh.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write");
        std::fs::rename(&tmp, self.config_path()).expect("rename");
        eventually(
            "the proxy to apply the new config",
            Duration::from_secs(5),
            || async { (self.version().await > before).then_some(()) },
        )
        .await;
    }

    /// Stops the proxy and waits for it to drain.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
