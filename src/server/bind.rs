//! Binding the listening sockets (`--listen`, `--admin-listen`, the `[[listener]]`s): with a
//! backlog for bursts of new connections, and an error that says which listener could not
//! listen, and where.

use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Connections the kernel queues for a listener until a worker accepts them (capped by
/// `net.core.somaxconn`). std's `TcpListener::bind` asks for 128, which a burst of new
/// connections fills at once (a load balancer refilling its pool, clients reconnecting after a
/// deploy); the kernel then drops their SYNs and each waits a second or more to try again.
/// nginx asks for 511, actix-server's own `bind` for 2048.
const BACKLOG: i32 = 1024;

/// Binds `addr` for the listener `what` names (`proxy`, `admin`, ``listener `name` ``).
pub(super) fn listen(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    bind(addr).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            format!(
                "; another process, or another listener of this gateway on port {}? `0.0.0.0` \
                 takes it on every IPv4 address, `[::]` on every IPv6 and IPv4 one",
                addr.port()
            )
        } else {
            String::new()
        };
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} ({what}): {e}{hint}"),
        )
    })
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    // Close-on-exec, as std's: the `__fetch` children must not hold the listeners.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As std sets it: a restarted gateway binds its address again while the connections of
    // the last one are in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if let SocketAddr::V6(a) = addr
        && a.ip().is_unspecified()
    {
        // `[::]` is dual-stack (IPv4 clients arrive as `::ffff:a.b.c.d` peers, matched and
        // logged as IPv4) on every host, whatever its `net.ipv6.bindv6only` says; `validate`
        // refuses an IPv4 listener on the same port beside it.
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;
    use std::time::Duration;

    use super::*;

    /// More connections than std's backlog of 128 wait for their accept: with std's, the
    /// 130th found the queue full and its SYN dropped, and connecting timed out.
    #[test]
    fn a_burst_of_connections_waits_in_the_backlog() {
        let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0)), "test").unwrap();
        let addr = listener.local_addr().unwrap();
        // The kernel's cap (4096 by default since Linux 5.4; 128 before, where this checks
        // nothing more than std's backlog gave).
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(128);
        let burst = somaxconn.min(BACKLOG as usize).min(400);
        let mut queued = Vec::with_capacity(burst);
        for i in 0..burst {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => queued.push(s),
                Err(e) => panic!("connection {} of {burst}: {e}", i + 1),
            }
        }
    }
}
