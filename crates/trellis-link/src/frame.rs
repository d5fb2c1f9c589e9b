//! Bytes ⇄ [`Envelope`]: the only place frames are parsed.
//!
//! [`decode`] treats its input as hostile: the size is checked before any
//! parsing, the protocol version is peeked before the message is interpreted
//! (so a frame from a newer peer is reported as "newer protocol", not as
//! garbage), and every failure is an error value, never a panic. JSON nesting
//! is bounded by serde_json's recursion limit (128 levels).

use serde::Deserialize;

use crate::protocol::{Envelope, MESSAGE_TYPES, Message, PROTOCOL_VERSION, StreamChannel};

/// The largest frame either side sends or accepts: 4 MiB. Desired states are
/// small (artifacts travel out of band, by digest); the limit bounds the
/// memory a misbehaving peer can make the other side allocate.
pub const MAX_FRAME_BYTES: usize = 4 << 20;

/// The WebSocket read buffer of a link, on both sides, and how much is
/// read from the connection at a time. tungstenite's default (128 KiB) is
/// zero-filled on every read, so each idle link would keep 128 KiB
/// resident at each end. Most frames are a few hundred bytes (acks, status
/// reports, log requests); a larger one grows the buffer
/// to its size, which then stays. A heap profile of a hub with 5,000 idle
/// links found this buffer the largest thing each link held beyond TLS
/// (4 KiB at the earlier size).
pub const LINK_READ_BUFFER_BYTES: usize = 1 << 10;

/// Errors are kept short: the message of a serde error can quote input, so
/// reasons are cut to this many bytes.
const MAX_REASON_LEN: usize = 300;

/// Why a frame could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error(
        "a link frame of {len} bytes is over the {max}-byte limit and was refused; \
         if it carried a stage's desired state, make that state smaller (inline files and \
         config values count), otherwise the peer is misbehaving"
    )]
    TooLarge { len: usize, max: usize },

    #[error(
        "a link frame is not a valid message: {reason}; check that the peer is a Trellis \
         hub or agent of a compatible version"
    )]
    Malformed { reason: String },

    #[error(
        "the peer sent a link message of type {type_name:?}, which this version of Trellis \
         does not know; upgrade this side to the peer's version"
    )]
    UnknownMessageType { type_name: String },

    #[error(
        "the peer speaks link protocol version {got}, but this build speaks version \
         {supported}; upgrade the older of the hub and the agent so that both speak the same \
         version"
    )]
    UnsupportedVersion { got: u64, supported: u16 },

    #[error(
        "could not encode a link message ({reason}); this is a bug in Trellis, please report it"
    )]
    Encode { reason: String },
}

impl FrameError {
    /// The stable error code, for logs, metrics and the status model.
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "frame-too-large",
            FrameError::Malformed { .. } => "frame-malformed",
            FrameError::UnknownMessageType { .. } => "unknown-message-type",
            FrameError::UnsupportedVersion { .. } => "unsupported-protocol-version",
            FrameError::Encode { .. } => "frame-encode-failed",
        }
    }

    fn malformed(reason: impl ToString) -> Self {
        FrameError::Malformed {
            reason: truncate(reason.to_string()),
        }
    }
}

/// Encodes an envelope as one frame (compact JSON), refusing one larger
/// than [`MAX_FRAME_BYTES`] so the peer is never sent something it must
/// refuse.
pub fn encode(envelope: &Envelope) -> Result<Vec<u8>, FrameError> {
    let bytes = serde_json::to_vec(envelope).map_err(|e| FrameError::Encode {
        reason: truncate(e.to_string()),
    })?;
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len: bytes.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    Ok(bytes)
}

/// A frame as it travels on a WebSocket: JSON text, or — for stream data
/// only — binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireFrame {
    Text(String),
    Binary(Vec<u8>),
}

/// The first bytes of every binary frame.
const BINARY_MAGIC: &[u8; 2] = b"TS";

/// Magic, version, sequence number, stream id, channel.
pub const BINARY_HEADER_BYTES: usize = 2 + 2 + 8 + 8 + 1;

