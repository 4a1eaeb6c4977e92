//! Small shared helpers.

pub mod clock;
pub mod digits;

/// What `tracing` logs at `level` and more severe while `f` runs on this thread, as plain text
/// (no colours), for tests of what the gateway logs.
#[cfg(test)]
pub(crate) fn captured_logs<R>(level: tracing::Level, f: impl FnOnce() -> R) -> (R, String) {
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    // With one live dispatcher, tracing-core works out a log site's interest from the default
    // of whichever thread reaches it first: a test thread without a subscriber then marks it
    // "never" for the whole process, and this capture misses its lines (tokio-rs/tracing#2874).
    // A second dispatcher, alive for good, makes it ask each event instead.
    static ANOTHER: std::sync::LazyLock<tracing::Dispatch> = std::sync::LazyLock::new(|| {
        tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default())
    });
    std::sync::LazyLock::force(&ANOTHER);
    let buf = Captured::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text =
        String::from_utf8_lossy(&buf.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    (out, text)
}

/// A hash map for per-worker tables keyed by config-made values (pool keys, route and upstream
/// names, status codes): foldhash instead of SipHash, whose per-byte cost showed in profiles.
/// Not for keys a client chooses (rate-limit keys keep a keyed hasher against flooding).
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The token of an `Authorization: Bearer <token>` value; the scheme's case does not matter
/// (RFC 9110 §11.1). `None` for another scheme.
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii_start();
    let at = value.iter().position(|&b| b == b' ' || b == b'\t')?;
    let (scheme, token) = value.split_at(at);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then_some(token.trim_ascii())
}

/// Appends `addr` as `Display` writes it, without the formatting machinery for IPv4 (the
/// common case: X-Forwarded-For and the access log write one per request). An IPv4 address is
/// four copies from a table into a stack buffer, appended once.
pub fn push_ip<B: bytes::BufMut>(out: &mut B, addr: std::net::IpAddr) {
    match addr {
        std::net::IpAddr::V4(v4) => {
            // Four octets of at most "255.": 16 bytes.
            let mut text = [0u8; 16];
            let mut len = 0;
            for octet in v4.octets() {
                let (digits, n) = &OCTETS[usize::from(octet)];
                if let Some(at) = text.get_mut(len..len + 4) {
                    at.copy_from_slice(digits);
                }
                len += usize::from(*n);
            }
            // Without the dot after the last octet.
            out.put_slice(text.get(..len - 1).unwrap_or_default());
        }
        std::net::IpAddr::V6(v6) => {
            use std::io::Write;
            let _ = write!(bytes::BufMut::writer(&mut *out), "{v6}");
        }
    }
}

/// Each octet's decimal digits and a dot, and how many of the four bytes those are.
static OCTETS: [([u8; 4], u8); 256] = {
    let mut table = [([0u8; 4], 0u8); 256];
    let mut i = 0;
    while i < 256 {
        let o = i as u8;
        table[i] = if o >= 100 {
            ([b'0' + o / 100, b'0' + o / 10 % 10, b'0' + o % 10, b'.'], 4)
        } else if o >= 10 {
            ([b'0' + o / 10, b'0' + o % 10, b'.', 0], 3)
        } else {
            ([b'0' + o, b'.', 0, 0], 2)
        };
        i += 1;
    }
    table
};

/// A listen address (`--listen`, `--admin-listen`, a `[[listener]]`'s `address`): `ip:port`,
/// an IPv6 address in brackets (`[::1]:8443`). Refused with what to write instead, since an
/// IPv6 address without brackets (`::1:8443`) is an address without a port, not `::1` and a
/// port.
pub fn parse_listen_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::{IpAddr, Ipv6Addr};
    let text = text.trim();
    if let Ok(a) = text.parse() {
        return Ok(a);
    }
    // `::1:8443` read as an IPv6 address, and as one followed by a port.
    let whole = text.parse::<Ipv6Addr>().ok();
    let split = text
        .rsplit_once(':')
        .filter(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|(h, p)| Some((h.parse::<Ipv6Addr>().ok()?, p.parse::<u16>().ok()?)));
    let brackets = "an IPv6 address is written in brackets before the port";
    let help = match (whole, split) {
        (Some(ip), Some((h, port))) => format!(
            "{brackets}: `[{h}]:{port}` if {port} is the port, `[{ip}]:<port>` to bind {ip}"
        ),
        (Some(ip), None) => format!("{brackets}: `[{ip}]:<port>`"),
        (None, Some((h, port))) => format!("{brackets}: `[{h}]:{port}`"),
        (None, None) => {
            if let Ok(ip) = text.parse::<IpAddr>() {
                format!("add the port: `{ip}:<port>`")
            } else if text.starts_with('[') && text.contains('%') {
                "zone ids (`%eth0`) are not supported: bind `[::]:<port>` or an address that is \
                 not link-local"
                    .to_owned()
            } else if let Some(ip) = text
                .strip_prefix('[')
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<Ipv6Addr>().ok())
            {
                format!("add the port: `[{ip}]:<port>`")
            } else {
                "write an IP address and a port, e.g. `0.0.0.0:8443`, or `[::]:8443` for IPv6 \
                 (names are not resolved)"
                    .to_owned()
            }
        }
    };
    Err(help)
}

