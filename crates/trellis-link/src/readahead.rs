//! [`ReadAhead`]: a connection that reads from its socket in large pieces
//! while data flows, and holds no buffer while it is idle.
//!
//! rustls reads TLS records from its transport at most 4 KiB at a time, so
//! a TLS connection carrying a bulk stream makes four or five `recv` calls
//! per 16 KiB record; on loopback the system calls cost more than the
//! decryption. Under the TLS layer, [`ReadAhead`] reads up to
//! [`READ_AHEAD_BYTES`] per call and hands rustls its 4 KiB pieces from
//! memory. Its buffer exists only while there is unread data or a read
//! just returned some: the first time the socket has nothing, the buffer
//! is released, so an idle link (the hub holds thousands) costs nothing.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much one read from the socket asks for.
pub const READ_AHEAD_BYTES: usize = 64 * 1024;

/// A transport that reads ahead; see the module docs. Writes go straight
/// through.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    buf: BytesMut,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buf: BytesMut::new(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Bytes read from the socket and not yet handed on.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            if out.remaining() >= READ_AHEAD_BYTES {
                // A large read: straight into the caller's buffer.
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            // Reuses the allocation once everything in it was handed on.
            this.buf.reserve(READ_AHEAD_BYTES);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Pending => {
                    // Idle: nothing to keep.
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // End of stream: `out` stays empty.
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {}
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Reads until `out` is full or the stream ends, through a [`ReadAhead`]:
/// kept for tests of the wrapper.
#[cfg(test)]
async fn read_all<S: AsyncRead + Unpin>(r: &mut ReadAhead<S>, piece: usize) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    let mut buf = vec![0u8; piece];
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            return all;
        }
        all.extend_from_slice(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn small_and_large_reads_get_every_byte_in_order_and_idle_holds_nothing() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        for piece in [1000, 4096, READ_AHEAD_BYTES, 200_000] {
            let (mut a, b) = tokio::io::duplex(8192);
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                a.write_all(&sent).await.unwrap();
                a.shutdown().await.unwrap();
                a
            });
            let mut r = ReadAhead::new(b);
            assert_eq!(read_all(&mut r, piece).await, data, "pieces of {piece}");
            drop(writer.await.unwrap());
        }

        let (mut a, b) = tokio::io::duplex(8192);
        let mut r = ReadAhead::new(b);
        a.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut r, &mut one)
            .await
            .unwrap();
        // Nothing more to read: the next read waits, and the buffer goes.
        let pending = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            tokio::io::AsyncReadExt::read(&mut r, &mut one),
        )
        .await;
        assert!(pending.is_err());
        assert_eq!(r.buf.capacity(), 0, "an idle connection holds no buffer");
    }
}