/// Encodes an envelope as it goes on a WebSocket. Stream data is a binary
/// frame — `TS`, the protocol version (u16), the envelope's sequence
/// number (u64), the stream id (u64), the channel byte, then the bytes, all
/// integers big-endian — because as JSON its bytes would be base64 (a third
/// larger) and parsed twice on the way through the hub. Everything else
/// is JSON text ([`encode`]).
pub fn encode_wire(envelope: &Envelope) -> Result<WireFrame, FrameError> {
    if let Message::StreamData { id, channel, data } = &envelope.msg {
        let len = BINARY_HEADER_BYTES + data.len();
        if len > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge {
                len,
                max: MAX_FRAME_BYTES,
            });
        }
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(BINARY_MAGIC);
        out.extend_from_slice(&envelope.v.to_be_bytes());
        out.extend_from_slice(&envelope.seq.to_be_bytes());
        out.extend_from_slice(&id.to_be_bytes());
        out.push(channel.as_byte());
        out.extend_from_slice(data);
        return Ok(WireFrame::Binary(out));
    }
    let bytes = encode(envelope)?;
    // `encode` writes JSON, which is UTF-8; the error path only guards
    // against that changing.
    String::from_utf8(bytes)
        .map(WireFrame::Text)
        .map_err(|e| FrameError::Encode {
            reason: truncate(format!("the encoded frame is not UTF-8 ({e})")),
        })
}

/// Decodes a binary frame (stream data; see [`encode_wire`]), copying its
/// data out of `bytes`.
pub fn decode_binary(bytes: &[u8]) -> Result<Envelope, FrameError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len: bytes.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    decode_binary_shared(bytes::Bytes::copy_from_slice(bytes))
}

/// Decodes a binary frame as [`decode_binary`] does, without copying: the
/// data is a slice of `frame` (a WebSocket message's payload is already a
/// `Bytes`, so the stream's bytes go on without another pass over them).
pub fn decode_binary_shared(frame: bytes::Bytes) -> Result<Envelope, FrameError> {
    let bytes = &frame[..];
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len: bytes.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    if bytes.len() < BINARY_HEADER_BYTES || &bytes[..2] != BINARY_MAGIC {
        return Err(FrameError::malformed(
            "it is a binary message that is not a stream data frame",
        ));
    }
    let u16_at = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let v = u16_at(2);
    if v != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion {
            got: u64::from(v),
            supported: PROTOCOL_VERSION,
        });
    }
    let channel = StreamChannel::from_byte(bytes[20]).ok_or_else(|| {
        FrameError::malformed(format_args!(
            "a stream data frame names channel {}, which does not exist",
            bytes[20]
        ))
    })?;
    Ok(Envelope {
        v,
        seq: u64_at(4),
        msg: Message::StreamData {
            id: u64_at(12),
            channel,
            data: frame.slice(BINARY_HEADER_BYTES..),
        },
    })
}

/// Decodes one frame.
pub fn decode(bytes: &[u8]) -> Result<Envelope, FrameError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            len: bytes.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        FrameError::malformed(format_args!(
            "it is not UTF-8 text (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;

    // Look at `v` alone first: a future version may have changed everything
    // else, and must be reported as a version mismatch.
    #[derive(Deserialize)]
    struct Head {
        v: Option<serde_json::Value>,
    }
    let head: Head = serde_json::from_str(text).map_err(FrameError::malformed)?;
    match head.v {
        None => return Err(FrameError::malformed("the envelope has no `v` field")),
        Some(serde_json::Value::Number(n)) => match n.as_u64() {
            Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
            Some(got) => {
                return Err(FrameError::UnsupportedVersion {
                    got,
                    supported: PROTOCOL_VERSION,
                });
            }
            None => {
                return Err(FrameError::malformed(format_args!(
                    "the envelope's `v` is {n}, not a whole number"
                )));
            }
        },
        Some(_) => return Err(FrameError::malformed("the envelope's `v` is not a number")),
    }

    serde_json::from_str::<Envelope>(text).map_err(|e| classify(text, e))
}

/// Tells an unknown message type apart from other malformed frames. Runs only
/// on the error path, so the second parse costs nothing on good frames.
fn classify(text: &str, err: serde_json::Error) -> FrameError {
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text)
        && let Some(kind) = value
            .get("msg")
            .and_then(|m| m.get("type"))
            .and_then(|t| t.as_str())
        && !MESSAGE_TYPES.contains(&kind)
    {
        return FrameError::UnknownMessageType {
            type_name: truncate_quoted(kind),
        };
    }
    FrameError::malformed(err)
}

/// Cuts a text that an error shows with `{:?}` (the unknown type name) so
/// that its *escaped* form fits in [`MAX_REASON_LEN`]: escaping can make a
/// text several times longer (`\u{7f}` is six bytes for one), so cutting
/// the raw text to the limit is not enough. Each character counts as long
/// as `char::escape_debug` writes it, which is never shorter than what
/// `Debug` for `str` writes.
fn truncate_quoted(s: &str) -> String {
    let mut escaped = 0;
    for (i, c) in s.char_indices() {
        escaped += c.escape_debug().len();
        if escaped > MAX_REASON_LEN {
            let mut cut = s[..i].to_owned();
            cut.push('…');
            return cut;
        }
    }
    s.to_owned()
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_REASON_LEN {
        let mut end = MAX_REASON_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}
