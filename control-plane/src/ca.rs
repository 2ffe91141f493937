//! The certificate authority: it signs short-lived workload certificates whose only name is
//! the workload's SPIFFE ID.
//!
//! The CA lives in a folder (`--ca-dir`), the same layout whether it was generated here on
//! first start or mounted from a Kubernetes Secret:
//! - `ca.crt`: the signing certificate, then any intermediates up to (not including) the root;
//! - `ca.key`: the signing key (PKCS#8 PEM, kept 0600);
//! - `roots.crt` (optional): the trust bundle proxies verify peers against. Without it the
//!   signing certificate must be a self-signed root, and it is the bundle. During a root
//!   rotation the bundle holds both roots.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};

const CERT_FILE: &str = "ca.crt";
const KEY_FILE: &str = "ca.key";
const ROOTS_FILE: &str = "roots.crt";

/// How far back a certificate's validity starts, for clocks that are a little behind.
const BACKDATE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot generate the root certificate: {0}")]
    Generate(rcgen::Error),
}

/// Why a signing request was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("the certificate signing request is not valid: {0}")]
    BadRequest(rcgen::Error),
    #[error("`{0}` cannot be part of a SPIFFE ID (letters, digits, `.`, `-` and `_` only)")]
    BadName(String),
    #[error("cannot sign the certificate: {0}")]
    Sign(rcgen::Error),
}

/// A signed workload certificate.
#[derive(Debug)]
pub struct Issued {
    pub identity: String,
    /// The workload's certificate, then the CA's chain.
    pub chain: Vec<CertificateDer<'static>>,
    pub not_after: SystemTime,
}

pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// Intermediates (and the signing certificate when it is not a root) sent after the leaf.
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    pub lifetime: Duration,
    pub dir: PathBuf,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("dir", &self.dir)
            .field("roots", &self.roots.len())
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Loads the CA from `dir`, generating a root there first when the folder has none.
    pub fn load_or_generate(dir: &Path, lifetime: Duration) -> Result<Self, CaError> {
        if !dir.join(CERT_FILE).exists() && !dir.join(KEY_FILE).exists() {
            generate_root(dir)?;
        }
        Self::load(dir, lifetime)
    }

    pub fn load(dir: &Path, lifetime: Duration) -> Result<Self, CaError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let chain = read_certs(&cert_path)?;
        let key_pem = read(&key_path)?;
        let invalid = |path: &Path, reason: String| CaError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| invalid(&key_path, format!("not a usable private key: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&chain[0], key)
            .map_err(|e| invalid(&cert_path, format!("not a usable CA certificate: {e}")))?;
        let roots_path = dir.join(ROOTS_FILE);
        let (chain, roots) = if roots_path.exists() {
            (chain, read_certs(&roots_path)?)
        } else if chain.len() == 1 && is_self_signed(&chain[0]) {
            (Vec::new(), chain)
        } else {
            return Err(invalid(
                &roots_path,
                "missing: the signing certificate is not a self-signed root, so the trust roots must be given".into(),
            ));
        };
        // The chain sent with each leaf stops short of the root, which peers already hold.
        let chain = chain.into_iter().filter(|c| !roots.contains(c)).collect();
        Ok(Self {
            issuer,
            chain,
            roots,
            lifetime,
            dir: dir.to_path_buf(),
        })
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The trust bundle as PEM: what proxies pin for the control plane and verify peers with.
    pub fn roots_pem(&self) -> String {
        self.roots
            .iter()
            .map(|c| {
                ::pem::encode_config(
                    &::pem::Pem::new("CERTIFICATE", c.to_vec()),
                    ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF),
                )
            })
            .collect()
    }

    /// Signs a certificate for `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`
    /// with the public key of `csr`. Nothing else from the request is used.
    pub fn sign(
        &self,
        csr: &[u8],
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Issued, SignError> {
        for part in [trust_domain, namespace, service_account] {
            if part.is_empty()
                || !part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            {
                return Err(SignError::BadName(part.to_string()));
            }
        }
        let request = CertificateSigningRequestParams::from_der(
            &CertificateSigningRequestDer::from(csr.to_vec()),
        )
        .map_err(SignError::BadRequest)?;
        let identity = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}");
        let now = SystemTime::now();
        let not_after = now + self.lifetime;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(identity.clone().try_into().map_err(|e| {
                SignError::BadName(format!("{identity} ({e})"))
            })?)];
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(&request.public_key, &self.issuer)
            .map_err(SignError::Sign)?;
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Ok(Issued {
            identity,
            chain,
            not_after,
        })
    }
}

