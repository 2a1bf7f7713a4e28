//! Frames over quinn streams: [`FrameReader`] wraps a `RecvStream` with the pure
//! [`FrameDecoder`]; [`write_frame`] encodes and writes one frame.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{encode_frame, CodecError, FrameDecoder};

/// How reading or writing a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("a frame was left incomplete for {0:?}")]
    PartialTimeout(Duration),
    #[error("the stream ended in the middle of a frame")]
    Truncated,
}

/// Reads frames from a stream. A frame that has begun must complete within `partial_timeout`,
/// so a peer cannot pin memory by sending half a frame and going silent.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    partial_timeout: Duration,
    /// When the frame being assembled began to arrive: the deadline counts from here, not
    /// from the last byte, so a trickle of bytes cannot hold a frame open.
    partial_since: Option<tokio::time::Instant>,
}

impl FrameReader {
    pub fn new(recv: quinn::RecvStream, max_frame_len: usize, partial_timeout: Duration) -> Self {
        Self { recv, decoder: FrameDecoder::new(max_frame_len), partial_timeout, partial_since: None }
    }

    /// The underlying stream, for raw bytes after the framed part. Bytes already buffered by
    /// the decoder are dropped, so call this only right after a frame the peer follows with
    /// raw data it sends only once answered.
    pub fn into_inner(self) -> quinn::RecvStream {
        self.recv
    }

    /// The next frame, or `None` when the peer finished the stream cleanly between frames.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, StreamError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                self.partial_since = None;
                return Ok(Some(frame));
            }
            let read = self.recv.read_chunk(16 * 1024, true);
            let chunk = if self.decoder.has_partial() {
                let since = *self.partial_since.get_or_insert_with(tokio::time::Instant::now);
                tokio::time::timeout_at(since + self.partial_timeout, read)
                    .await
                    .map_err(|_| StreamError::PartialTimeout(self.partial_timeout))??
            } else {
                read.await?
            };
            match chunk {
                Some(chunk) => self.decoder.extend(&chunk.bytes),
                None if self.decoder.has_partial() => return Err(StreamError::Truncated),
                None => return Ok(None),
            }
        }
    }
}

/// Encodes `message` and writes it as one frame.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    message: &T,
    max_frame_len: usize,
) -> Result<(), StreamError> {
    let frame = encode_frame(message, max_frame_len)?;
    send.write_all(&frame).await?;
    Ok(())
}
