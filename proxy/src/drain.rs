//! Graceful shutdown: a signal every connection watches, and a count of the connections
//! still open, so shutdown can wait for requests in flight (up to a grace period).

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Held by every connection task; the controller waits until all are dropped.
#[derive(Debug, Clone)]
pub struct Drain {
    signal: watch::Receiver<bool>,
    _open: mpsc::Sender<()>,
}

#[derive(Debug)]
pub struct Controller {
    signal: watch::Sender<bool>,
    open_rx: mpsc::Receiver<()>,
}

pub fn channel() -> (Controller, Drain) {
    let (signal, rx) = watch::channel(false);
    let (open_tx, open_rx) = mpsc::channel(1);
    (
        Controller { signal, open_rx },
        Drain {
            signal: rx,
            _open: open_tx,
        },
    )
}

impl Drain {
    /// Resolves once shutdown has begun.
    pub async fn signaled(&mut self) {
        let _ = self.signal.wait_for(|draining| *draining).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }
}

impl Controller {
    /// Tells every connection to finish, then waits until they have (true) or `grace` passes (false).
    /// The caller must have dropped its own `Drain` handles.
    pub async fn drain(mut self, grace: Duration) -> bool {
        let _ = self.signal.send(true);
        tokio::time::timeout(grace, self.open_rx.recv())
            .await
            .is_ok()
    }
}
