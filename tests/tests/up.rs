//! `sidemesh up`, the README's first command: traffic flows and Ctrl-C stops it cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sidemesh_tests::bin;

fn up(extra: &[&str]) -> std::process::Child {
    Command::new(bin("sidemesh"))
        .args([
            "up",
            "--users-addr",
            "127.0.0.1:0",
            "--orders-addr",
            "127.0.0.1:0",
            "--rate",
            "20",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start sidemesh up")
}

/// Reads stdout lines on a thread so the test can wait with a timeout.
fn lines(child: &mut std::process::Child) -> mpsc::Receiver<String> {
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

#[test]
fn a_bounded_run_sends_traffic_and_exits_cleanly() {
    let mut child = up(&["--duration", "2s"]);
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
    assert_eq!(field(total, "sent"), 40, "rate 20 for 2s: {total}");
    assert!(field(total, "2xx") >= 30, "most orders succeed: {total}");
    assert_eq!(field(total, "5xx") + field(total, "err"), 0, "{total}");
    assert_eq!(output.last().map(String::as_str), Some("stopped"));
}

#[test]
fn ctrl_c_stops_everything() {
    let mut child = up(&[]);
    let rx = lines(&mut child);
    let first = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a per-second line within 30s");
        if line.starts_with("t=1s") {
            break line;
        }
    };
    assert!(field(&first, "2xx") > 0, "{first}");
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("try_wait") {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sidemesh up still running 10s after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "exit {exit}");
    let rest: Vec<String> = rx.try_iter().collect();
    assert_eq!(rest.last().map(String::as_str), Some("stopped"), "{rest:?}");
}
