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

/// A packet capture (tcpdump) on an interface of a namespace, for asserting what crossed a
/// link. It is started only once tcpdump reports that it listens, and ended only once a marker
/// datagram sent after the traffic of interest is in the file, so nothing is missed at either
/// end and no sleep is needed.
#[derive(Debug)]
pub struct Capture {
    child: std::process::Child,
    path: std::path::PathBuf,
}

/// The payload of the datagram that ends a capture.
const END_MARKER: &[u8] = b"sidemesh-capture-end";

impl Capture {
    /// Captures on `iface` in namespace `ns` what matches the pcap `filter` (e.g. `tcp port
    /// 8081`), into `path`.
    pub fn start(ns: &str, iface: &str, filter: &str, path: &std::path::Path) -> Capture {
        use std::io::BufRead;
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", ns, "tcpdump", "-i", iface, "-U", "-s", "0", "-w",
            ])
            .arg(path)
            .arg(format!("({filter}) or (udp port 9)"))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("tcpdump");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("tcpdump did not start listening within 10s");
        Capture {
            child,
            path: path.to_path_buf(),
        }
    }

    /// Sends the end marker to `to` (port 9, through the captured link) until the capture has
    /// it, then stops tcpdump and returns the captured bytes.
    pub fn finish(mut self, to: std::net::IpAddr) -> Vec<u8> {
        let socket = std::net::UdpSocket::bind(("0.0.0.0", 0)).expect("udp socket");
        let has_marker = |bytes: &[u8]| bytes.windows(END_MARKER.len()).any(|w| w == END_MARKER);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let _ = socket.send_to(END_MARKER, (to, 9));
            let bytes = std::fs::read(&self.path).unwrap_or_default();
            if has_marker(&bytes) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the capture never saw its end marker"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        std::fs::read(&self.path).expect("pcap")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
