//! Network namespaces for tests that need root: pods simulated as namespaces.

use std::process::Command;

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns(pub String);

impl Netns {
    /// A new namespace with loopback up.
    pub fn create(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "delete", name]).status();
        run(&["ip", "netns", "add", name]);
        let ns = Netns(name.to_string());
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace; it must succeed.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.0];
        full.extend_from_slice(cmd);
        run(&full)
    }

    /// The prefix that runs a program inside the namespace.
    pub fn wrapper(&self) -> Vec<&str> {
        vec!["ip", "netns", "exec", &self.0]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// Runs a command that must succeed; returns its stdout.
pub fn run(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Why a root test cannot run here (not root, or a tool is missing), if it cannot.
pub fn cannot_run(tools: &[&str]) -> Option<String> {
    let uid = run(&["id", "-u"]);
    if uid.trim() != "0" {
        return Some("needs root for network namespaces and iptables".into());
    }
    tools
        .iter()
        .find(|tool| {
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map(|o| !o.status.success())
                .unwrap_or(true)
        })
        .map(|tool| format!("`{tool}` is not installed"))
}
