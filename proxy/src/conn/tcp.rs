//! Opaque TCP: bytes forwarded as they are, both ways, with half-close passed on (a client's
//! FIN becomes a FIN to the upstream, and the other direction keeps flowing until it ends).

use tokio::io::{AsyncRead, AsyncWrite, copy_bidirectional};

/// Copies both ways between a client and an upstream connection until both close.
pub async fn splice<C, S>(mut client: C, mut server: S) -> std::io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    copy_bidirectional(&mut client, &mut server).await
}
