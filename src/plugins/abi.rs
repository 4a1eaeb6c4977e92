//! The proxy-wasm ABI (v0.2.1) as data: status codes, map and buffer ids, the wire format of
//! header maps and property paths, and which imports a module may ask for.
//!
//! Nothing here touches wasmer: the host functions in `host.rs` speak through these.

/// `proxy_status_t`.
pub mod status {
    pub const OK: i32 = 0;
    pub const NOT_FOUND: i32 = 1;
    pub const BAD_ARGUMENT: i32 = 2;
    pub const INVALID_MEMORY_ACCESS: i32 = 6;
    pub const UNIMPLEMENTED: i32 = 12;
}

/// `proxy_map_type_t` values the gateway has.
pub mod map {
    pub const REQUEST_HEADERS: i32 = 0;
    pub const RESPONSE_HEADERS: i32 = 2;
}

/// `proxy_buffer_type_t` values the gateway has.
pub mod buffer {
    pub const HTTP_REQUEST_BODY: i32 = 0;
    pub const HTTP_RESPONSE_BODY: i32 = 1;
    pub const VM_CONFIGURATION: i32 = 6;
    pub const PLUGIN_CONFIGURATION: i32 = 7;
}

/// `proxy_action_t`.
pub const ACTION_CONTINUE: i32 = 0;

/// Replaces `size` bytes of `buf` from `start` with `value`, as `proxy_set_buffer_bytes` does:
/// `start = 0, size = 0` prepends, `start` at or past the end appends, anything else replaces
/// (a `size` running past the end replaces to the end).
pub fn splice(buf: &[u8], start: usize, size: usize, value: &[u8]) -> Vec<u8> {
    let start = start.min(buf.len());
    let end = start.saturating_add(size).min(buf.len());
    let mut out = Vec::with_capacity(buf.len() - (end - start) + value.len());
    out.extend_from_slice(&buf[..start]);
    out.extend_from_slice(value);
    out.extend_from_slice(&buf[end..]);
    out
}

/// WASI `errno`.
pub mod errno {
    pub const SUCCESS: i32 = 0;
    pub const BADF: i32 = 8;
    pub const FAULT: i32 = 21;
    pub const INVAL: i32 = 28;
}

/// The most a plugin may read or write in one host call (a header map, a log line, a config):
/// a bound on host work per call, which metering does not count.
pub const MAX_TRANSFER: usize = 1024 * 1024;

/// How the host satisfies an import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Import {
    /// A host function of the supported subset.
    Host,
    /// A proxy-wasm host function outside the subset: linked to a stub that answers
    /// `UNIMPLEMENTED`. The SDKs import every host function their traits can reach (the Rust
    /// SDK imports `proxy_http_call` into a plugin that never calls it), so refusing these would
    /// refuse every SDK-built plugin; a plugin that calls one gets an error status back.
    Stub,
}

/// How an import is linked, or why it is refused (the message of the `validate` error).
pub fn check_import(module: &str, name: &str) -> Result<Import, String> {
    match (module, name) {
        ("env", n) if SUPPORTED_ENV.contains(&n) => Ok(Import::Host),
        ("wasi_snapshot_preview1", n) if SUPPORTED_WASI.contains(&n) => Ok(Import::Host),
        ("env", n) if UNSUPPORTED_ENV.contains(&n) => Ok(Import::Stub),
        ("env", n) if n.starts_with("proxy_") => Err(format!(
            "imports `{module}.{name}`, which is not a proxy-wasm 0.2.1 host function"
        )),
        _ => Err(format!(
            "imports `{module}.{name}`, which RustyGate does not provide (only the proxy-wasm ABI and the WASI calls in docs/plugins.md)"
        )),
    }
}

/// proxy-wasm 0.2.1 host functions RustyGate links to a stub answering `UNIMPLEMENTED`:
/// callouts (they would pause the request for an async host call), shared data and queues,
/// timers, metrics, gRPC, foreign functions, properties that would be written.
pub const UNSUPPORTED_ENV: &[&str] = &[
    "proxy_http_call",
    "proxy_dispatch_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_set_tick_period_milliseconds",
    "proxy_define_metric",
    "proxy_record_metric",
    "proxy_increment_metric",
    "proxy_get_metric",
    "proxy_set_property",
    "proxy_get_status",
    "proxy_close_stream",
    "proxy_call_foreign_function",
];

/// Host functions of the `env` module (proxy-wasm ABI 0.2.1, plus the 0.2.0 spellings).
pub const SUPPORTED_ENV: &[&str] = &[
    "proxy_log",
    "proxy_get_log_level",
    "proxy_set_effective_context",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_get_buffer_status",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_add_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_get_header_map_size",
    "proxy_send_local_response",
    "proxy_continue_stream",
    "proxy_continue_request",
    "proxy_continue_response",
    "proxy_get_property",
    "proxy_get_current_time_nanoseconds",
    "proxy_done",
];

/// WASI preview1 calls the SDKs' standard libraries pull in.
pub const SUPPORTED_WASI: &[&str] = &[
    "fd_write",
    "clock_time_get",
    "random_get",
    "environ_sizes_get",
    "environ_get",
    "args_sizes_get",
    "args_get",
    "proc_exit",
];

