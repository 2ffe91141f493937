//! `sidemesh-proxy init`: the iptables `nat` rules that send a pod's traffic through its proxy
//! (what the Kubernetes init container runs, in the pod's network namespace).
//!
//! - Outbound TCP is redirected to the outbound port (15001), except the proxy's own traffic
//!   (its uid) and traffic to loopback, and except skipped ports and CIDRs.
//! - Inbound TCP is redirected to the inbound port (15006), except skipped ports (the proxy's
//!   admin port among them, so probes reach it).
//!
//! The rules live in chains of their own (`SIDEMESH_*`), reached by one jump from `OUTPUT` and
//! one from `PREROUTING`: running `init` again rebuilds the chains and leaves one jump each
//! (idempotent), and `--cleanup` removes exactly what `init` added.

use std::process::Command;

pub const ENV_PROXY_UID: &str = "SIDEMESH_PROXY_UID";

const OUTBOUND_CHAIN: &str = "SIDEMESH_OUTPUT";
const OUTBOUND_REDIRECT: &str = "SIDEMESH_OUTPUT_REDIRECT";
const INBOUND_CHAIN: &str = "SIDEMESH_INBOUND";
const INBOUND_REDIRECT: &str = "SIDEMESH_INBOUND_REDIRECT";

/// Flags of `sidemesh-proxy init`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sidemesh-proxy init",
    about = "Install the iptables rules that send this network namespace's TCP through the proxy"
)]
pub struct InitArgs {
    /// The proxy's uid: its own connections are not redirected.
    #[arg(long, env = ENV_PROXY_UID, default_value_t = 2102)]
    pub proxy_uid: u32,
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// Inbound ports left alone (comma-separated). The admin port 15020 always is.
    #[arg(long, value_delimiter = ',')]
    pub skip_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub skip_outbound_ports: Vec<u16>,
    /// Outbound destination CIDRs left alone (comma-separated), e.g. `169.254.169.254/32`.
    #[arg(long, value_delimiter = ',', value_parser = parse_cidr)]
    pub skip_outbound_cidrs: Vec<String>,
    /// The admin port, never redirected.
    #[arg(long, default_value_t = 15020)]
    pub admin_port: u16,
    /// Which iptables: `auto` picks the backend (nft or legacy) that already holds rules,
    /// else `iptables`; or name a binary (`iptables-nft`, `iptables-legacy`).
    #[arg(long, default_value = "auto")]
    pub iptables: String,
    /// Print the commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove the rules instead of installing them.
    #[arg(long)]
    pub cleanup: bool,
}

