//! Reading a trace context from the client and writing ours for the upstream: W3C
//! `traceparent`/`tracestate` (and `baggage`), and B3 single (`b3`) or multi (`X-B3-*`).
//!
//! A context that does not parse is ignored as a whole (the request starts a new trace), as the
//! W3C spec asks; nothing here fails a request. A field sent more than once is a context that
//! does not parse (callers' `get` returns `None` for it). The client's `tracestate` goes upstream
//! only with the `traceparent` it belongs to, and is cut to the spec's limits (32 list members,
//! 512 characters); `baggage` is cut to W3C baggage's (180 members, 8192 bytes), whole members
//! from the end.

use std::cell::RefCell;

use bytes::BytesMut;
use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::ids::{SpanId, TraceId, decode};

/// Which formats are read from clients and written to upstreams (`propagators`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Propagators {
    pub tracecontext: bool,
    pub baggage: bool,
    pub b3: bool,
    pub b3multi: bool,
}

impl Default for Propagators {
    fn default() -> Self {
        Propagators {
            tracecontext: true,
            baggage: true,
            b3: false,
            b3multi: false,
        }
    }
}

/// The names `propagators` accepts.
pub const NAMES: [&str; 4] = ["tracecontext", "baggage", "b3", "b3multi"];

impl Propagators {
    /// From the config's list; `Err` names the unknown entry.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, &'a str> {
        let mut p = Propagators {
            tracecontext: false,
            baggage: false,
            b3: false,
            b3multi: false,
        };
        for n in names {
            match n {
                "tracecontext" => p.tracecontext = true,
                "baggage" => p.baggage = true,
                "b3" => p.b3 = true,
                "b3multi" => p.b3multi = true,
                other => return Err(other),
            }
        }
        Ok(p)
    }
}

/// The caller's span, as the client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
    /// Read from `traceparent` (not B3): the client's `tracestate` belongs to this trace.
    pub w3c: bool,
}

/// A request header a context is read from. Callers look it up by a header name made once
/// ([`Field::header`], or their own table by [`Field::index`]), not by text: a `&str` key is
/// parsed into a header name on every lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    TraceParent,
    B3,
    B3TraceId,
    B3SpanId,
    B3Sampled,
    B3Flags,
}

impl Field {
    /// Every field, in [`Field::index`] order.
    pub const ALL: [Field; 6] = [
        Field::TraceParent,
        Field::B3,
        Field::B3TraceId,
        Field::B3SpanId,
        Field::B3Sampled,
        Field::B3Flags,
    ];

    /// The lowercase header name.
    pub const fn name(self) -> &'static str {
        match self {
            Field::TraceParent => "traceparent",
            Field::B3 => "b3",
            Field::B3TraceId => "x-b3-traceid",
            Field::B3SpanId => "x-b3-spanid",
            Field::B3Sampled => "x-b3-sampled",
            Field::B3Flags => "x-b3-flags",
        }
    }

    /// The position in [`Field::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The header name (`http` 1).
    pub fn header(self) -> &'static HeaderName {
        &FIELD_NAMES[self.index()]
    }
}

static FIELD_NAMES: [HeaderName; 6] = [
    HeaderName::from_static(Field::TraceParent.name()),
    HeaderName::from_static(Field::B3.name()),
    HeaderName::from_static(Field::B3TraceId.name()),
    HeaderName::from_static(Field::B3SpanId.name()),
    HeaderName::from_static(Field::B3Sampled.name()),
    HeaderName::from_static(Field::B3Flags.name()),
];

/// Reads the client's context: `traceparent` first, then B3 when enabled. `get` looks a
/// request header up, and returns `None` for one the request has more than once.
pub fn extract<'h>(p: &Propagators, get: impl Fn(Field) -> Option<&'h [u8]>) -> Option<Parent> {
    if p.tracecontext
        && let Some(found) = get(Field::TraceParent).and_then(traceparent)
    {
        return Some(found);
    }
    if p.b3
        && let Some(found) = get(Field::B3).and_then(b3_single)
    {
        return Some(found);
    }
    if p.b3multi {
        return b3_multi(&get);
    }
    None
}

