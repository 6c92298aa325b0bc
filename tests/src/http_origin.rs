//! A minimal HTTP/1.1 origin server for proxy tests: `GET /bytes/N` answers
//! N bytes of the transfer pattern (seed 7), anything else 404.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::transfer::Pattern;

/// Seed of the bodies served by `/bytes/N`.
pub const BODY_SEED: u64 = 7;

/// Starts the origin on `addr`; returns its address.
pub async fn start(addr: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.expect("bind origin");
    let local = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head);
                let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
                let len = path
                    .strip_prefix("/bytes/")
                    .and_then(|n| n.parse::<usize>().ok());
                let Some(len) = len else {
                    let _ = s
                        .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                };
                let mut body = vec![0u8; len];
                Pattern::new(BODY_SEED).fill(&mut body);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
                let _ = s.shutdown().await;
            });
        }
    });
    local
}
