//! The access log: one JSON object per line, formatted straight into a per-thread buffer.
//!
//! Going through `tracing`'s JSON formatter cost more than the rest of the request path put
//! together (a `fmt::Write` adaptor that re-checks UTF-8 on every small write, `serde_json`
//! escaping per field, a `chrono`-style timestamp); this writes the same object with the same
//! keys directly. The line goes to the process's [`super::sink`], so it keeps its order with the
//! other log lines. With the pretty (terminal) format, or with no sink installed (tests in one
//! process), the line is a normal `tracing` event instead.
//!
//! Keys, in order: `timestamp`, `level`, the request's fields (README, "Logs"), `target`
//! (`rustygate::access`, so filters on the event target keep working).

use std::cell::RefCell;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::sink::{self, LogSink};

/// The `tracing` target access events use, and the `target` key of every access line.
pub const TARGET: &str = "rustygate::access";

/// One finished request's facts.
pub struct AccessLine<'a> {
    pub request_id: &'a str,
    pub client_ip: IpAddr,
    pub method: &'a str,
    pub protocol: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    /// The route's and the upstream's names: the config compiler accepts only letters, digits,
    /// `-`, `_` and `.` in them, so they are written without the escape scan.
    pub route: &'a str,
    pub upstream: &'a str,
    pub upstream_target: &'a str,
    pub scheme: &'a str,
    pub status: u16,
    pub duration: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub completed: bool,
    pub error: &'a str,
    pub grpc_status: &'a str,
    /// A commit id or `sha256:` and a content hash, in hex: written without the escape scan.
    pub config_version: &'a str,
    /// W3C trace id and the request's server span id, hex; empty when tracing is off. Set for
    /// sampled and unsampled requests alike.
    pub trace_id: &'a str,
    pub span_id: &'a str,
}

/// Where access lines go, decided once when logging is set up.
#[derive(Clone, Copy)]
enum Output {
    /// Filtered out (`RUST_LOG=rustygate::access=off`) or logging not initialised.
    Off,
    /// Formatted here, queued on the sink.
    Json(&'static LogSink),
    /// A `tracing` event (pretty format).
    Tracing,
}

static OUTPUT: OnceLock<Output> = OnceLock::new();

/// Called by [`super::init_logging`] once the subscriber is installed.
pub(super) fn configure(json: bool) {
    let enabled = tracing::enabled!(target: TARGET, tracing::Level::INFO);
    let out = match (enabled, json, sink::global()) {
        (false, _, _) => Output::Off,
        (true, true, Some(s)) => Output::Json(s),
        (true, _, _) => Output::Tracing,
    };
    let _ = OUTPUT.set(out);
}

fn output() -> Output {
    // Not configured (a library user, a test gateway in-process): behave like any `tracing`
    // event, which goes nowhere without a subscriber.
    OUTPUT.get().copied().unwrap_or(Output::Tracing)
}

thread_local! {
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The last whole second formatted, and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
}

impl AccessLine<'_> {
    /// Logs the line where logging is configured to put it.
    pub fn log(&self) {
        match output() {
            Output::Off => {}
            Output::Json(sink) => LINE.with(|line| {
                let Ok(mut line) = line.try_borrow_mut() else {
                    return;
                };
                line.clear();
                self.write_json(&mut line, SystemTime::now());
                sink.push(&line);
                // A rare huge line (a long path) does not stay allocated on the worker.
                if line.capacity() > 16 * 1024 {
                    *line = Vec::new();
                }
            }),
            Output::Tracing => self.trace(),
        }
    }

    fn trace(&self) {
        tracing::info!(
            target: TARGET,
            request_id = self.request_id,
            client_ip = %self.client_ip,
            method = self.method,
            protocol = self.protocol,
            host = self.host,
            path = self.path,
            route = self.route,
            upstream = self.upstream,
            upstream_target = self.upstream_target,
            scheme = self.scheme,
            status = self.status,
            duration_ms = self.duration.as_secs_f64() * 1000.0,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            completed = self.completed,
            error = self.error,
            grpc_status = self.grpc_status,
            config_version = self.config_version,
            trace_id = self.trace_id,
            span_id = self.span_id,
        );
    }

