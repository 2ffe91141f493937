//! Mutual TLS between proxies (rustls with ring, TLS 1.3 only).
//!
//! - Outbound, to an endpoint whose proxy is meshed: TLS with this workload's certificate,
//!   ALPN `h2` or `http/1.1` plus `sidemesh` (the mark of a peer proxy), and a verifier that
//!   checks the chain to the trust roots *and* that the server's SPIFFE ID is the one expected
//!   for that endpoint.
//! - Inbound: the ClientHello is read first; a client offering `sidemesh` gets the mesh
//!   handshake (client certificate required and verified), anyone else is a foreign TLS client
//!   whose bytes can still be passed to the application untouched.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};

/// ALPN id a peer proxy adds to its offer, so the inbound side can tell it from an ordinary
/// TLS client. Alone, it means the connection carries opaque TCP.
pub const ALPN_MESH: &[u8] = b"sidemesh";
/// ALPN id of HTTP/1.x multiplexed over HTTP/2 between proxies (`proto::mux`). A calling
/// proxy offers it before `http/1.1`; a peer that does not know it picks `http/1.1`.
pub const ALPN_MUX: &[u8] = b"sidemesh-h2";
const ALPN_H2: &[u8] = b"h2";
const ALPN_H1: &[u8] = b"http/1.1";

/// What a mesh TLS connection carries, from its negotiated ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Carried {
    Http1,
    Http2,
    /// HTTP/1.x requests as streams of one HTTP/2 connection (`proto::mux`).
    Mux,
    Opaque,
}

impl Carried {
    fn offer(self) -> Vec<Vec<u8>> {
        match self {
            Carried::Http1 => vec![ALPN_H1.to_vec(), ALPN_MESH.to_vec()],
            Carried::Http2 => vec![ALPN_H2.to_vec(), ALPN_MESH.to_vec()],
            Carried::Mux => vec![ALPN_MUX.to_vec(), ALPN_H1.to_vec(), ALPN_MESH.to_vec()],
            Carried::Opaque => vec![ALPN_MESH.to_vec()],
        }
    }

    fn from_alpn(alpn: Option<&[u8]>) -> Self {
        match alpn {
            Some(ALPN_H2) => Carried::Http2,
            Some(ALPN_H1) => Carried::Http1,
            Some(ALPN_MUX) => Carried::Mux,
            _ => Carried::Opaque,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate cannot be parsed")]
    Unparsable,
    #[error("the certificate has no SPIFFE ID (URI SAN `spiffe://...`)")]
    Missing,
    #[error("the certificate has more than one SPIFFE ID")]
    Several,
    #[error("the peer's certificate has expired (a resumed session cannot outlive it)")]
    Expired,
    #[error("the server presented {found}, expected {expected}")]
    Mismatch { found: String, expected: String },
}

/// The one SPIFFE ID (URI SAN) of a certificate.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Result<String, IdentityError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert).map_err(|_| IdentityError::Unparsable)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| IdentityError::Unparsable)?
        .ok_or(IdentityError::Missing)?;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
        _ => None,
    });
    let id = ids.next().ok_or(IdentityError::Missing)?;
    if ids.next().is_some() {
        return Err(IdentityError::Several);
    }
    Ok(id.to_string())
}

fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Client settings differ by the peer identity expected and the ALPN offered.
type ClientKey = (Arc<str>, Carried);

/// The TLS settings made from one workload certificate. A renewal builds new ones.
pub struct Configs {
    pub server: Arc<ServerConfig>,
    /// The same, offering `sidemesh-h2` first (a proxy that multiplexes HTTP/1.x).
    pub server_mux: Arc<ServerConfig>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    /// Per expected peer identity and ALPN offer; each keeps its own session cache, so
    /// reconnections to a peer resume instead of doing a full handshake.
    clients: Mutex<HashMap<ClientKey, Arc<ClientConfig>>>,
}

impl std::fmt::Debug for Configs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Configs")
            .field("chain", &self.chain.len())
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl Configs {
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: RootCertStore,
    ) -> Result<Self, rustls::Error> {
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_H1.to_vec(), ALPN_MESH.to_vec()];
        // The server picks the first of its own protocols the client offers: a proxy that
        // multiplexes prefers `sidemesh-h2` to the `http/1.1` offered beside it.
        let mut server_mux = server.clone();
        server_mux.alpn_protocols.insert(0, ALPN_MUX.to_vec());
        Ok(Self {
            server: Arc::new(server),
            server_mux: Arc::new(server_mux),
            chain,
            key,
            roots,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// Client settings for a connection to a proxy that must present `expected`.
    fn client(
        &self,
        expected: &Arc<str>,
        carried: Carried,
    ) -> Result<Arc<ClientConfig>, rustls::Error> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(config) = clients.get(&(expected.clone(), carried)) {
            return Ok(config.clone());
        }
        let verifier = Arc::new(SpiffeVerifier {
            roots: self.roots.clone(),
            expected: expected.clone(),
            algorithms: provider().signature_verification_algorithms,
        });
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = carried.offer();
        let config = Arc::new(config);
        clients.insert((expected.clone(), carried), config.clone());
        Ok(config)
    }
}

/// Verifies a peer proxy's server certificate: chain to the trust roots, then its SPIFFE ID.
#[derive(Debug)]
struct SpiffeVerifier {
    roots: Arc<RootCertStore>,
    expected: Arc<str>,
    algorithms: WebPkiSupportedAlgorithms,
}

