//! Byte relay between two streams, used by every proxy path.

use tokio::io::{AsyncRead, AsyncWrite, copy_bidirectional_with_sizes};

/// Copy buffer per direction. Reads from one side are issued only when the
/// previous chunk was written to the other, so memory per relayed connection
/// is bounded by two of these plus the streams' own buffers (backpressure end
/// to end: a slow tunnel stops the local client, and the reverse).
pub const RELAY_BUFFER: usize = 64 << 10;

/// Copies `a` → `b` and `b` → `a` until both directions have ended. An EOF on
/// one side shuts down the write half of the other (half-close propagates).
/// Returns the bytes copied each way.
///
/// # Errors
/// The first I/O error of either side; the caller drops both streams.
pub async fn relay<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    copy_bidirectional_with_sizes(a, b, RELAY_BUFFER, RELAY_BUFFER).await
}
