//! The example RustyGate plugin (proxy-wasm ABI 0.2.1, Rust SDK).
//!
//! Configuration (the route's `config = { ... }`, handed over as JSON by `proxy_on_configure`):
//! - `value`: the value of the `X-RustyGate-Plugin` header added to every response
//!   (default `"tag"`);
//! - `deny_header`: when a request carries this header, the plugin answers it with 403 itself
//!   and the request goes no further (optional);
//! - `deny_body_contains`: when a request's body contains this text, the plugin answers it with
//!   403 itself (optional). It holds the body until its end to look (`Action::Pause`), so
//!   nothing of it reaches the upstream before it has been read whole; without this setting
//!   bodies go on chunk by chunk as they arrive.
//!
//! It also tells the upstream it ran, with `X-RustyGate-Plugin-Seen: <value>`.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(TagRoot { settings: Rc::new(Settings::default()) })
    });
}}

struct Settings {
    value: String,
    deny_header: Option<String>,
    deny_body_contains: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { value: "tag".to_owned(), deny_header: None, deny_body_contains: None }
    }
}

struct TagRoot {
    /// Shared with every request's context: a context takes a reference, not a copy of the
    /// strings (no allocation and copy per request for them).
    settings: Rc<Settings>,
}

impl Context for TagRoot {}

impl RootContext for TagRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(bytes) = self.get_plugin_configuration() else {
            return true;
        };
        let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(&bytes) else {
            proxy_wasm::hostcalls::log(LogLevel::Error, "config is not a JSON object").ok();
            return false;
        };
        let mut settings = Settings::default();
        if let Some(v) = m.get("value").and_then(|v| v.as_str()) {
            settings.value = v.to_owned();
        }
        settings.deny_header = m
            .get("deny_header")
            .and_then(|v| v.as_str())
            .map(str::to_ascii_lowercase);
        settings.deny_body_contains = m
            .get("deny_body_contains")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        self.settings = Rc::new(settings);
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Tag { settings: Rc::clone(&self.settings) }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Tag {
    settings: Rc<Settings>,
}

impl Context for Tag {}

impl HttpContext for Tag {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(h) = &self.settings.deny_header {
            if self.get_http_request_header(h).is_some() {
                self.send_http_response(403, vec![("content-type", "text/plain")], Some(b"denied by plugin\n"));
                return Action::Pause;
            }
        }
        self.set_http_request_header("x-rustygate-plugin-seen", Some(&self.settings.value));
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(needle) = &self.settings.deny_body_contains else {
            return Action::Continue;
        };
        if !end_of_stream {
            // Called again with the whole body so far, and the next chunk, until the end.
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        if contains(&body, needle.as_bytes()) {
            self.send_http_response(403, vec![("content-type", "text/plain")], Some(b"denied by plugin (body)\n"));
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.add_http_response_header("x-rustygate-plugin", &self.settings.value);
        Action::Continue
    }
}

/// Whether `needle` occurs in `hay`. Every wasm instruction counts against the call's budget
/// (`max_instructions`, 10 million by default), so the needle's first byte is looked for eight
/// bytes at a time, and only the places where its last byte matches too are compared: a
/// comparison at every position (`windows`) ran out of the budget on bodies of about 300 KB;
/// this costs about three wasm instructions a byte, so a few megabytes fit in the default.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    let (Some(&first), Some(&last)) = (needle.first(), needle.last()) else {
        return true;
    };
    let Some(last_start) = hay.len().checked_sub(needle.len()) else {
        return false;
    };
    let mut from = 0;
    while let Some(p) = find_byte(&hay[from..=last_start], first) {
        let at = from + p;
        if hay[at + needle.len() - 1] == last && &hay[at..at + needle.len()] == needle {
            return true;
        }
        from = at + 1;
    }
    false
}

/// Where `b` first occurs in `s`: eight bytes at a time, with the zero-byte test on the bytes
/// XORed with `b` (its lowest flagged byte is always a real match).
fn find_byte(s: &[u8], b: u8) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let pattern = ONES * u64::from(b);
    let mut words = s.chunks_exact(8);
    let mut base = 0;
    for w in &mut words {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(w);
        let x = u64::from_le_bytes(bytes) ^ pattern;
        let zero = x.wrapping_sub(ONES) & !x & HIGHS;
        if zero != 0 {
            return Some(base + (zero.trailing_zeros() / 8) as usize);
        }
        base += 8;
    }
    words.remainder().iter().position(|&x| x == b).map(|p| base + p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_agrees_with_a_plain_search() {
        let naive = |h: &[u8], n: &[u8]| n.is_empty() || h.windows(n.len()).any(|w| w == n);
        let hay: Vec<u8> = (0..300u32).map(|i| b"DROP TABLEx\x80\xffD"[(i * 7 % 14) as usize]).collect();
        for start in 0..hay.len() {
            for len in [0, 1, 2, 5, 10, 17] {
                let end = (start + len).min(hay.len());
                let needle = &hay[start..end];
                for cut in [0, 1, 7, 8, 9, 64] {
                    let h = &hay[cut.min(hay.len())..];
                    assert_eq!(contains(h, needle), naive(h, needle), "{start} {len} {cut}");
                }
            }
        }
        assert!(contains(b"aaaa DROP TABLE", b"DROP TABLE"));
        assert!(!contains(b"DROP TABL", b"DROP TABLE"));
        assert!(!contains(b"", b"x"));
        for b in 0..=255u8 {
            let mut s = vec![b.wrapping_add(1); 20];
            s[13] = b;
            assert_eq!(find_byte(&s, b), Some(13), "{b}");
        }
    }
}
