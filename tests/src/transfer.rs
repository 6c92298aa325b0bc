//! A transfer protocol that checks bytes end to end.
//!
//! The client sends a 24-byte header `upload_len (u64 BE) | download_len (u64
//! BE) | seed (u64 BE)`, then streams `upload_len` bytes of
//! [`pattern`]`(seed ^ UP)` while the server streams `download_len` bytes of
//! `pattern(seed ^ DOWN)` back at the same time. When the upload has been
//! read the server appends the SHA-256 of what it received (32 bytes) and
//! closes. The client checks the hash of what it downloaded against the
//! pattern and the server's hash against what it sent: both directions are
//! verified, and both run concurrently (full duplex).

use std::net::SocketAddr;

use anyhow::{Context as _, bail, ensure};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const UP: u64 = 0x5550_5550;
const DOWN: u64 = 0x444f_574e;
const CHUNK: usize = 64 << 10;

/// Deterministic pseudo-random bytes (xorshift64*), cheap to produce and to
/// check.
pub struct Pattern {
    state: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// SHA-256 of `len` bytes of the pattern for `seed`.
pub fn pattern_hash(seed: u64, len: u64) -> [u8; 32] {
    let mut p = Pattern::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        left -= n as u64;
    }
    h.finalize().into()
}

/// What a finished transfer measured.
#[derive(Debug, Clone, Copy)]
pub struct TransferReport {
    pub uploaded: u64,
    pub downloaded: u64,
}

/// Runs the client side over `stream`; fails unless both directions arrived
/// intact.
pub async fn run_client<S>(
    stream: S,
    upload: u64,
    download: u64,
    seed: u64,
) -> anyhow::Result<TransferReport>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut header = [0u8; 24];
    header[..8].copy_from_slice(&upload.to_be_bytes());
    header[8..16].copy_from_slice(&download.to_be_bytes());
    header[16..].copy_from_slice(&seed.to_be_bytes());
    let send = async {
        wr.write_all(&header).await.context("sending header")?;
        let mut p = Pattern::new(seed ^ UP);
        let mut buf = vec![0u8; CHUNK];
        let mut left = upload;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            p.fill(&mut buf[..n]);
            wr.write_all(&buf[..n]).await.context("uploading")?;
            left -= n as u64;
        }
        wr.flush().await?;
        anyhow::Ok(wr)
    };
    let recv = async {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut left = download;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            let got = rd.read(&mut buf[..n]).await.context("downloading")?;
            if got == 0 {
                bail!("connection closed with {left} of {download} bytes still to download");
            }
            h.update(&buf[..got]);
            left -= got as u64;
        }
        let mut server_hash = [0u8; 32];
        rd.read_exact(&mut server_hash)
            .await
            .context("reading the server's hash of the upload")?;
        let rest = rd.read(&mut buf).await.unwrap_or(0);
        ensure!(rest == 0, "server sent {rest} bytes more than asked");
        anyhow::Ok((<[u8; 32]>::from(h.finalize()), server_hash))
    };
    let (wr, (down_hash, server_hash)) = tokio::try_join!(send, recv)?;
    drop(wr);
    ensure!(
        down_hash == pattern_hash(seed ^ DOWN, download),
        "downloaded bytes differ from what the server sent ({download} bytes)"
    );
    ensure!(
        server_hash == pattern_hash(seed ^ UP, upload),
        "server received different bytes than were uploaded ({upload} bytes)"
    );
    Ok(TransferReport {
        uploaded: upload,
        downloaded: download,
    })
}

/// Serves one transfer on `stream`.
pub async fn serve_one<S>(stream: S) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut header = [0u8; 24];
    rd.read_exact(&mut header).await.context("reading header")?;
    let field = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[i * 8..i * 8 + 8]);
        u64::from_be_bytes(b)
    };
    let (upload, download, seed) = (field(0), field(1), field(2));
    let recv = async {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut left = upload;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            let got = rd.read(&mut buf[..n]).await?;
            if got == 0 {
                bail!("client closed with {left} bytes of upload missing");
            }
            h.update(&buf[..got]);
            left -= got as u64;
        }
        anyhow::Ok(<[u8; 32]>::from(h.finalize()))
    };
    let send = async {
        let mut p = Pattern::new(seed ^ DOWN);
        let mut buf = vec![0u8; CHUNK];
        let mut left = download;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            p.fill(&mut buf[..n]);
            wr.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        anyhow::Ok(())
    };
    let (hash, ()) = tokio::try_join!(recv, send)?;
    wr.write_all(&hash).await?;
    wr.shutdown().await?;
    Ok(())
}

/// A transfer server on `listener`, one task per connection, until dropped.
pub fn spawn_server(listener: TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                if let Err(e) = serve_one(stream).await {
                    tracing::debug!(error = %e, "transfer server connection failed");
                }
            });
        }
    })
}

/// Binds a transfer server on `addr` (port 0 for any) and returns its address.
pub async fn start_server(addr: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind(addr).await.expect("bind transfer server");
    let local = listener.local_addr().expect("local addr");
    (local, spawn_server(listener))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn transfer_detects_corruption_and_succeeds_when_intact() {
        let (addr, server) = start_server("127.0.0.1:0".parse().unwrap()).await;
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let report = run_client(stream, 300_000, 500_000, 7).await.unwrap();
        assert_eq!(report.uploaded, 300_000);
        // A server that sends the wrong pattern is caught.
        let bad = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bad_addr = bad.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = bad.accept().await.unwrap();
            let mut header = [0u8; 24];
            s.read_exact(&mut header).await.unwrap();
            let mut junk = vec![0u8; 1000];
            Pattern::new(99).fill(&mut junk);
            s.write_all(&junk).await.unwrap();
            s.write_all(&[0u8; 32]).await.unwrap();
        });
        let stream = tokio::net::TcpStream::connect(bad_addr).await.unwrap();
        assert!(run_client(stream, 0, 1000, 7).await.is_err());
        server.abort();
    }
}