/// A header map as the ABI carries it: names in lower case, values as bytes, in order.
pub type Pairs = Vec<(String, Vec<u8>)>;

/// Reads a serialised map (the layout `Headers::serialize` writes); `None` when it is malformed (lengths past the end, a missing NUL, a
/// key that is not UTF-8). An empty input is an empty map.
pub fn deserialize_map(bytes: &[u8]) -> Option<Pairs> {
    if bytes.is_empty() || bytes == [0] {
        return Some(Vec::new());
    }
    let u32_at = |i: usize| -> Option<usize> {
        let b = bytes.get(i..i.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let count = u32_at(0)?;
    // Each pair takes at least 10 bytes: a bound before allocating for `count`.
    if count > bytes.len() / 10 {
        return None;
    }
    let mut sizes = Vec::with_capacity(count);
    for i in 0..count {
        sizes.push((u32_at(4 + i * 8)?, u32_at(8 + i * 8)?));
    }
    let mut at = 4 + count * 8;
    let mut take = |len: usize| -> Option<&[u8]> {
        let end = at.checked_add(len)?;
        let s = bytes.get(at..end)?;
        if *bytes.get(end)? != 0 {
            return None;
        }
        at = end + 1;
        Some(s)
    };
    let mut out = Vec::with_capacity(count);
    for (kl, vl) in sizes {
        let k = std::str::from_utf8(take(kl)?).ok()?.to_ascii_lowercase();
        let v = take(vl)?.to_vec();
        out.push((k, v));
    }
    Some(out)
}

/// A property path as the SDKs send it (segments separated by NUL bytes, e.g.
/// `request\0path`), as the dotted name the docs use (`request.path`).
pub fn property_path(bytes: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(bytes).ok()?;
    let s = s.strip_suffix('\0').unwrap_or(s);
    Some(s.split('\0').collect::<Vec<_>>().join("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_round_trip_in_the_documented_layout() {
        let pairs = vec![
            ("a".to_owned(), b"1".to_vec()),
            ("b".to_owned(), b"22".to_vec()),
        ];
        let mut map = super::super::headers::Headers::default();
        for (k, v) in &pairs {
            map.push(k, v);
        }
        let bytes = map.serialize();
        // The spec's own example: {"a": "1"}, {"b": "22"}.
        let mut want = vec![2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0];
        want.extend_from_slice(b"a\x001\x00b\x0022\x00");
        assert_eq!(bytes, want);
        assert_eq!(deserialize_map(&bytes), Some(pairs));
        assert_eq!(deserialize_map(&[]), Some(Vec::new()));
    }

    #[test]
    fn malformed_maps_are_refused_not_trusted() {
        let mut map = super::super::headers::Headers::default();
        map.push("k", b"v");
        let good = map.serialize();
        // A length running past the end.
        let mut long = good.clone();
        long[8] = 200;
        assert_eq!(deserialize_map(&long), None);
        // A missing NUL terminator.
        let mut no_nul = good.clone();
        let last = no_nul.len() - 1;
        no_nul[last] = b'x';
        assert_eq!(deserialize_map(&no_nul), None);
        // A count far beyond what the bytes can hold is refused before allocating.
        let huge = [0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0];
        assert_eq!(deserialize_map(&huge), None);
    }

    #[test]
    fn imports_outside_the_subset_are_named() {
        assert_eq!(check_import("env", "proxy_log"), Ok(Import::Host));
        assert_eq!(
            check_import("wasi_snapshot_preview1", "fd_write"),
            Ok(Import::Host)
        );
        assert_eq!(check_import("env", "proxy_http_call"), Ok(Import::Stub));
        let e = check_import("env", "proxy_make_coffee").unwrap_err();
        assert!(e.contains("env.proxy_make_coffee"), "{e}");
        let e = check_import("wasi_snapshot_preview1", "path_open").unwrap_err();
        assert!(e.contains("wasi_snapshot_preview1.path_open"), "{e}");
    }

    #[test]
    fn set_buffer_bytes_prepends_appends_and_replaces() {
        assert_eq!(splice(b"body", 0, 0, b">"), b">body");
        assert_eq!(splice(b"body", 4, 0, b"!"), b"body!");
        assert_eq!(splice(b"body", usize::MAX, 7, b"!"), b"body!");
        assert_eq!(splice(b"body", 0, 4, b"new"), b"new");
        assert_eq!(splice(b"body", 1, 2, b"OO"), b"bOOy");
        // A size past the end replaces to the end, never panics.
        assert_eq!(splice(b"body", 2, usize::MAX, b"x"), b"box");
        assert_eq!(splice(b"", 0, 10, b"x"), b"x");
    }

    #[test]
    fn property_paths_read_as_dotted_names() {
        assert_eq!(
            property_path(b"request\0path").as_deref(),
            Some("request.path")
        );
        assert_eq!(
            property_path(b"rustygate\0route\0").as_deref(),
            Some("rustygate.route")
        );
        assert_eq!(
            property_path(b"source.address").as_deref(),
            Some("source.address")
        );
    }
}