    /// Appends the JSON object and a newline to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>, now: SystemTime) {
        out.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(out, now);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"request_id\":");
        plain(out, self.request_id);
        out.extend_from_slice(b",\"client_ip\":\"");
        crate::util::push_ip(out, self.client_ip);
        out.extend_from_slice(b"\",\"method\":");
        plain(out, self.method);
        out.extend_from_slice(b",\"protocol\":");
        plain(out, self.protocol);
        out.extend_from_slice(b",\"host\":");
        string(out, self.host);
        out.extend_from_slice(b",\"path\":");
        string(out, self.path);
        out.extend_from_slice(b",\"route\":");
        plain(out, self.route);
        out.extend_from_slice(b",\"upstream\":");
        plain(out, self.upstream);
        out.extend_from_slice(b",\"upstream_target\":");
        string(out, self.upstream_target);
        out.extend_from_slice(b",\"scheme\":");
        plain(out, self.scheme);
        out.extend_from_slice(b",\"status\":");
        number(out, u64::from(self.status));
        out.extend_from_slice(b",\"duration_ms\":");
        millis(out, self.duration);
        out.extend_from_slice(b",\"bytes_in\":");
        number(out, self.bytes_in);
        out.extend_from_slice(b",\"bytes_out\":");
        number(out, self.bytes_out);
        out.extend_from_slice(if self.completed {
            b",\"completed\":true,\"error\":"
        } else {
            b",\"completed\":false,\"error\":"
        });
        plain(out, self.error);
        out.extend_from_slice(b",\"grpc_status\":");
        string(out, self.grpc_status);
        out.extend_from_slice(b",\"config_version\":");
        plain(out, self.config_version);
        out.extend_from_slice(b",\"trace_id\":");
        plain(out, self.trace_id);
        out.extend_from_slice(b",\"span_id\":");
        plain(out, self.span_id);
        out.extend_from_slice(b",\"target\":\"rustygate::access\"}\n");
    }
}

fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Milliseconds with microsecond precision: `12.345`.
fn millis(out: &mut Vec<u8>, d: Duration) {
    let micros = d.as_micros().min(u128::from(u64::MAX)) as u64;
    number(out, micros / 1000);
    let frac = (micros % 1000) as u16;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

/// A JSON string whose text never needs escaping, written without [`string`]'s scan. It is for
/// the request id (a valid `X-Request-Id` is `[A-Za-z0-9._:-]`, a generated one hex), the
/// method (an HTTP token), static text (protocol, scheme, error), hex trace ids and config
/// versions, and the route's and upstream's names (checked when the config is compiled). The
/// log's other fields may hold anything a client or a config sends, and go through [`string`].
fn plain(out: &mut Vec<u8>, s: &str) {
    debug_assert!(!s.bytes().any(escaped), "{s:?} needs escaping");
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// The most bytes of one string field a line holds: a client's 125 KB `Host` made a line of
/// 128 KB. Past it the value is cut (on a character boundary) and ends with [`TRUNCATED`].
pub const MAX_FIELD: usize = 4096;

/// What ends a value cut at [`MAX_FIELD`].
pub const TRUNCATED: &str = "...(truncated)";

/// A JSON string: quotes, and `"`, `\` and control characters escaped (RFC 8259 §7); at most
/// [`MAX_FIELD`] bytes of the value.
fn string(out: &mut Vec<u8>, s: &str) {
    let (s, cut) = if s.len() > MAX_FIELD {
        (capped(s), true)
    } else {
        (s, false)
    };
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if needs_escaping(bytes) {
        escape(out, bytes);
    } else {
        // Most values: one copy.
        out.extend_from_slice(bytes);
    }
    if cut {
        out.extend_from_slice(TRUNCATED.as_bytes());
    }
    out.push(b'"');
}

/// The first [`MAX_FIELD`] bytes of `s`, or fewer to end on a character boundary.
#[cold]
fn capped(s: &str) -> &str {
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Whether any byte of `bytes` is one that [`string`] escapes, eight at a time. A value of
/// eight bytes or more ends with its last eight (overlapping the words before: the question
/// is only whether one is there); a shorter one is checked a byte at a time.
fn needs_escaping(bytes: &[u8]) -> bool {
    let (words, tail) = bytes.as_chunks::<8>();
    if words.iter().any(|w| any_to_escape(u64::from_le_bytes(*w))) {
        return true;
    }
    if tail.is_empty() {
        return false;
    }
    match bytes.last_chunk::<8>() {
        Some(last) => any_to_escape(u64::from_le_bytes(*last)),
        // Shorter than a word (a path of `/`): copying it into a padded word cost a `memcpy`.
        None => tail.iter().copied().any(escaped),
    }
}

/// Whether [`string`] escapes `b`: below 0x20, DEL, `"` or `\`.
fn escaped(b: u8) -> bool {
    b < 0x20 || matches!(b, b'"' | b'\\' | 0x7f)
}

/// The text of a value that has something to escape, escaped.
#[cold]
fn escape(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut start = 0;
    for (at, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..at]);
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xf) as usize],
            ]);
        } else {
            out.extend_from_slice(esc);
        }
        start = at + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// Whether any byte of `w` is one that [`string`] escapes ([`escaped`]), eight at a time.