fn other(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let found = spiffe_id(end_entity).map_err(other)?;
        if *found != *self.expected {
            return Err(other(IdentityError::Mismatch {
                found,
                expected: self.expected.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered.
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A handshake failure in words: the identity check's own message when that is what failed.
fn describe(e: &io::Error) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.to_string()
        }
        rustls::Error::InvalidCertificate(why) => {
            format!("the server's certificate is not valid: {why:?}")
        }
        other => other.to_string(),
    }
}

/// Originates mesh TLS over `io` to a proxy at `ip` that must present `expected`.
pub async fn connect<IO>(
    configs: &Configs,
    io: IO,
    ip: IpAddr,
    expected: &Arc<str>,
    carried: Carried,
    timeout: Duration,
) -> io::Result<tokio_rustls::client::TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let config = configs
        .client(expected, carried)
        .map_err(io::Error::other)?;
    // An IP server name: rustls sends no SNI; identity is checked by the verifier instead.
    let handshake = TlsConnector::from(config).connect(ServerName::IpAddress(ip.into()), io);
    match tokio::time::timeout(timeout, handshake).await {
        Ok(result) => result.map_err(|e| io::Error::new(e.kind(), describe(&e))),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("TLS handshake timed out after {timeout:?}"),
        )),
    }
}

/// An inbound TLS connection, after its ClientHello.
pub enum Accepted<IO> {
    /// A peer proxy, authenticated.
    Mesh {
        stream: Box<tokio_rustls::server::TlsStream<Recorder<IO>>>,
        peer: Arc<str>,
        carried: Carried,
    },
    /// An ordinary TLS client (no `sidemesh` ALPN): the bytes read so far, and the connection.
    Foreign { read: Bytes, io: IO },
}

impl<IO> std::fmt::Debug for Accepted<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Accepted::Mesh { peer, carried, .. } => f
                .debug_struct("Mesh")
                .field("peer", peer)
                .field("carried", carried)
                .finish(),
            Accepted::Foreign { read, .. } => f
                .debug_struct("Foreign")
                .field("read", &read.len())
                .finish(),
        }
    }
}

/// Reads the ClientHello, then finishes the mesh handshake for peer proxies. `configs` is
/// `None` while this proxy has no certificate: peers are refused, foreign clients are not.
/// `mux`: accept HTTP/1.x multiplexed over HTTP/2 from peers that offer it.
pub async fn accept<IO>(
    io: IO,
    configs: Option<&Configs>,
    timeout: Duration,
    mux: bool,
) -> io::Result<Accepted<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = || {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("TLS handshake not done after {timeout:?}"),
        )
    };
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), Recorder::new(io));
    let start = tokio::time::timeout_at(deadline, acceptor)
        .await
        .map_err(|_| timed_out())??;
    let from_peer = start
        .client_hello()
        .alpn()
        .is_some_and(|mut offers| offers.any(|p| p == ALPN_MESH));
    if !from_peer {
        let mut recorder = start.io;
        let read = recorder.stop();
        return Ok(Accepted::Foreign {
            read,
            io: recorder.io,
        });
    }
    let Some(configs) = configs else {
        return Err(io::Error::other(
            "a peer proxy connected before this proxy has its workload certificate",
        ));
    };
    let server = if mux {
        &configs.server_mux
    } else {
        &configs.server
    };
    let mut stream = tokio::time::timeout_at(deadline, start.into_stream(server.clone()))
        .await
        .map_err(|_| timed_out())??;
    let (recorder, connection) = stream.get_mut();
    recorder.stop();
    let cert = connection
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| io::Error::other("the peer sent no certificate"))?;
    // A resumed TLS 1.3 session carries the certificate of its first handshake, unchecked:
    // make sure it has not expired since.
    let valid =
        x509_parser::parse_x509_certificate(cert).is_ok_and(|(_, c)| c.validity().is_valid());
    if !valid {
        return Err(io::Error::other(IdentityError::Expired));
    }
    let peer = spiffe_id(cert).map_err(io::Error::other)?;
    let carried = Carried::from_alpn(connection.alpn_protocol());
    Ok(Accepted::Mesh {
        stream: Box::new(stream),
        peer: Arc::from(peer),
        carried,
    })
}

/// Keeps a copy of what is read until `stop`, so a ClientHello that turns out not to be for
/// the mesh can be replayed to the application.
#[derive(Debug)]
pub struct Recorder<IO> {
    io: IO,
    read: Option<BytesMut>,
}

impl<IO> Recorder<IO> {
    fn new(io: IO) -> Self {
        Self {
            io,
            read: Some(BytesMut::new()),
        }
    }

    fn stop(&mut self) -> Bytes {
        self.read.take().map(BytesMut::freeze).unwrap_or_default()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Recorder<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if let (Some(read), Poll::Ready(Ok(()))) = (&mut this.read, &result) {
            read.extend_from_slice(&buf.filled()[before..]);
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Recorder<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// An upstream connection: plain TCP, or mesh TLS over it.
#[derive(Debug)]
pub enum MaybeTls<IO> {
    Plain(IO),
    Tls(Box<tokio_rustls::client::TlsStream<IO>>),
}

impl<IO> MaybeTls<IO> {
    /// What the peer agreed the connection carries (mesh TLS only).
    pub fn carried(&self) -> Option<Carried> {
        match self {
            MaybeTls::Plain(_) => None,
            MaybeTls::Tls(tls) => Some(Carried::from_alpn(tls.get_ref().1.alpn_protocol())),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_read(cx, buf),
            MaybeTls::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_write(cx, buf),
            MaybeTls::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_flush(cx),
            MaybeTls::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_shutdown(cx),
            MaybeTls::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(io) => io.is_write_vectored(),
            MaybeTls::Tls(io) => io.is_write_vectored(),
        }
    }
}
