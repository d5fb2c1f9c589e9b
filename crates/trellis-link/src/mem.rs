//! An in-memory link: two connected [`LinkIo`] ends in one process. The hub
//! uses it to talk to its embedded local outpost (so local stages take the
//! very same sync path as remote ones), and the simulation uses it to put
//! many agents on one hub under injected faults.

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::io::{Incoming, LinkIo, LinkIoError};
use crate::protocol::Envelope;

/// How many frames may wait in one direction before `send` waits: the
/// receiver's pace limits the sender, as a socket buffer would.
const BUFFER: usize = 256;

enum Item {
    Frame(Envelope),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close,
}

/// One end of an in-memory link.
pub struct MemLink {
    tx: mpsc::Sender<Item>,
    rx: mpsc::Receiver<Item>,
    closed: bool,
}

/// Two connected ends.
pub fn pair() -> (MemLink, MemLink) {
    let (a_tx, a_rx) = mpsc::channel(BUFFER);
    let (b_tx, b_rx) = mpsc::channel(BUFFER);
    (
        MemLink {
            tx: a_tx,
            rx: b_rx,
            closed: false,
        },
        MemLink {
            tx: b_tx,
            rx: a_rx,
            closed: false,
        },
    )
}

fn gone() -> LinkIoError {
    LinkIoError::Transport("the other end of the link is gone".into())
}

#[async_trait]
impl LinkIo for MemLink {
    async fn send(&mut self, envelope: &Envelope) -> Result<(), LinkIoError> {
        // Round-trip through the wire format, so size limits and encoding
        // errors behave exactly as on a socket.
        let frame = match crate::frame::encode_wire(envelope)? {
            crate::frame::WireFrame::Text(text) => crate::frame::decode(text.as_bytes())?,
            crate::frame::WireFrame::Binary(bytes) => {
                crate::frame::decode_binary_shared(bytes.into())?
            }
        };
        self.tx.send(Item::Frame(frame)).await.map_err(|_| gone())
    }

    async fn recv(&mut self) -> Result<Option<Incoming>, LinkIoError> {
        if self.closed {
            return Ok(None);
        }
        match self.rx.recv().await {
            None | Some(Item::Close) => {
                self.closed = true;
                Ok(None)
            }
            Some(Item::Frame(frame)) => Ok(Some(Incoming::Frame(frame))),
            Some(Item::Pong(payload)) => Ok(Some(Incoming::Pong(payload))),
            // Answered here, like a WebSocket answers pings while read,
            // and surfaced as the peer's heartbeat.
            Some(Item::Ping(payload)) => {
                let _ = self.tx.send(Item::Pong(payload)).await;
                Ok(Some(Incoming::Ping))
            }
        }
    }

    async fn ping(&mut self, payload: Vec<u8>) -> Result<(), LinkIoError> {
        self.tx.send(Item::Ping(payload)).await.map_err(|_| gone())
    }

    async fn close(&mut self, _reason: &str) {
        let _ = self.tx.send(Item::Close).await;
        self.closed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Message;

    #[tokio::test]
    async fn frames_pings_and_close_cross_the_pair() {
        let (mut a, mut b) = pair();
        a.send(&Envelope::new(1, Message::StatusAck { up_to_seq: 7 }))
            .await
            .unwrap();
        assert_eq!(
            b.recv().await.unwrap(),
            Some(Incoming::Frame(Envelope::new(
                1,
                Message::StatusAck { up_to_seq: 7 }
            )))
        );
        a.ping(vec![1, 2]).await.unwrap();
        // b answers the ping while reading; a then sees the pong.
        let reader = tokio::spawn(async move {
            let ping = b.recv().await.unwrap();
            let got = b.recv().await.unwrap();
            (ping, got)
        });
        assert_eq!(a.recv().await.unwrap(), Some(Incoming::Pong(vec![1, 2])));
        a.close("done").await;
        let (ping, got) = reader.await.unwrap();
        assert_eq!(ping, Some(Incoming::Ping));
        assert_eq!(got, None);
    }

    #[tokio::test]
    async fn a_dropped_end_reads_as_closed() {
        let (mut a, b) = pair();
        drop(b);
        assert_eq!(a.recv().await.unwrap(), None);
        assert!(
            a.send(&Envelope::new(1, Message::StatusAck { up_to_seq: 1 }))
                .await
                .is_err()
        );
    }
}
