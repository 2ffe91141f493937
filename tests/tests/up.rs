//! `sidemesh up`, the README's first command: traffic flows over mTLS, the live table shows
//! it, an edit to the routing YAML shows up in the table, `sidemesh stat` and `sidemesh traces`
//! read the running mesh, and Ctrl-C stops everything.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sidemesh_tests::{bin, workspace_root};

fn up(state_dir: &Path, extra: &[&str]) -> Child {
    Command::new(bin("sidemesh"))
        .args([
            "up",
            "--users-addr",
            "127.0.0.1:0",
            "--orders-addr",
            "127.0.0.1:0",
            "--control-plane-admin",
            "127.0.0.1:0",
            "--rate",
            "20",
            "--stats-interval",
            "1s",
            "--state-dir",
        ])
        .arg(state_dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start sidemesh up")
}

/// Reads stdout lines on a thread so the test can wait with a timeout.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in `{line}`"))
}

/// One drawn table: its caption and, per service, each column's cell.
#[derive(Debug)]
struct Table {
    caption: String,
    rows: HashMap<String, HashMap<String, String>>,
}

impl Table {
    /// The config version in the caption (`last 1.0s, config version 3`).
    fn config_version(&self) -> u64 {
        self.caption
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn cell(&self, service: &str, column: &str) -> &str {
        self.rows
            .get(service)
            .and_then(|r| r.get(column))
            .unwrap_or_else(|| panic!("no {column} for {service} in {self:#?}"))
    }

    fn number(&self, service: &str, column: &str) -> f64 {
        let cell = self.cell(service, column);
        cell.trim_end_matches('%')
            .parse()
            .unwrap_or_else(|_| panic!("{service} {column} is `{cell}`"))
    }
}

/// Parses the tables in `sidemesh up`/`sidemesh stat` output, in order.
fn tables(lines: &[String]) -> Vec<Table> {
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !line.starts_with("SERVICE ") {
            continue;
        }
        let header: Vec<&str> = line.split_whitespace().collect();
        let mut rows = HashMap::new();
        for row in lines[i + 1..].iter().take_while(|l| !l.trim().is_empty()) {
            let cells: Vec<&str> = row.split_whitespace().collect();
            if cells.len() != header.len() {
                break;
            }
            let row: HashMap<String, String> = header
                .iter()
                .zip(&cells)
                .map(|(h, c)| (h.to_string(), c.to_string()))
                .collect();
            rows.insert(cells[0].to_string(), row);
        }
        let caption = i
            .checked_sub(1)
            .map(|c| lines[c].clone())
            .unwrap_or_default();
        out.push(Table { caption, rows });
    }
    out
}

/// Waits (up to `timeout`) for a table that satisfies `check`, collecting every line.
fn wait_for_table(
    rx: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    timeout: Duration,
    what: &str,
    check: impl Fn(&Table) -> bool,
) -> Table {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let ends_table = line.trim().is_empty();
                seen.push(line);
                if ends_table {
                    if let Some(table) = tables(seen).pop().filter(|t| check(t)) {
                        return table;
                    }
                }
            }
            Err(_) => panic!(
                "no table showing {what} within {timeout:?}:\n{}",
                seen.join("\n")
            ),
        }
    }
}

/// The address printed after `label` on the line starting with `prefix`.
fn printed_addr(lines: &[String], prefix: &str, label: &str) -> SocketAddr {
    lines
        .iter()
        .find(|l| l.trim_start().starts_with(prefix))
        .and_then(|l| l.split(label).nth(1))
        .and_then(|rest| {
            let token = rest.split_whitespace().next()?;
            let token = token.trim_start_matches("http://");
            token.split('/').next()?.trim_end_matches(',').parse().ok()
        })
        .unwrap_or_else(|| panic!("no `{label}` address on `{prefix}`:\n{}", lines.join("\n")))
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(exit) = child.try_wait().expect("try_wait") {
            return exit;
        }
        assert!(
            Instant::now() < deadline,
            "sidemesh up still running {timeout:?} after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if rest.split_whitespace().nth(1) == Some(pid.to_string().as_str()) {
            if let Some(child) = head.split_whitespace().next().and_then(|p| p.parse().ok()) {
                found.push(child);
            }
        }
    }
    found
}

