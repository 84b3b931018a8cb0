//! A framed reader over a socket half: owns the read buffer and turns the
//! codec's "incomplete" into "read more".
//!
//! Both the server and the client read through [`FrameReader::next`], which
//! re-runs a pure decoder over the buffered bytes after every read. It is
//! cancel-safe (the buffer keeps whatever was read), so a caller can
//! `select!` it against a shutdown signal. A peer that closes between frames
//! yields `Ok(None)`; one that closes in the middle of a frame is an error.

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::codec::{DecodeError, Decoded, Invalid};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("peer closed the connection in the middle of a message")]
    Truncated,
    #[error("invalid message: {0}")]
    Invalid(Invalid),
}

/// The reading side of a connection.
#[derive(Debug)]
pub struct FrameReader<R> {
    rd: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(rd: R) -> Self {
        FrameReader {
            rd,
            buf: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// Decodes the next frame with `dec`; returns it with its bytes (header
    /// and payload, zero-copy) so the caller can slice payloads out.
    pub async fn next<T>(
        &mut self,
        dec: impl Fn(&[u8]) -> Decoded<T>,
    ) -> Result<Option<(T, Bytes)>, FrameError> {
        loop {
            match dec(&self.buf) {
                Ok((t, n)) => return Ok(Some((t, self.buf.split_to(n).freeze()))),
                Err(DecodeError::Invalid(i)) => return Err(FrameError::Invalid(i)),
                Err(DecodeError::Incomplete(need)) => {
                    if need > self.buf.len() {
                        self.buf.reserve(need - self.buf.len());
                    }
                    if self.rd.read_buf(&mut self.buf).await? == 0 {
                        return if self.buf.is_empty() {
                            Ok(None)
                        } else {
                            Err(FrameError::Truncated)
                        };
                    }
                }
            }
        }
    }

    /// Bytes read but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub fn into_inner(self) -> R {
        self.rd
    }
}
