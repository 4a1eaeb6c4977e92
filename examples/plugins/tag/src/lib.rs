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
        if body.windows(needle.len()).any(|w| w == needle.as_bytes()) {
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
