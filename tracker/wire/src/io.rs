//! The I/O edge of the wire formats (feature `io`): frames over any tokio byte stream (quinn
//! streams, the control socket), relay streams over quinn, and close reasons in words. The
//! rest of the crate is pure; this module only moves its bytes.

use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::codec::{encode_frame, CodecError, FrameDecoder};
use crate::relay_frame::{RelayDecoder, MAX_RELAY_PACKET, RELAY_HEADER_LEN};

/// How reading or writing a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("stream read failed: {0}")]
    Read(std::io::Error),
    #[error("stream write failed: {0}")]
    Write(std::io::Error),
    #[error("a frame was left incomplete for {0:?}")]
    PartialTimeout(Duration),
    #[error("the stream ended in the middle of a frame")]
    Truncated,
}

/// Reads frames from a stream. A frame that has begun must complete within `partial_timeout`,
/// so a peer cannot pin memory by sending half a frame and going silent.
#[derive(Debug)]
pub struct FrameReader<R> {
    recv: R,
    decoder: FrameDecoder,
    partial_timeout: Duration,
    /// When the frame being assembled began to arrive: the deadline counts from here, not
    /// from the last byte, so a trickle of bytes cannot hold a frame open.
    partial_since: Option<tokio::time::Instant>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(recv: R, max_frame_len: usize, partial_timeout: Duration) -> Self {
        Self { recv, decoder: FrameDecoder::new(max_frame_len), partial_timeout, partial_since: None }
    }

    /// The underlying stream, for raw bytes after the framed part. Bytes already buffered by
    /// the decoder are dropped, so call this only right after a frame the peer follows with
    /// raw data it sends only once answered.
    pub fn into_inner(self) -> R {
        self.recv
    }

    /// The underlying stream and the bytes already read past the last frame: for a peer that
    /// sends raw data right after a frame, unanswered.
    pub fn into_parts(mut self) -> (R, Vec<u8>) {
        let ahead = self.decoder.take_buffered();
        (self.recv, ahead)
    }

    /// A reader that decodes `ahead` (bytes an earlier reader read from `recv`) first.
    pub fn with_ahead(recv: R, max_frame_len: usize, partial_timeout: Duration, ahead: &[u8]) -> Self {
        let mut reader = Self::new(recv, max_frame_len, partial_timeout);
        reader.decoder.extend(ahead);
        reader
    }

    /// The next frame, or `None` when the peer finished the stream cleanly between frames.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, StreamError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                self.partial_since = None;
                return Ok(Some(frame));
            }
            let mut chunk = [0u8; 16 * 1024];
            let read = self.recv.read(&mut chunk);
            let read = if self.decoder.has_partial() {
                let since = *self.partial_since.get_or_insert_with(tokio::time::Instant::now);
                tokio::time::timeout_at(since + self.partial_timeout, read)
                    .await
                    .map_err(|_| StreamError::PartialTimeout(self.partial_timeout))?
            } else {
                read.await
            };
            match read.map_err(StreamError::Read)? {
                0 if self.decoder.has_partial() => return Err(StreamError::Truncated),
                0 => return Ok(None),
                n => self.decoder.extend(&chunk[..n]),
            }
        }
    }
}

/// Encodes `message` and writes it as one frame.
pub async fn write_frame<T: Serialize>(
    send: &mut (impl AsyncWrite + Unpin),
    message: &T,
    max_frame_len: usize,
) -> Result<(), StreamError> {
    let frame = encode_frame(message, max_frame_len)?;
    send.write_all(&frame).await.map_err(StreamError::Write)?;
    Ok(())
}

/// Bytes gathered into one relay-stream write.
pub const RELAY_WRITE: usize = 60 * 1024;

/// `first` and whatever else is queued, up to about [`RELAY_WRITE`] bytes, as one buffer:
/// quinn then holds one chunk per write instead of one per packet, which costs it less than
/// this copy. A lone frame is returned as it is.
fn gather_frames(first: Bytes, queue: &mut mpsc::Receiver<Bytes>) -> Bytes {
    let Ok(second) = queue.try_recv() else { return first };
    let mut out = Vec::with_capacity(RELAY_WRITE + RELAY_HEADER_LEN + MAX_RELAY_PACKET);
    out.extend_from_slice(&first);
    out.extend_from_slice(&second);
    while out.len() < RELAY_WRITE {
        match queue.try_recv() {
            Ok(frame) => out.extend_from_slice(&frame),
            Err(_) => break,
        }
    }
    out.into()
}

/// Writes the relay frames queued for one connection on a uni stream opened with the first
/// of them, until the queue closes or the stream fails.
pub async fn write_relay_stream(conn: &quinn::Connection, queue: &mut mpsc::Receiver<Bytes>) {
    let mut send: Option<quinn::SendStream> = None;
    while let Some(first) = queue.recv().await {
        if send.is_none() {
            send = conn.open_uni().await.ok();
        }
        let Some(stream) = send.as_mut() else { return };
        if stream.write_chunk(gather_frames(first, queue)).await.is_err() {
            return;
        }
    }
}

/// Reads the relay stream the other side opens on `conn` until it ends; after each read,
/// `deliver` takes the whole frames it completed from the decoder.
pub async fn read_relay_stream(conn: &quinn::Connection, mut deliver: impl FnMut(&mut RelayDecoder)) {
    let Ok(mut recv) = conn.accept_uni().await else { return };
    let mut decoder = RelayDecoder::default();
    while let Ok(Some(chunk)) = recv.read_chunk(64 * 1024, true).await {
        decoder.extend(&chunk.bytes);
        deliver(&mut decoder);
    }
}

/// Why a connection ended, in words (for either protocol: see [`crate::close_code::name`]).
pub fn describe_close(error: &quinn::ConnectionError) -> String {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let name = crate::close_code::name(close.error_code.into_inner());
            let reason = crate::printable(&String::from_utf8_lossy(&close.reason), 200);
            if reason.is_empty() || reason == name {
                format!("closed by peer: {name}")
            } else {
                format!("closed by peer: {reason} ({name})")
            }
        }
        quinn::ConnectionError::LocallyClosed => "closed locally".into(),
        quinn::ConnectionError::TimedOut => "timed out".into(),
        other => other.to_string(),
    }
}
