//! Small shared helpers.

/// A hash map for per-worker tables keyed by config-made values (pool keys, route and upstream
/// names, status codes): foldhash instead of SipHash, whose per-byte cost showed in profiles.
/// Not for keys a client chooses (rate-limit keys keep a keyed hasher against flooding).
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Appends `addr` as `Display` writes it, without the formatting machinery for IPv4 (the
/// common case: X-Forwarded-For and the access log write one per request).
pub fn push_ip(out: &mut Vec<u8>, addr: std::net::IpAddr) {
    match addr {
        std::net::IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(digits.format(octet).as_bytes());
            }
        }
        std::net::IpAddr::V6(v6) => {
            use std::io::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// Maps IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) to IPv4, so one rule covers both.
pub fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Polls `timer` for `cx`'s task, but only when it has fired or when `wakes` (the task its
/// wake-up was last registered for) is another task; otherwise answers `Pending` at once.
/// Polling a pending timer again for the same task registers the same wake-up again, which is
/// most of what a poll costs, and a future polled on every read or every wake-up of its task
/// (a connection's deadline, an attempt's timeout) would pay it each time.
pub fn poll_timer(
    timer: std::pin::Pin<&mut tokio::time::Sleep>,
    wakes: &mut Option<std::task::Waker>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<()> {
    use std::future::Future;
    let same_task = wakes.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
    if same_task && !timer.is_elapsed() {
        return std::task::Poll::Pending;
    }
    if !same_task {
        *wakes = Some(cx.waker().clone());
    }
    timer.poll(cx)
}