/// Bytes from the operating system's CSPRNG (serials and tokens must not be guessable).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the operating system's random source is available");
    bytes
}

impl Authority {
    /// A serving certificate for `dns_names` (the admission webhook), signed by this CA, with
    /// its chain (leaf first) and its key.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        lifetime: Duration,
    ) -> Result<
        (
            Vec<CertificateDer<'static>>,
            rustls_pki_types::PrivateKeyDer<'static>,
        ),
        SignError,
    > {
        let key = KeyPair::generate().map_err(SignError::Sign)?;
        let mut params = CertificateParams::new(dns_names.to_vec()).map_err(SignError::Sign)?;
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + lifetime).into();
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(SignError::Sign)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Ok((chain, key))
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = random_bytes();
    // Positive and without a leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let pem = read(path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CaError::Invalid {
            path: path.to_path_buf(),
            reason: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CaError::Invalid {
            path: path.to_path_buf(),
            reason: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

fn is_self_signed(cert: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(cert)
        .map(|(_, c)| c.subject() == c.issuer())
        .unwrap_or(false)
}

/// A new root (ECDSA P-256, ten years), written to `dir` with the key readable by its owner only.
fn generate_root(dir: &Path) -> Result<(), CaError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CaError::Write { path, source }
    };
    fs::create_dir_all(dir).map_err(write_err(dir))?;
    let key = KeyPair::generate().map_err(CaError::Generate)?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Sidemesh");
    name.push(DnType::CommonName, "Sidemesh root CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(10 * 365 * 24 * 3600)).into();
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key).map_err(CaError::Generate)?;

    let key_path = dir.join(KEY_FILE);
    write_private(&key_path, key.serialize_pem().as_bytes()).map_err(write_err(&key_path))?;
    let cert_path = dir.join(CERT_FILE);
    fs::write(&cert_path, cert.pem()).map_err(write_err(&cert_path))?;
    tracing::info!(dir = %dir.display(), "generated a new root certificate authority");
    Ok(())
}

/// Writes a file created with mode 0600, so the key is never readable by others, even briefly.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_root_is_private_and_signs_spiffe_leaves() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Authority::load_or_generate(dir.path(), Duration::from_secs(60)).expect("ca");
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(ca.roots().len(), 1);

        let key = KeyPair::generate().expect("key");
        let csr = CertificateParams::new(vec!["ignored.example".to_string()])
            .expect("params")
            .serialize_request(&key)
            .expect("csr");
        let issued = ca
            .sign(csr.der(), "cluster.local", "demo", "orders")
            .expect("signed");
        assert_eq!(issued.identity, "spiffe://cluster.local/ns/demo/sa/orders");
        let (_, leaf) = x509_parser::parse_x509_certificate(&issued.chain[0]).expect("parse");
        let sans: Vec<String> = leaf
            .subject_alternative_name()
            .expect("san")
            .expect("present")
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            sans,
            vec!["URI(spiffe://cluster.local/ns/demo/sa/orders)".to_string()],
            "only the SPIFFE ID; the name the request asked for is ignored"
        );

        // A second start loads the same root instead of generating one.
        let again = Authority::load_or_generate(dir.path(), Duration::from_secs(60)).expect("ca");
        assert_eq!(again.roots(), ca.roots());

        assert!(matches!(
            ca.sign(csr.der(), "cluster.local", "demo", "a/b"),
            Err(SignError::BadName(_))
        ));
        assert!(matches!(
            ca.sign(b"not a csr", "cluster.local", "demo", "orders"),
            Err(SignError::BadRequest(_))
        ));
    }
}
