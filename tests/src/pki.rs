//! Certificate authorities made in tests: roots, intermediates, and workload or server
//! certificates with chosen names and validity.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A CA made in the test: a root, or an intermediate signed by another.
pub struct TestCa {
    pub issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    pub fn root(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("key");
        let params = ca_params(name);
        let pem = params.self_signed(&key).expect("self-signed").pem();
        TestCa {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    pub fn intermediate(name: &str, parent: &TestCa) -> TestCa {
        let key = KeyPair::generate().expect("key");
        let params = ca_params(name);
        let pem = params
            .signed_by(&key, &parent.issuer)
            .expect("signed")
            .pem();
        TestCa {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A workload certificate for `identity`, valid from `from` to `to` (seconds from now).
    pub fn leaf(
        &self,
        dir: &Path,
        name: &str,
        identity: &str,
        from: i64,
        to: i64,
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names =
            vec![SanType::URI(identity.to_string().try_into().expect("uri"))];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::seconds(to);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        let (cert_path, key_path) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }
}

impl TestCa {
    /// A server certificate for `names` (DNS names or IPs), valid from `from` to `to`
    /// (seconds from now), written as `<name>.crt` (leaf, then this CA when it is not a
    /// root) and `<name>.key`.
    pub fn server(
        &self,
        dir: &Path,
        name: &str,
        names: &[&str],
        from: i64,
        to: i64,
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("names");
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::seconds(to);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("server certificate");
        let (cert_path, key_path) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    /// Writes this CA as a control plane's `--ca-dir` (`ca.crt`, `ca.key`).
    pub fn write_ca_dir(&self, dir: &Path) {
        std::fs::create_dir_all(dir).expect("mkdir");
        std::fs::write(dir.join("ca.crt"), &self.pem).expect("write ca.crt");
        std::fs::write(dir.join("ca.key"), self.key_pem()).expect("write ca.key");
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// What `openssl s_client` saw of one connection.
#[derive(Debug)]
pub struct SClient {
    pub stdout: String,
    pub stderr: String,
    /// The server ended the connection (s_client exited on its own while its stdin was open).
    pub closed_by_server: bool,
}

impl SClient {
    /// The TLS alert the server sent, as openssl names it (`certificate required`,
    /// `unknown ca`, ...), if any.
    pub fn alert(&self) -> Option<String> {
        let at = self.stderr.find(" alert ")?;
        let rest = &self.stderr[at + " alert ".len()..];
        let end = rest.find([':', '\n']).unwrap_or(rest.len());
        Some(rest[..end].trim().to_string())
    }

    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `openssl s_client -connect addr` (TLS 1.3) with `request` on stdin, which stays
/// open: s_client then only exits when the server ends the connection, which is waited for
/// (10 s at most) and reported.
pub fn s_client(
    addr: std::net::SocketAddr,
    cert: Option<(&Path, &Path)>,
    alpn: &str,
    extra: &[&str],
    request: &[u8],
) -> SClient {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-tls1_3",
        "-quiet",
        "-no_ign_eof",
    ]);
    if !alpn.is_empty() {
        cmd.args(["-alpn", alpn]);
    }
    if let Some((cert, key)) = cert {
        cmd.arg("-cert").arg(cert).arg("-key").arg(key);
    }
    cmd.args(extra);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client (install openssl)");
    let mut stdin = child.stdin.take().expect("stdin");
    let _ = stdin.write_all(request);
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let closed_by_server = loop {
        if child.try_wait().ok().flatten().is_some() {
            break true;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    drop(stdin);
    SClient {
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        closed_by_server,
    }
}