fn parse_cidr(s: &str) -> Result<String, String> {
    let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
    let ip: std::net::IpAddr = addr
        .parse()
        .map_err(|e| format!("`{s}` is not a CIDR ({e})"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match len.parse::<u8>() {
        Ok(n) if n <= max => Ok(format!("{ip}/{n}")),
        _ => Err(format!("`{s}`: prefix length must be 0..={max}")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
}

/// One iptables invocation, `-t nat` implied.
type Rule = Vec<String>;

fn rule(parts: &[&str]) -> Rule {
    parts.iter().map(|s| s.to_string()).collect()
}

/// The chains' contents, in order.
pub fn chain_rules(args: &InitArgs) -> Vec<Rule> {
    let uid = args.proxy_uid.to_string();
    let outbound = args.outbound_port.to_string();
    let inbound = args.inbound_port.to_string();
    let mut rules = vec![
        rule(&[
            "-A",
            OUTBOUND_REDIRECT,
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &outbound,
        ]),
        rule(&[
            "-A",
            INBOUND_REDIRECT,
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &inbound,
        ]),
        // The proxy's own connections leave as they are (or they would loop back to it).
        rule(&[
            "-A",
            OUTBOUND_CHAIN,
            "-m",
            "owner",
            "--uid-owner",
            &uid,
            "-j",
            "RETURN",
        ]),
        // Loopback: the pod talking to itself (and to the proxy's own ports).
        rule(&["-A", OUTBOUND_CHAIN, "-d", "127.0.0.0/8", "-j", "RETURN"]),
    ];
    for cidr in &args.skip_outbound_cidrs {
        rules.push(rule(&["-A", OUTBOUND_CHAIN, "-d", cidr, "-j", "RETURN"]));
    }
    // A port left alone: its traffic returns from the chain before the redirect.
    let skip_port = |chain: &str, port: &u16| {
        rule(&[
            "-A",
            chain,
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-j",
            "RETURN",
        ])
    };
    for port in &args.skip_outbound_ports {
        rules.push(skip_port(OUTBOUND_CHAIN, port));
    }
    rules.push(rule(&["-A", OUTBOUND_CHAIN, "-j", OUTBOUND_REDIRECT]));
    let mut skipped_inbound = vec![args.admin_port];
    skipped_inbound.extend(&args.skip_inbound_ports);
    for port in &skipped_inbound {
        rules.push(skip_port(INBOUND_CHAIN, port));
    }
    rules.push(rule(&["-A", INBOUND_CHAIN, "-j", INBOUND_REDIRECT]));
    rules
}

/// The jumps from the built-in chains (one each).
fn jumps() -> [Rule; 2] {
    [
        rule(&["OUTPUT", "-p", "tcp", "-j", OUTBOUND_CHAIN]),
        rule(&["PREROUTING", "-p", "tcp", "-j", INBOUND_CHAIN]),
    ]
}

const CHAINS: [&str; 4] = [
    OUTBOUND_CHAIN,
    OUTBOUND_REDIRECT,
    INBOUND_CHAIN,
    INBOUND_REDIRECT,
];

struct Runner {
    binary: String,
    dry_run: bool,
}

impl Runner {
    fn command(&self, args: &[String]) -> String {
        format!("{} -t nat {}", self.binary, args.join(" "))
    }

    /// Runs (or prints) a command that must succeed.
    fn must(&self, args: &[String]) -> Result<(), InitError> {
        if self.dry_run {
            println!("{}", self.command(args));
            return Ok(());
        }
        let out = Command::new(&self.binary)
            .args(["-t", "nat"])
            .args(args)
            .output()
            .map_err(|source| InitError::Spawn {
                command: self.command(args),
                source,
            })?;
        if !out.status.success() {
            return Err(InitError::Failed {
                command: self.command(args),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// Runs a probe (`-C`, `-L`) whose failure is an answer, not an error; never printed.
    fn check(&self, args: &[String]) -> bool {
        Command::new(&self.binary)
            .args(["-t", "nat"])
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

fn with(op: &str, rest: &[String]) -> Vec<String> {
    let mut v = vec![op.to_string()];
    v.extend_from_slice(rest);
    v
}

/// The iptables binary: the one asked for, or the backend that already has rules.
fn pick_binary(asked: &str) -> String {
    if asked != "auto" {
        return asked.to_string();
    }
    let rules = |binary: &str| {
        Command::new(binary)
            .args(["-t", "nat", "-S"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A"))
                    .count()
            })
    };
    // The backend with rules already is the one the node uses; with none (or a tie), the
    // system's default `iptables`.
    match (rules("iptables-legacy"), rules("iptables-nft")) {
        (Some(legacy), Some(nft)) if legacy > nft => "iptables-legacy".into(),
        (Some(legacy), Some(nft)) if nft > legacy => "iptables-nft".into(),
        _ => "iptables".into(),
    }
}

/// Installs (or with `--cleanup`, removes) the rules.
pub fn run(args: &InitArgs) -> Result<(), InitError> {
    let runner = Runner {
        binary: pick_binary(&args.iptables),
        dry_run: args.dry_run,
    };
    // Remove what an earlier run left: the jumps first, then the chains.
    for jump in jumps() {
        if runner.dry_run {
            if args.cleanup {
                runner.must(&with("-D", &jump))?;
            }
            continue;
        }
        while runner.check(&with("-C", &jump)) {
            runner.must(&with("-D", &jump))?;
        }
    }
    for chain in CHAINS {
        let exists = !runner.dry_run && runner.check(&["-L".into(), chain.into(), "-n".into()]);
        if exists || (runner.dry_run && args.cleanup) {
            runner.must(&["-F".into(), chain.into()])?;
            runner.must(&["-X".into(), chain.into()])?;
        }
    }
    if args.cleanup {
        return Ok(());
    }
    for chain in CHAINS {
        runner.must(&["-N".into(), chain.into()])?;
    }
    for rule in chain_rules(args) {
        runner.must(&rule)?;
    }
    for jump in jumps() {
        runner.must(&with("-A", &jump))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn rules_skip_the_proxy_loopback_and_what_is_asked() {
        let args = InitArgs::parse_from([
            "init",
            "--skip-inbound-ports",
            "9090,9091",
            "--skip-outbound-ports",
            "5432",
            "--skip-outbound-cidrs",
            "169.254.169.254,10.0.0.0/8",
        ]);
        let text: Vec<String> = chain_rules(&args).iter().map(|r| r.join(" ")).collect();
        let expect = [
            "-A SIDEMESH_OUTPUT -m owner --uid-owner 2102 -j RETURN",
            "-A SIDEMESH_OUTPUT -d 127.0.0.0/8 -j RETURN",
            "-A SIDEMESH_OUTPUT -d 169.254.169.254/32 -j RETURN",
            "-A SIDEMESH_OUTPUT -d 10.0.0.0/8 -j RETURN",
            "-A SIDEMESH_OUTPUT -p tcp --dport 5432 -j RETURN",
            "-A SIDEMESH_OUTPUT -j SIDEMESH_OUTPUT_REDIRECT",
            "-A SIDEMESH_OUTPUT_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A SIDEMESH_INBOUND -p tcp --dport 15020 -j RETURN",
            "-A SIDEMESH_INBOUND -p tcp --dport 9090 -j RETURN",
            "-A SIDEMESH_INBOUND -p tcp --dport 9091 -j RETURN",
            "-A SIDEMESH_INBOUND -j SIDEMESH_INBOUND_REDIRECT",
            "-A SIDEMESH_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        ];
        for line in expect {
            assert!(
                text.iter().any(|t| t == line),
                "missing `{line}` in {text:#?}"
            );
        }
        // Skips come before the redirect in the outbound chain.
        let jump = text
            .iter()
            .position(|t| t == "-A SIDEMESH_OUTPUT -j SIDEMESH_OUTPUT_REDIRECT");
        let last_skip = text
            .iter()
            .rposition(|t| t.starts_with("-A SIDEMESH_OUTPUT ") && t.ends_with("RETURN"));
        assert!(last_skip < jump);
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("not-an-ip").is_err());
    }
}