/// `version-traceid-parentid-flags`. Version `00` is exactly that; a later version may append
/// fields after a `-`, which are ignored; version `ff` is invalid.
pub fn traceparent(v: &[u8]) -> Option<Parent> {
    let v = trim(v);
    if v.len() < 55 || (v.len() > 55 && (v[55] != b'-' || &v[..2] == b"00")) {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = decode::<1>(&v[..2])?;
    if version[0] == 0xff {
        return None;
    }
    let trace_id = TraceId(decode::<16>(&v[3..35])?);
    let span_id = SpanId(decode::<8>(&v[36..52])?);
    let flags = decode::<1>(&v[53..55])?[0];
    (trace_id.is_valid() && span_id.is_valid()).then_some(Parent {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
        w3c: true,
    })
}

/// `b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]`; a 64-bit trace id is left-padded.
/// The sampling-only forms (`b3: 0`) carry no ids and start a new trace.
fn b3_single(v: &[u8]) -> Option<Parent> {
    let mut parts = trim(v).split(|&b| b == b'-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = SpanId(decode::<8>(parts.next()?)?);
    let sampled = matches!(parts.next(), Some(b"1" | b"d"));
    (trace_id.is_valid() && span_id.is_valid()).then_some(Parent {
        trace_id,
        span_id,
        sampled,
        w3c: false,
    })
}

fn b3_multi<'h>(get: &impl Fn(Field) -> Option<&'h [u8]>) -> Option<Parent> {
    let trace_id = b3_trace_id(trim(get(Field::B3TraceId)?))?;
    let span_id = SpanId(decode::<8>(trim(get(Field::B3SpanId)?))?);
    let sampled = matches!(get(Field::B3Sampled).map(trim), Some(b"1" | b"true"))
        || get(Field::B3Flags).map(trim) == Some(b"1");
    (trace_id.is_valid() && span_id.is_valid()).then_some(Parent {
        trace_id,
        span_id,
        sampled,
        w3c: false,
    })
}

fn b3_trace_id(v: &[u8]) -> Option<TraceId> {
    match v.len() {
        32 => decode::<16>(v).map(TraceId),
        16 => {
            let low = decode::<8>(v)?;
            let mut id = [0; 16];
            id[8..].copy_from_slice(&low);
            Some(TraceId(id))
        }
        _ => None,
    }
}

fn trim(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}

const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// W3C Trace Context: at most 32 list members; 512 characters is what every vendor must pass
/// on, and members over 128 characters are the first to go when a list is cut.
const TRACESTATE_MEMBERS: usize = 32;
const TRACESTATE_BYTES: usize = 512;
const TRACESTATE_LONG_MEMBER: usize = 128;
/// W3C Baggage: at most 180 list members and 8192 bytes; a list is cut by whole members.
const BAGGAGE_MEMBERS: usize = 180;
const BAGGAGE_BYTES: usize = 8192;

/// The list members of every `name` field in `headers` (fields of one list are joined with
/// commas, as the specs say), without empty ones, trimmed.
fn list_members(headers: &HeaderMap, name: &HeaderName) -> Vec<Vec<u8>> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(trim)
        .filter(|m| !m.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// Whether the `name` fields are within `max_members` and `max_bytes` as they are (the usual
/// case: one short field, left untouched).
fn within_limits(
    headers: &HeaderMap,
    name: &HeaderName,
    max_members: usize,
    max_bytes: usize,
) -> bool {
    let mut fields = headers.get_all(name).iter();
    match (fields.next(), fields.next()) {
        (None, _) => true,
        (Some(v), None) => {
            let v = v.as_bytes();
            v.len() <= max_bytes && memchr::memchr_iter(b',', v).count() < max_members
        }
        _ => false,
    }
}

/// Replaces the `name` fields with one holding `members`, or removes them when none is left.
fn set_list(headers: &mut HeaderMap, name: HeaderName, members: &[Vec<u8>]) {
    let joined = members.join(&b","[..]);
    match (!joined.is_empty())
        .then(|| header_value(&joined))
        .flatten()
    {
        Some(v) => {
            headers.insert(name, v);
        }
        None => {
            headers.remove(name);
        }
    }
}

/// The length of `members` joined with commas.
fn joined_len(members: &[Vec<u8>]) -> usize {
    members.iter().map(Vec::len).sum::<usize>() + members.len().saturating_sub(1)
}

/// Cuts the client's `tracestate` to the spec's limits: members over 128 characters go first,
/// then members from the end.
fn limit_tracestate(headers: &mut HeaderMap) {
    if within_limits(headers, &TRACESTATE, TRACESTATE_MEMBERS, TRACESTATE_BYTES) {
        return;
    }
    let mut members = list_members(headers, &TRACESTATE);
    if members.len() > TRACESTATE_MEMBERS || joined_len(&members) > TRACESTATE_BYTES {
        members.retain(|m| m.len() <= TRACESTATE_LONG_MEMBER);
    }
    members.truncate(TRACESTATE_MEMBERS);
    while joined_len(&members) > TRACESTATE_BYTES {
        members.pop();
    }
    set_list(headers, TRACESTATE, &members);
}

/// Cuts the client's `baggage` to W3C Baggage's limits, whole members from the end.
fn limit_baggage(headers: &mut HeaderMap) {
    if within_limits(headers, &BAGGAGE, BAGGAGE_MEMBERS, BAGGAGE_BYTES) {
        return;
    }
    let mut members = list_members(headers, &BAGGAGE);
    members.truncate(BAGGAGE_MEMBERS);
    while joined_len(&members) > BAGGAGE_BYTES {
        members.pop();
    }
    set_list(headers, BAGGAGE, &members);
}
const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");

/// `00-{trace}-{span}-{01|00}`.
pub fn format_traceparent(trace_id: &TraceId, span_id: &SpanId, sampled: bool) -> [u8; 55] {
    let mut out = [b'-'; 55];
    out[..2].copy_from_slice(b"00");
    out[3..35].copy_from_slice(&trace_id.hex());
    out[36..52].copy_from_slice(&span_id.hex());
    out[53..55].copy_from_slice(if sampled { b"01" } else { b"00" });
    out
}

/// Header values are cut from this per-thread buffer: a value then costs a reference count,
/// not an allocation of its own. A buffer is let go of once full and freed when the last
/// value cut from it is dropped.
const SLAB: usize = 4096;

thread_local! {
    static VALUES: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// `v` as a header value (validated as `HeaderValue::from_bytes` does).
fn header_value(v: &[u8]) -> Option<HeaderValue> {
    VALUES.with(|slab| {
        let mut slab = slab.try_borrow_mut().ok()?;
        if slab.capacity() - slab.len() < v.len() {
            *slab = BytesMut::with_capacity(SLAB.max(v.len()));
        }
        slab.extend_from_slice(v);
        HeaderValue::from_maybe_shared(slab.split().freeze()).ok()
    })
}

/// `traceparent` as a header value (the bytes [`format_traceparent`] writes are all valid).
pub fn traceparent_value(v: &[u8; 55]) -> Option<HeaderValue> {
    header_value(v)
}

/// Sets our context on the upstream request: `span_id` is the span the upstream's work hangs
/// under. The client's `tracestate` was forwarded with its other headers: it stays (cut to the
/// spec's limits) when the trace continues the client's `traceparent` (`parent` read from it),
/// and is removed when a new trace started. `baggage` is removed unless that propagator is on,
/// and cut to its limits when it is.
pub fn inject(
    p: &Propagators,
    headers: &mut HeaderMap,
    parent: Option<&Parent>,
    trace_id: &TraceId,
    span_id: &SpanId,
    sampled: bool,
) {
    if let Some(tp) = inject_but_traceparent(p, headers, parent, trace_id, span_id, sampled)
        && let Some(v) = traceparent_value(&tp)
    {
        headers.insert(Field::TraceParent.header(), v);
    }
}

/// [`inject`] but for the `traceparent`, which is returned (when that propagator is on) for the
/// caller to write: the upstream connection writes it straight into the request head, so the
/// hot path neither validates it as a `HeaderValue` nor hashes it into the map. Whoever writes
/// it replaces any `traceparent` already in `headers` (the client's, or a policy's).
pub fn inject_but_traceparent(
    p: &Propagators,
    headers: &mut HeaderMap,
    parent: Option<&Parent>,
    trace_id: &TraceId,
    span_id: &SpanId,
    sampled: bool,
) -> Option<[u8; 55]> {
    let tp = p
        .tracecontext
        .then(|| format_traceparent(trace_id, span_id, sampled));
    if p.tracecontext {
        if parent.is_some_and(|p| p.w3c) {
            limit_tracestate(headers);
        } else {
            // A new trace: the client's vendor state was about a trace the upstream never sees.
            headers.remove(TRACESTATE);
        }
    }
    if !p.baggage {
        // By name, not `&str`: a string key is parsed and validated first.
        headers.remove(BAGGAGE);
    } else {
        limit_baggage(headers);
    }
    if p.b3 {
        let mut v = Vec::with_capacity(52);
        v.extend_from_slice(&trace_id.hex());
        v.push(b'-');
        v.extend_from_slice(&span_id.hex());
        v.extend_from_slice(if sampled { b"-1" } else { b"-0" });
        if let Some(v) = header_value(&v) {
            headers.insert(Field::B3.header(), v);
        }
    }
    if p.b3multi {
        for (field, value) in [
            (Field::B3TraceId, &trace_id.hex()[..]),
            (Field::B3SpanId, &span_id.hex()[..]),
            (Field::B3Sampled, if sampled { b"1" } else { b"0" }),
        ] {
            if let Some(v) = header_value(value) {
                headers.insert(field.header(), v);
            }
        }
        headers.remove(B3_PARENT_SPAN_ID);
        headers.remove(Field::B3Flags.header());
    }
    tp
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_reads_the_spec_example_and_refuses_what_the_spec_refuses() {
        let p = traceparent(TP).unwrap();
        assert_eq!(p.trace_id.hex(), *b"4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.span_id.hex(), *b"00f067aa0ba902b7");
        assert!(p.sampled);
        assert!(!traceparent(&TP.replace_last(b"00")).unwrap().sampled);
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"",
        ] {
            assert_eq!(traceparent(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        // A later version may carry more fields.
        assert!(
            traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-ab").is_some()
        );
    }

    trait ReplaceLast {
        fn replace_last(&self, with: &[u8]) -> Vec<u8>;
    }
    impl ReplaceLast for [u8] {
        fn replace_last(&self, with: &[u8]) -> Vec<u8> {
            let mut v = self[..self.len() - with.len()].to_vec();
            v.extend_from_slice(with);
            v
        }
    }

    #[test]
    fn b3_is_read_only_when_enabled_and_written_in_both_forms() {
        let headers = [
            (
                "b3",
                &b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"[..],
            ),
            ("x-b3-traceid", b"463ac35c9f6413ad"),
            ("x-b3-spanid", b"a2fb4a1d1a96d312"),
            ("x-b3-sampled", b"1"),
        ];
        let get = |f: Field| {
            headers
                .iter()
                .find(|(k, _)| *k == f.name())
                .map(|(_, v)| *v)
        };
        assert_eq!(extract(&Propagators::default(), get), None);
        let single = Propagators::from_names(["b3"]).unwrap();
        let p = extract(&single, get).unwrap();
        assert_eq!(p.span_id.hex(), *b"e457b5a2e4d86bd1");
        assert!(p.sampled);
        let multi = Propagators::from_names(["b3multi"]).unwrap();
        let p = extract(&multi, get).unwrap();
        assert_eq!(p.trace_id.hex(), *b"0000000000000000463ac35c9f6413ad");
        assert_eq!(Propagators::from_names(["b3", "jaeger"]), Err("jaeger"));

        let mut out = HeaderMap::new();
        out.insert("baggage", HeaderValue::from_static("k=v"));
        let all = Propagators::from_names(["tracecontext", "b3", "b3multi"]).unwrap();
        inject(&all, &mut out, Some(&p), &p.trace_id, &p.span_id, false);
        assert_eq!(
            out["traceparent"],
            "00-0000000000000000463ac35c9f6413ad-a2fb4a1d1a96d312-00"
        );
        assert_eq!(
            out["b3"],
            "0000000000000000463ac35c9f6413ad-a2fb4a1d1a96d312-0"
        );
        assert_eq!(out["x-b3-sampled"], "0");
        assert!(!out.contains_key("baggage"), "baggage is not on the list");
    }
}
