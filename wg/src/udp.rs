//! UDP sockets for WireGuard traffic, and endpoint address normalisation.
//!
//! [`bind_udp`] builds the socket with socket2 so it can be tuned before tokio
//! takes it: dual-stack for `[::]`, large kernel buffers (a WireGuard node
//! lives or dies by its receive buffer under load), non-blocking.
//!
//! On a dual-stack socket IPv4 peers appear as IPv4-mapped IPv6 addresses
//! (`::ffff:a.b.c.d`). The engine compares endpoints, so every address is
//! brought to one canonical form with [`canonical_addr`] (plain IPv4), and
//! turned back with [`addr_for_socket`] before sending on an IPv6 socket.

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::debug;

/// Binds a non-blocking UDP socket on `addr` for use with tokio.
///
/// - An unspecified IPv6 address (`[::]:port`) gives a dual-stack socket
///   that also receives IPv4 (`IPV6_V6ONLY` off).
/// - `SO_RCVBUF` / `SO_SNDBUF` are set to `buffer_bytes`. On Linux the
///   `*FORCE` variants are tried first, which exceed `net.core.rmem_max` when
///   the process has `CAP_NET_ADMIN`; without it the plain options are used
///   (and the kernel caps them silently). `0` leaves the defaults.
///
/// Must be called inside a tokio runtime.
///
/// # Errors
///
/// Creating, configuring or binding the socket failed (e.g. the port is in use).
pub fn bind_udp(addr: SocketAddr, buffer_bytes: usize) -> io::Result<tokio::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let SocketAddr::V6(v6) = addr
        && v6.ip().is_unspecified()
    {
        socket.set_only_v6(false)?;
    }
    if buffer_bytes > 0 {
        set_buffer_sizes(&socket, buffer_bytes);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let std_socket: std::net::UdpSocket = socket.into();
    let socket = tokio::net::UdpSocket::from_std(std_socket)?;
    debug!(
        local = ?socket.local_addr().ok(),
        buffer_bytes,
        "udp socket bound"
    );
    Ok(socket)
}

/// The address the socket is bound to, in canonical form (the actual port
/// when bound to port 0).
///
/// # Errors
///
/// The operating system could not report the address.
pub fn local_addr(socket: &tokio::net::UdpSocket) -> io::Result<SocketAddr> {
    socket.local_addr().map(canonical_addr)
}

/// The kernel's effective (receive, send) buffer sizes of the socket, for
/// logs and tests. Linux reports twice the requested value (bookkeeping).
///
/// # Errors
///
/// The socket options could not be read.
pub fn buffer_sizes(socket: &tokio::net::UdpSocket) -> io::Result<(usize, usize)> {
    let socket = socket2::SockRef::from(socket);
    Ok((socket.recv_buffer_size()?, socket.send_buffer_size()?))
}

/// `addr` with an IPv4-mapped IPv6 address (`[::ffff:a.b.c.d]:p`) turned
/// into plain IPv4 (`a.b.c.d:p`); any other address unchanged.
pub fn canonical_addr(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// `canonical_addr` for a bare IP address.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The destination to pass to `send_to` on a socket bound to `local`: an IPv4
/// destination becomes IPv4-mapped when the socket is IPv6 (dual-stack).
pub fn addr_for_socket(dst: SocketAddr, local: SocketAddr) -> SocketAddr {
    match (dst, local) {
        (SocketAddr::V4(v4), SocketAddr::V6(_)) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        _ => dst,
    }
}

fn set_buffer_sizes(socket: &Socket, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        let forced_rcv = rustix::net::sockopt::set_socket_recv_buffer_size_force(socket, bytes);
        let forced_snd = rustix::net::sockopt::set_socket_send_buffer_size_force(socket, bytes);
        if forced_rcv.is_err() {
            let _ = socket.set_recv_buffer_size(bytes);
        }
        if forced_snd.is_err() {
            let _ = socket.set_send_buffer_size(bytes);
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket.set_recv_buffer_size(bytes);
        let _ = socket.set_send_buffer_size(bytes);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn canonical_forms() {
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:51820".parse().unwrap();
        assert_eq!(canonical_addr(mapped), "192.0.2.7:51820".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        assert_eq!(canonical_addr(v6), v6);
        let v4: SocketAddr = "10.0.0.1:2".parse().unwrap();
        assert_eq!(canonical_addr(v4), v4);
        assert_eq!(
            canonical_ip(IpAddr::V6(Ipv4Addr::new(1, 2, 3, 4).to_ipv6_mapped())),
            IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4))
        );
        let local6: SocketAddr = "[::]:9".parse().unwrap();
        let local4: SocketAddr = "0.0.0.0:9".parse().unwrap();
        assert_eq!(
            addr_for_socket(v4, local6),
            "[::ffff:10.0.0.1]:2".parse().unwrap()
        );
        assert_eq!(addr_for_socket(v4, local4), v4);
        assert_eq!(addr_for_socket(v6, local6), v6);
    }

    #[tokio::test]
    async fn dual_stack_socket_receives_ipv4_with_canonical_source() {
        let receiver = bind_udp((Ipv6Addr::UNSPECIFIED, 0).into(), 1 << 20).unwrap();
        let port = local_addr(&receiver).unwrap().port();
        let (rcv, snd) = buffer_sizes(&receiver).unwrap();
        assert!(rcv >= 1 << 19 && snd >= 1 << 19, "buffers {rcv}/{snd}");

        let sender = bind_udp((Ipv4Addr::LOCALHOST, 0).into(), 0).unwrap();
        let sender_addr = local_addr(&sender).unwrap();
        sender
            .send_to(b"hello", (Ipv4Addr::LOCALHOST, port))
            .await
            .unwrap();

        let mut buf = [0u8; 64];
        let (n, from) = receiver.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert!(from.is_ipv6(), "dual-stack socket reports a mapped address");
        assert_eq!(canonical_addr(from), sender_addr);

        // And back: an IPv4 destination on the IPv6 socket.
        let dst = addr_for_socket(sender_addr, receiver.local_addr().unwrap());
        assert!(dst.is_ipv6());
        receiver.send_to(b"back", dst).await.unwrap();
        let (n, _) = sender.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"back");
    }
}
