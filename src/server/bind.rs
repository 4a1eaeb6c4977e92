//! Binding the listening sockets (`--listen`, `--admin-listen`, the `[[listener]]`s): an error
//! says which listener could not listen, and where.

use std::net::{SocketAddr, TcpListener};

/// Binds `addr` for the listener `what` names (`proxy`, `admin`, ``listener `name` ``).
pub(super) fn listen(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({what}): {e}"))
    })
}
