//! A shutdown signal that many tasks can wait on: [`crate::run`] fires it
//! when the caller's shutdown future completes (Ctrl-C in the binary, a
//! oneshot in tests).

use tokio::sync::watch;

/// Resolves [`Shutdown::wait`] once the agent is told to stop. Cloning gives
/// another waiter on the same signal.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// Triggers every [`Shutdown`] made from it; dropping it triggers them too,
/// so a task never waits on a signal nobody can send any more.
#[derive(Debug)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

impl Shutdown {
    /// A signal and the trigger that fires it.
    pub fn channel() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger { tx }, Shutdown { rx })
    }

    /// Whether the signal has fired.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Waits until the signal fires. Cancel-safe.
    pub async fn wait(&mut self) {
        // An error means the trigger is gone, which counts as firing.
        let _ = self.rx.wait_for(|stop| *stop).await;
    }
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
}