/// Whether `pid` is still running (a zombie waiting for its parent does not count).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z'))
}

/// Ctrl-C (SIGINT) to `sidemesh up`: it exits successfully within `timeout`, its last line is
/// "stopped", and none of the processes it had started is still running.
fn interrupt(
    child: &mut Child,
    rx: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    timeout: Duration,
) {
    let pid = child.id();
    let children = children_of(pid);
    let status = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    let exit = wait_exit(child, timeout);
    assert!(exit.success(), "exit {exit}");
    seen.extend(rx.try_iter());
    assert_eq!(
        seen.last().map(String::as_str),
        Some("stopped"),
        "{seen:#?}"
    );
    let left: Vec<u32> = children.into_iter().filter(|c| running(*c)).collect();
    assert!(left.is_empty(), "processes left running: {left:?}");
}

#[test]
fn a_bounded_run_sends_traffic_over_mtls_and_keeps_its_traces() {
    let state = tempfile::tempdir().expect("tempdir");
    let mut child = up(state.path(), &["--duration", "4s"]);
    let rx = lines(&mut child);
    let mut output = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) {
        output.push(line);
    }
    let status = child.wait().expect("wait");
    let text = output.join("\n");
    assert!(status.success(), "exit {status}:\n{text}");
    assert!(text.contains("user-service   http://127.0.0.1:"), "{text}");
    let total = output
        .iter()
        .find(|l| l.starts_with("total:"))
        .unwrap_or_else(|| panic!("no total line:\n{text}"));
    assert_eq!(field(total, "sent"), 80, "rate 20 for 4s: {total}");
    assert!(field(total, "2xx") >= 60, "most orders succeed: {total}");
    assert_eq!(field(total, "5xx") + field(total, "err"), 0, "{total}");
    assert_eq!(output.last().map(String::as_str), Some("stopped"));

    // The live table saw both services busy, every inbound request over mTLS.
    let busy = tables(&output)
        .into_iter()
        .find(|t| t.number("order-service", "RPS") > 5.0)
        .unwrap_or_else(|| panic!("no table with traffic:\n{text}"));
    for service in ["order-service", "user-service"] {
        assert_eq!(busy.cell(service, "MTLS"), "100.0%", "{busy:#?}");
        assert_eq!(busy.cell(service, "SUCCESS"), "100.0%", "{busy:#?}");
        assert_eq!(busy.cell(service, "MESHED"), "1/1", "{busy:#?}");
        assert_ne!(busy.cell(service, "P50"), "-", "{busy:#?}");
    }
    assert!(busy.number("user-service", "RPS") > 5.0, "{busy:#?}");

    // The spans were kept, and `sidemesh traces` shows whole requests across both hops.
    let traces = Command::new(bin("sidemesh"))
        .args(["traces", "-n", "3", "--service", "user-service", "--file"])
        .arg(state.path().join("traces.jsonl"))
        .output()
        .expect("sidemesh traces");
    let printed = String::from_utf8_lossy(&traces.stdout);
    assert!(traces.status.success(), "{printed}");
    let trace = printed
        .split("\n\n")
        .find(|t| t.contains("loadgen POST /orders/* (client)"))
        .unwrap_or_else(|| panic!("no whole trace:\n{printed}"));
    let depth = |needle: &str| {
        trace
            .lines()
            .find(|l| l.contains(needle))
            .map(|l| l.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(0))
            .unwrap_or_else(|| panic!("no `{needle}` in:\n{trace}"))
    };
    let caller = depth("loadgen POST /orders/* (client)");
    let orders = depth("order-service POST (server)");
    let users = depth("user-service POST /demo.users.v1.UserService/GetUser (server)");
    assert!(caller < orders && orders < users, "{trace}");
    assert!(
        trace.contains("from spiffe://cluster.local/ns/demo/sa/order-service"),
        "user-service's proxy saw order-service's mTLS identity:\n{trace}"
    );

    // `sidemesh traces | head -1`: a reader that stops early is not an error. All of the run's
    // traces (about 80, some 80 KiB) overflow the pipe, so the writer is still writing when
    // the reader goes.
    let mut early = Command::new(bin("sidemesh"))
        .args(["traces", "-n", "1000", "--file"])
        .arg(state.path().join("traces.jsonl"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sidemesh traces");
    let mut first = String::new();
    BufReader::new(early.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("a first line");
    assert!(first.starts_with("trace "), "{first}");
    let done = early.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(
        done.status.success() && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn failing_grpc_calls_show_as_failures_and_retries() {
    // user-service fails 30 % of its gRPC calls with UNAVAILABLE: answered HTTP 200 with an
    // error grpc-status, they must still count against its success rate, and order-service's
    // proxy retries them (the route's policy).
    let state = tempfile::tempdir().expect("tempdir");
    let mut child = up(state.path(), &["--duration", "4s", "--fail-rate", "0.3"]);
    let rx = lines(&mut child);
    let mut output = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) {
        output.push(line);
    }
    let status = child.wait().expect("wait");
    let text = output.join("\n");
    assert!(status.success(), "exit {status}:\n{text}");
    let busy = tables(&output)
        .into_iter()
        .find(|t| t.number("user-service", "RPS") > 5.0)
        .unwrap_or_else(|| panic!("no table with traffic:\n{text}"));
    let success = busy.number("user-service", "SUCCESS");
    assert!(
        (40.0..95.0).contains(&success),
        "about 70 % of user-service's calls succeed: {busy:#?}"
    );
    assert!(busy.number("user-service", "RETRY/s") > 0.0, "{busy:#?}");
}

#[test]
fn an_edit_to_the_yaml_shows_in_the_table_and_ctrl_c_stops_everything() {
    let state = tempfile::tempdir().expect("tempdir");
    let config = state.path().join("mesh");
    std::fs::create_dir(&config).expect("mkdir");
    let yaml = std::fs::read_to_string(workspace_root().join("config/examples/demo.yaml"))
        .expect("demo.yaml");
    std::fs::write(config.join("demo.yaml"), &yaml).expect("write config");
    let mut child = up(
        state.path(),
        &["--config", config.to_str().expect("utf-8 path")],
    );
    let rx = lines(&mut child);
    let mut seen = Vec::new();

    let before = wait_for_table(&rx, &mut seen, Duration::from_secs(30), "traffic", |t| {
        t.rows.contains_key("user-service") && t.number("user-service", "RPS") > 5.0
    });
    assert_eq!(
        before.number("user-service", "LIMITED/s"),
        0.0,
        "{before:#?}"
    );
    assert_eq!(before.config_version(), 1, "{before:#?}");

    // `sidemesh stat` reads the same mesh through the control plane.
    let cp_admin = printed_addr(&seen, "control plane", "admin ");
    let stat = Command::new(bin("sidemesh"))
        .args(["stat", "--window", "1s", "--control-plane"])
        .arg(format!("http://{cp_admin}"))
        .output()
        .expect("sidemesh stat");
    let stat_text = String::from_utf8_lossy(&stat.stdout);
    assert!(stat.status.success(), "{stat_text}");
    let stat_lines: Vec<String> = stat_text.lines().map(str::to_string).collect();
    let table = tables(&stat_lines).pop().expect("a table");
    assert!(table.number("order-service", "RPS") > 5.0, "{stat_text}");
    assert_eq!(table.cell("user-service", "MTLS"), "100.0%", "{stat_text}");

    // Lower user-lookup's rate limit (200/s, burst 50) to 2/s with a burst of 1: order-service
    // calls it about 19 times a second, so most calls are now refused by its proxy.
    let lowered = yaml.replace(
        "rateLimit:\n      rate: 200/s\n      burst: 50",
        "rateLimit:\n      rate: 2/s\n      burst: 1",
    );
    assert_ne!(
        lowered, yaml,
        "the demo's user-lookup limit moved; update this test"
    );
    std::fs::write(config.join("demo.yaml"), lowered).expect("edit config");
    let after = wait_for_table(
        &rx,
        &mut seen,
        Duration::from_secs(20),
        "the lowered limit",
        // A whole window under the new limit: about 19 lookups a second, 2 let through.
        |t| {
            t.config_version() >= 2
                && t.rows.contains_key("user-service")
                && t.number("user-service", "LIMITED/s") > 10.0
                && t.number("user-service", "RPS") < 5.0
        },
    );
    // order-service passes the limit on as 429s, not as failures of its own.
    assert_eq!(
        after.cell("order-service", "SUCCESS"),
        "100.0%",
        "{after:#?}"
    );

    // Ctrl-C: everything stops, nothing is left listening or running.
    let proxy_admins = [
        printed_addr(&seen, "user-service", "admin "),
        printed_addr(&seen, "order-service", "admin "),
        printed_addr(&seen, "loadgen", "admin "),
    ];
    interrupt(&mut child, &rx, &mut seen, Duration::from_secs(10));
    for addr in proxy_admins.into_iter().chain([cp_admin]) {
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
            "{addr} still accepts connections after Ctrl-C"
        );
    }
}

#[test]
fn netns_pods_talk_mtls_and_ctrl_c_removes_every_process_and_namespace() {
    use sidemesh_tests::netns::cannot_run;
    if let Some(why) = cannot_run(&["ip", "iptables", "setpriv"]) {
        sidemesh_tests::skip(&format!("sidemesh up --netns: {why}"));
        return;
    }
    // The workload binaries sit next to `sidemesh`, as --netns expects.
    for name in ["sidemesh-proxy", "user-service", "order-service", "loadgen"] {
        bin(name);
    }
    let state = tempfile::tempdir().expect("tempdir");
    let mut child = up(state.path(), &["--netns"]);
    let rx = lines(&mut child);
    let mut seen = Vec::new();
    let busy = wait_for_table(
        &rx,
        &mut seen,
        Duration::from_secs(60),
        "pod traffic",
        |t| t.rows.contains_key("user-service") && t.number("user-service", "RPS") > 5.0,
    );
    for service in ["order-service", "user-service"] {
        assert_eq!(busy.cell(service, "MTLS"), "100.0%", "{busy:#?}");
        assert_eq!(busy.cell(service, "SUCCESS"), "100.0%", "{busy:#?}");
    }
    for service in ["loadgen", "order-service", "user-service"] {
        assert_eq!(busy.cell(service, "MESHED"), "1/1", "{busy:#?}");
    }
    let text = seen.join("\n");
    assert!(text.contains("pod sm-users (10.213.0.1)"), "{text}");
    // Calls were intercepted: the apps only know plain `http://user-service:8081`.
    let nat = Command::new("ip")
        .args(["netns", "exec", "sm-orders", "iptables", "-t", "nat", "-S"])
        .output()
        .expect("iptables");
    assert!(
        String::from_utf8_lossy(&nat.stdout).contains("SIDEMESH_OUTPUT"),
        "order-service's pod has the init rules"
    );

    let children = children_of(child.id());
    assert!(
        children.len() >= 6,
        "three proxies, two apps, a loadgen: {children:?}"
    );
    interrupt(&mut child, &rx, &mut seen, Duration::from_secs(30));
    let namespaces = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    assert!(
        !namespaces.lines().any(|l| l.starts_with("sm-")),
        "namespaces left: {namespaces}"
    );
    let link = Command::new("ip")
        .args(["link", "show", "sm-host"])
        .output()
        .expect("ip link");
    assert!(!link.status.success(), "the host link is removed");
    assert!(!Path::new("/etc/netns/sm-users").exists());
}