/// A socket address whose IP is IPv4-mapped (an IPv4 peer of a dual-stack `[::]` listener) as
/// the IPv4 socket address: connections, logs and access lines show `192.0.2.7:1234`, never
/// `[::ffff:192.0.2.7]:1234`.
pub fn canonical_peer(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(canonical_ip(addr.ip()), addr.port())
}

/// Maps IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) to IPv4, so one rule covers both.
pub fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The address a client is counted by: IPv4 (and IPv4-mapped IPv6) as it is, IPv6 by its first
/// `ipv6_prefix` bits (one host or subscriber line usually holds a whole /64).
pub fn client_prefix(ip: std::net::IpAddr, ipv6_prefix: u8) -> std::net::IpAddr {
    match canonical_ip(ip) {
        std::net::IpAddr::V6(v6) if ipv6_prefix < 128 => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(ipv6_prefix))
                .unwrap_or(0);
            std::net::IpAddr::V6((u128::from(v6) & mask).into())
        }
        other => other,
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

/// A rare path's future (a new connection, a TLS handshake, an HTTP/2 or hyper exchange, a body
/// a plugin reads), boxed, and polled from a function of its own that is never inlined.
///
/// Boxing alone keeps the future's state out of its caller's, but a boxed future's `poll` is
/// still a static call, and the profile-guided build inlined these into the request path's
/// poll function: its stack frame grew to 26 KB, which every poll of every request touched
/// (six stack probes a page apart, and locals spread over the frame), missing the data cache
/// each time (docs/performance.md, "Cold paths out of line").
pub struct Cold<'a, T>(std::pin::Pin<Box<dyn std::future::Future<Output = T> + 'a>>);

/// Boxes `future` as a [`Cold`] one.
pub fn cold<'a, F: std::future::Future + 'a>(future: F) -> Cold<'a, F::Output> {
    Cold(Box::pin(future))
}

impl<T> std::future::Future for Cold<'_, T> {
    type Output = T;

    #[inline(never)]
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<T> {
        self.0.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::push_ip;

    fn pushed(ip: IpAddr) -> String {
        let mut out = b"x".to_vec();
        push_ip(&mut out, ip);
        String::from_utf8(out).unwrap_or_default()
    }

    #[test]
    fn push_ip_writes_what_display_writes() {
        // Every octet value in every position (with the others at their widest and narrowest).
        for v in 0..=255u8 {
            for other in [0u8, 9, 10, 99, 100, 255] {
                for ip in [
                    Ipv4Addr::new(v, other, other, other),
                    Ipv4Addr::new(other, v, other, other),
                    Ipv4Addr::new(other, other, v, other),
                    Ipv4Addr::new(other, other, other, v),
                ] {
                    assert_eq!(pushed(IpAddr::V4(ip)), format!("x{ip}"));
                }
            }
        }
        for ip in [
            Ipv6Addr::LOCALHOST,
            "2001:db8::1:0:0:1".parse().unwrap_or(Ipv6Addr::UNSPECIFIED),
        ] {
            assert_eq!(pushed(IpAddr::V6(ip)), format!("x{ip}"));
        }
    }

    #[test]
    fn listen_addresses_are_ip_and_port_and_the_refusals_say_what_to_write() {
        use super::parse_listen_addr;
        for ok in [
            "0.0.0.0:8080",
            "[::]:8443",
            "[::1]:0",
            " [::1]:8443 ",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(parse_listen_addr(ok).is_ok(), "{ok}");
        }
        for (bad, help) in [
            (
                "::1:8443",
                "`[::1]:8443` if 8443 is the port, `[::1:8443]:<port>` to bind ::1:8443",
            ),
            ("fe80::1", "`[fe80::1]:<port>`"),
            ("::1:21630", "brackets before the port: `[::1]:21630`"),
            ("::", "`[::]:<port>`"),
            ("[::1]", "add the port: `[::1]:<port>`"),
            ("127.0.0.1", "add the port: `127.0.0.1:<port>`"),
            ("[fe80::1%lo]:8443", "zone ids"),
            ("[::1]:99999", "`[::]:8443` for IPv6"),
            ("localhost:8080", "names are not resolved"),
        ] {
            let got = parse_listen_addr(bad).err().unwrap_or_default();
            assert!(got.contains(help), "{bad}: {got}");
        }
    }
}
