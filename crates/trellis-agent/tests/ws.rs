//! `WsLink`, the WebSocket `LinkIo`, treats what the hub sends as hostile:
//! binary messages, garbage text and oversized messages are errors (never
//! panics), pings are answered without surfacing, a close ends the link.

use futures_util::{SinkExt, StreamExt};
use tokio::io::DuplexStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use trellis_agent::ws::{WsLink, websocket_config};
use trellis_link::{Envelope, FrameError, Incoming, LinkIo, LinkIoError, MAX_FRAME_BYTES, Message};

async fn pair() -> (WsLink<DuplexStream>, WebSocketStream<DuplexStream>) {
    let (client, server) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(tokio_tungstenite::accept_async(server));
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        "ws://hub/link/v1",
        client,
        Some(websocket_config()),
    )
    .await
    .unwrap();
    (WsLink::new(ws), server.await.unwrap().unwrap())
}

fn frame(msg: Message) -> WsMessage {
    let bytes = trellis_link::encode(&Envelope::new(1, msg)).unwrap();
    WsMessage::text(String::from_utf8(bytes).unwrap())
}

#[tokio::test]
async fn frames_arrive_pings_are_answered_and_a_close_ends_the_link() {
    let (mut link, mut hub) = pair().await;
    hub.send(WsMessage::Ping(b"p".to_vec().into()))
        .await
        .unwrap();
    hub.send(frame(Message::StatusAck { up_to_seq: 3 }))
        .await
        .unwrap();
    let got = link.recv().await.unwrap();
    assert_eq!(
        got,
        Some(Incoming::Frame(Envelope::new(
            1,
            Message::StatusAck { up_to_seq: 3 }
        )))
    );
    // The agent answered the ping on its own.
    assert_eq!(
        hub.next().await.unwrap().unwrap(),
        WsMessage::Pong(b"p".to_vec().into())
    );

    link.send(&Envelope::new(
        1,
        Message::Ack {
            desired: Vec::new(),
        },
    ))
    .await
    .unwrap();
    let WsMessage::Text(text) = hub.next().await.unwrap().unwrap() else {
        panic!("frames are text messages");
    };
    assert_eq!(
        trellis_link::decode(text.as_bytes()).unwrap().msg.kind(),
        "ack"
    );

    hub.close(None).await.unwrap();
    assert_eq!(link.recv().await.unwrap(), None);
}

#[tokio::test]
async fn binary_and_garbage_messages_are_frame_errors() {
    let (mut link, mut hub) = pair().await;
    hub.send(WsMessage::Binary(b"{}".to_vec().into()))
        .await
        .unwrap();
    let err = link.recv().await.unwrap_err();
    assert!(
        matches!(err, LinkIoError::Frame(FrameError::Malformed { .. })),
        "{err}"
    );

    hub.send(WsMessage::text(
        "{\"v\":1,\"seq\":1,\"msg\":{\"type\":\"nope\"}}",
    ))
    .await
    .unwrap();
    let err = link.recv().await.unwrap_err();
    assert!(
        matches!(
            err,
            LinkIoError::Frame(FrameError::UnknownMessageType { .. })
        ),
        "{err}"
    );

    hub.send(WsMessage::text("not json")).await.unwrap();
    assert!(matches!(link.recv().await, Err(LinkIoError::Frame(_))));
}

#[tokio::test]
async fn an_oversized_message_is_refused() {
    let (mut link, mut hub) = pair().await;
    let big = "x".repeat(MAX_FRAME_BYTES + 1);
    tokio::spawn(async move {
        let _ = hub.send(WsMessage::text(big)).await;
        // Keep the server end alive until the client has read.
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    });
    let err = link.recv().await.unwrap_err();
    assert!(
        matches!(err, LinkIoError::Frame(FrameError::TooLarge { .. })),
        "{err}"
    );
}
