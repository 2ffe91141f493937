//! Opaque TCP: bytes forwarded as they are, both ways, with half-close passed on (a client's
//! FIN becomes a FIN to the upstream, and the other direction keeps flowing until it ends).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWriteExt, copy_bidirectional};
use tokio::net::TcpStream;

use crate::rewind::Rewind;

/// Connects to `upstream`, sends the bytes already read, then copies both ways until both close.
pub async fn forward(
    client: TcpStream,
    peeked: Bytes,
    upstream: SocketAddr,
    connect_timeout: Duration,
) -> std::io::Result<(u64, u64)> {
    let mut server = match tokio::time::timeout(connect_timeout, TcpStream::connect(upstream)).await
    {
        Ok(stream) => stream?,
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect to {upstream} timed out after {connect_timeout:?}"),
            ));
        }
    };
    server.set_nodelay(true)?;
    let mut client = Rewind::new(Bytes::new(), client);
    if !peeked.is_empty() {
        server.write_all(&peeked).await?;
    }
    copy_bidirectional(&mut client, &mut server).await
}