/// Exact, not a hint: the zero-byte and less-than tests of "Bit Twiddling Hacks" (a borrow can
/// set a high bit above a matching byte, never without one).
fn any_to_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    below_space
        | has_zero(w ^ (ONES * u64::from(b'"')))
        | has_zero(w ^ (ONES * u64::from(b'\\')))
        | has_zero(w ^ (ONES * 0x7f))
        != 0
}

/// RFC 3339 in UTC with microseconds, as `tracing-subscriber` writes it:
/// `2026-11-30T16:07:10.123456Z`. The date and time of day are formatted once per second.
fn timestamp(out: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != secs {
            *cache = (secs, civil(secs));
        }
        out.extend_from_slice(&cache.1);
    });
    let micros = since.subsec_micros();
    let mut frac = [b'.', 0, 0, 0, 0, 0, 0, b'Z'];
    let mut m = micros;
    for d in frac[1..7].iter_mut().rev() {
        *d = b'0' + (m % 10) as u8;
        m /= 10;
    }
    out.extend_from_slice(&frac);
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix time (days-to-civil, H. Hinnant's algorithm).
fn civil(secs: u64) -> [u8; 19] {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut s = [0u8; 19];
    let two = |s: &mut [u8], v: u64| {
        s[0] = b'0' + (v / 10 % 10) as u8;
        s[1] = b'0' + (v % 10) as u8;
    };
    let y = year.clamp(0, 9999) as u64;
    two(&mut s[0..2], y / 100);
    two(&mut s[2..4], y % 100);
    s[4] = b'-';
    two(&mut s[5..7], month as u64);
    s[7] = b'-';
    two(&mut s[8..10], day as u64);
    s[10] = b'T';
    two(&mut s[11..13], rem / 3600);
    s[13] = b':';
    two(&mut s[14..16], rem / 60 % 60);
    s[16] = b':';
    two(&mut s[17..19], rem % 60);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn line(path: &str, ip: IpAddr, duration: Duration) -> AccessLine<'_> {
        AccessLine {
            request_id: "0b6f6f3a-1c0e-4d8e-9a57-123456789abc",
            client_ip: ip,
            method: "GET",
            protocol: "HTTP/1.1",
            host: "api.example.com",
            path,
            route: "orders",
            upstream: "orders",
            upstream_target: "http://127.0.0.1:8001",
            scheme: "http",
            status: 503,
            duration,
            bytes_in: 12,
            bytes_out: 0,
            completed: false,
            error: "upstream_error",
            grpc_status: "",
            config_version: "3f2a9c1",
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            span_id: "00f067aa0ba902b7",
        }
    }

    /// A value past [`MAX_FIELD`] bytes (a 125 KB `Host` of backslashes, a long path of
    /// two-byte characters) is cut on a character boundary and marked: the line stays bounded
    /// and reads as JSON. The line held all 128 KB.
    #[test]
    fn long_string_fields_are_cut_and_marked_so_a_line_stays_bounded() {
        let host = "\\".repeat(125_000);
        let path = format!("/{}", "é".repeat(60_000));
        let mut l = line(&path, Ipv4Addr::LOCALHOST.into(), Duration::ZERO);
        l.host = &host;
        let mut out = Vec::new();
        l.write_json(&mut out, UNIX_EPOCH);
        assert!(out.len() < 4 * MAX_FIELD, "{} bytes", out.len());
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let host = v["host"].as_str().unwrap();
        assert_eq!(host, format!("{}{TRUNCATED}", "\\".repeat(MAX_FIELD)));
        let path = v["path"].as_str().unwrap();
        assert!(path.ends_with(TRUNCATED) && path.len() <= MAX_FIELD + TRUNCATED.len());
        // A value of the cap exactly is whole.
        let whole = "a".repeat(MAX_FIELD);
        let mut out = Vec::new();
        line(&whole, Ipv4Addr::LOCALHOST.into(), Duration::ZERO).write_json(&mut out, UNIX_EPOCH);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["path"], whole.as_str());
    }

    #[test]
    fn the_line_is_one_json_object_with_every_documented_key() {
        let mut out = Vec::new();
        let now = UNIX_EPOCH + Duration::new(1_796_054_830, 123_456_789);
        let hostile = "/a\"b\\c\n\r\t\u{1}\u{7f}é/\u{2028}";
        line(
            hostile,
            Ipv4Addr::new(10, 0, 255, 7).into(),
            Duration::from_micros(12_345),
        )
        .write_json(&mut out, now);
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let o = v.as_object().unwrap();
        let keys: Vec<&str> = o.keys().map(String::as_str).collect();
        let mut want = vec![
            "timestamp",
            "level",
            "request_id",
            "client_ip",
            "method",
            "protocol",
            "host",
            "path",
            "route",
            "upstream",
            "upstream_target",
            "scheme",
            "status",
            "duration_ms",
            "bytes_in",
            "bytes_out",
            "completed",
            "error",
            "grpc_status",
            "config_version",
            "trace_id",
            "span_id",
            "target",
        ];
        want.sort_unstable();
        let mut keys_sorted = keys.clone();
        keys_sorted.sort_unstable();
        assert_eq!(keys_sorted, want, "no key twice, none missing");
        assert_eq!(o["timestamp"], "2026-11-30T16:07:10.123456Z");
        assert_eq!(o["path"], hostile, "escaping round-trips");
        assert_eq!(o["client_ip"], "10.0.255.7");
        assert_eq!(o["status"], 503);
        assert_eq!(o["duration_ms"].as_f64(), Some(12.345));
        assert_eq!(o["completed"], false);
        assert_eq!(o["target"], TARGET);
        assert_eq!(o["upstream_target"], "http://127.0.0.1:8001");
        assert_eq!(o["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(o["span_id"], "00f067aa0ba902b7");
    }

    #[test]
    fn strings_are_escaped_as_serde_json_reads_them_wherever_the_byte_falls() {
        // Every ASCII byte and a few multi-byte characters, at each place in and around the
        // eight-byte steps, alone and among others that need escaping.
        let mut specials: Vec<String> = (0u8..0x80).map(|b| char::from(b).to_string()).collect();
        specials.extend(["é", "\u{2028}", "€", "😀"].map(String::from));
        for special in &specials {
            for len in 0..20 {
                for (at, newline) in (0..=len).flat_map(|at| [(at, false), (at, true)]) {
                    let mut text: String = "abcdefghijklmnopqrstu".chars().take(len).collect();
                    text.insert_str(at, special);
                    // Alone, the special byte is what must be found; with a newline after
                    // it, it is escaped among others.
                    if newline {
                        text.push('\n');
                    }
                    let mut out = Vec::new();
                    string(&mut out, &text);
                    let back: String = serde_json::from_slice(&out).unwrap_or_else(|e| {
                        panic!("{text:?} -> {:?}: {e}", String::from_utf8_lossy(&out))
                    });
                    assert_eq!(back, text);
                    assert!(
                        !out.iter().any(|b| *b < 0x20 || *b == 0x7f),
                        "{text:?}: a control byte left raw"
                    );
                }
            }
        }
        for w in [0u64, u64::MAX, 0x2020_2020_2020_2020, 0x8080_8080_8080_8080] {
            let bytes = w.to_le_bytes();
            let want = bytes
                .iter()
                .any(|b| *b < 0x20 || matches!(*b, b'"' | b'\\' | 0x7f));
            assert_eq!(any_to_escape(w), want, "{w:#x}");
        }
    }

    #[test]
    fn names_the_compiler_accepts_are_never_escaped() {
        // `route` and `upstream` are written unscanned (`plain`): no byte the compiler lets
        // into a name may be one that `string` escapes.
        let mut accepted = 0;
        for b in 0..=u8::MAX {
            let text = [b'a', b, b'z'];
            if let Ok(name) = std::str::from_utf8(&text)
                && crate::compile::valid_name(name)
            {
                accepted += 1;
                assert!(!needs_escaping(name.as_bytes()), "{name:?}");
                let mut out = Vec::new();
                string(&mut out, name);
                assert_eq!(out, [&b"\""[..], name.as_bytes(), b"\""].concat());
            }
        }
        assert_eq!(
            accepted,
            26 * 2 + 10 + 3,
            "letters, digits, `-`, `_` and `.`"
        );
    }

    #[test]
    fn addresses_and_durations_read_as_display_would_write_them() {
        for ip in [
            IpAddr::from(Ipv4Addr::new(0, 0, 0, 0)),
            Ipv4Addr::new(255, 255, 255, 255).into(),
            Ipv4Addr::new(127, 0, 0, 1).into(),
            Ipv6Addr::LOCALHOST.into(),
            "2001:db8::8a2e:370:7334".parse().unwrap(),
        ] {
            let mut out = Vec::new();
            crate::util::push_ip(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
        }
        for (micros, want) in [
            (0, "0.000"),
            (7, "0.007"),
            (1_000, "1.000"),
            (86_400_000_001, "86400000.001"),
        ] {
            let mut out = Vec::new();
            millis(&mut out, Duration::from_micros(micros));
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
    }

    #[test]
    fn timestamps_match_a_known_calendar() {
        // Leap day, year ends, the epoch.
        for (secs, want) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_709_251_199, "2024-02-29T23:59:59"),
            (1_798_761_599, "2026-12-31T23:59:59"),
            (1_798_761_600, "2027-01-01T00:00:00"),
        ] {
            assert_eq!(std::str::from_utf8(&civil(secs)).unwrap(), want, "{secs}");
        }
        let mut out = Vec::new();
        timestamp(&mut out, UNIX_EPOCH + Duration::new(0, 1_000));
        assert_eq!(out, b"1970-01-01T00:00:00.000001Z");
    }
}
