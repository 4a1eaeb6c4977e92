//! Finished spans, and their OTLP/protobuf encoding (`ExportTraceServiceRequest`, the body of
//! `POST /v1/traces`), written by hand: the dozen fields used here do not justify a protobuf
//! code generator in the build. Field numbers are those of `opentelemetry/proto/trace/v1`; the
//! tests decode this output with the `opentelemetry-proto` crate.

use bytes::Bytes;

use super::ids::{SpanId, TraceId};

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

pub type Attr = (&'static str, Value);

/// `Span.SpanKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

/// A span event (a decision inside the request, e.g. a denial).
#[derive(Debug, Clone)]
pub struct Event {
    pub time_ns: u64,
    pub name: &'static str,
    pub attrs: Vec<Attr>,
}

/// `ExportTraceServiceRequest` with one resource and one scope, around `spans`: span fields
/// of `ScopeSpans` as [`push_span`] writes them, one request's after another's. The lengths are
/// known beforehand, so nothing is moved once written.
pub fn encode(resource: &[(String, String)], spans: &[u8]) -> Vec<u8> {
    let mut out = batch_head(resource, spans.len(), spans.len());
    out.extend_from_slice(spans);
    out
}

/// Room the exporter leaves before a batch's spans for [`encode_batch`] to write the heads in.
pub const BATCH_PREFIX: usize = 512;

/// [`encode`] of the spans in `batch[BATCH_PREFIX..]`, the heads written into the room before
/// them: a batch's spans (hundreds of kilobytes) are not copied again.
pub fn encode_batch(resource: &[(String, String)], mut batch: Vec<u8>) -> Bytes {
    let spans = batch.len().saturating_sub(BATCH_PREFIX);
    let head = batch_head(resource, spans, 0);
    if let Some(at) = BATCH_PREFIX.checked_sub(head.len())
        && let Some(room) = batch.get_mut(at..BATCH_PREFIX)
    {
        room.copy_from_slice(&head);
        return Bytes::from(batch).slice(at..);
    }
    // A resource too large for the room: copied after all.
    Bytes::from(encode(
        resource,
        batch.get(BATCH_PREFIX..).unwrap_or_default(),
    ))
}

/// Everything of the batch before its spans (`spans` bytes of them), with room for `extra`.
fn batch_head(resource: &[(String, String)], spans: usize, extra: usize) -> Vec<u8> {
    // Resource { attributes = 1 }
    let mut res = Vec::with_capacity(64);
    for (k, v) in resource {
        attr_str_field(&mut res, 1, k, v.as_bytes());
    }
    // InstrumentationScope { name = 1, version = 2 }
    let mut scope = Vec::with_capacity(32);
    string(&mut scope, 1, "rustygate");
    string(&mut scope, 2, env!("CARGO_PKG_VERSION"));
    // ScopeSpans { scope = 1, spans = 2 }
    let scope_spans = field_len(scope.len()) + spans;
    // ResourceSpans { resource = 1, scope_spans = 2 }
    let resource_spans = field_len(res.len()) + field_len(scope_spans);
    let mut out = Vec::with_capacity(field_len(resource_spans) - spans + extra);
    // ExportTraceServiceRequest { resource_spans = 1 }
    tag(&mut out, 1, 2);
    varint(&mut out, resource_spans as u64);
    bytes(&mut out, 1, &res);
    tag(&mut out, 2, 2);
    varint(&mut out, scope_spans as u64);
    bytes(&mut out, 1, &scope);
    out
}

/// One span's body (`Span`), written field by field into a buffer the caller reuses; then
/// [`push_span`] appends it to a request's spans. Attribute keys are static, values borrowed:
/// nothing is allocated per attribute.
pub struct SpanBody<'b>(pub &'b mut Vec<u8>);

/// The fields every span has.
pub struct SpanHead<'a> {
    pub trace_id: &'a TraceId,
    pub span_id: &'a SpanId,
    pub parent: Option<&'a SpanId>,
    /// Concatenated: `["GET", " ", "/orders/{id}"]`.
    pub name: &'a [&'a str],
    pub kind: Kind,
    pub start_ns: u64,
    pub end_ns: u64,
}

impl SpanBody<'_> {
    /// Starts a span (the buffer is cleared): ids, name, kind and times.
    pub fn start<'b>(b: &'b mut Vec<u8>, h: &SpanHead<'_>) -> SpanBody<'b> {
        b.clear();
        let name_len: usize = h.name.iter().map(|p| p.len()).sum();
        let mut head = Head::new();
        head.tag(1, 2);
        head.varint(16);
        head.bytes(&h.trace_id.0);
        head.tag(2, 2);
        head.varint(8);
        head.bytes(&h.span_id.0);
        if let Some(p) = h.parent {
            head.tag(4, 2);
            head.varint(8);
            head.bytes(&p.0);
        }
        head.tag(5, 2);
        head.varint(name_len as u64);
        b.extend_from_slice(head.as_slice());
        for part in h.name {
            b.extend_from_slice(part.as_bytes());
        }
        let mut head = Head::new();
        head.tag(6, 0);
        head.varint(h.kind as u64);
        head.tag(7, 1);
        head.bytes(&h.start_ns.to_le_bytes());
        head.tag(8, 1);
        head.bytes(&h.end_ns.max(h.start_ns).to_le_bytes());
        b.extend_from_slice(head.as_slice());
        SpanBody(b)
    }

    /// A string attribute (`attributes = 9`), cut to [`MAX_VALUE`].
    pub fn str(&mut self, key: &str, value: &str) {
        attr_str_field(self.0, 9, key, cut(value).as_bytes());
    }

    /// An integer attribute.
    pub fn int(&mut self, key: &str, value: i64) {
        // AnyValue { int_value = 3 }
        let any = 1 + varint_len(value as u64);
        self.0.reserve(24 + key.len());
        key_header(self.0, 9, key, any);
        tag(self.0, 3, 0);
        varint(self.0, value as u64);
    }

    /// A span event (`events = 11`).
    pub fn event(&mut self, e: &Event) {
        message(self.0, 11, |ev| {
            tag(ev, 1, 1);
            ev.extend_from_slice(&e.time_ns.to_le_bytes());
            string(ev, 2, e.name);
            for (k, v) in &e.attrs {
                message(ev, 3, |kv| key_value(kv, k, v));
            }
        });
    }

    /// Ends the span: status ERROR with `error` as its message when set (unset otherwise),
    /// and `flags`: the W3C trace flags in bits 0-7 (sampled: only sampled spans are exported),
    /// and whether the parent was in another process (bit 9, with bit 8 saying it is known).
    pub fn finish(self, error: Option<&str>, remote_parent: bool) {
        if let Some(msg) = error.map(cut) {
            // Status { message = 2, code = 3 (ERROR = 2) }
            tag(self.0, 15, 2);
            varint(self.0, (field_len(msg.len()) + 2) as u64);
            string(self.0, 2, msg);
            tag(self.0, 3, 0);
            varint(self.0, 2);
        }
        // flags = 16 (fixed32)
        tag(self.0, 16, 5);
        let flags: u32 = 0x100 | SAMPLED | if remote_parent { 0x200 } else { 0 };
        self.0.extend_from_slice(&flags.to_le_bytes());
    }
}

/// The longest string a span carries as an attribute, event attribute or status message, in
/// bytes: longer ones (a client's `User-Agent`, path or query) are cut, at a character boundary.
/// What a request's spans take in the export queue is then bounded by what the gateway writes,
/// not by what a client sends.
pub const MAX_VALUE: usize = 1024;

/// `s`, cut to at most [`MAX_VALUE`] bytes at a character boundary.
pub fn cut(s: &str) -> &str {
    if s.len() <= MAX_VALUE {
        return s;
    }
    let mut end = MAX_VALUE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The W3C `sampled` trace flag, as it appears in `Span.flags`.
const SAMPLED: u32 = 0x01;

/// Appends a finished span body to `out` as `ScopeSpans.spans` (field 2).
pub fn push_span(out: &mut Vec<u8>, body: &[u8]) {
    bytes(out, 2, body);
}

/// A string `KeyValue` as field `field`, its lengths worked out first.
fn attr_str_field(out: &mut Vec<u8>, field: u32, key: &str, value: &[u8]) {
    // AnyValue { string_value = 1 }
    let any = field_len(value.len());
    // Once, rather than growing field by field (tags and lengths take 24 bytes at most).
    out.reserve(24 + key.len() + value.len());
    key_header(out, field, key, any);
    tag(out, 1, 2);
    varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

/// A span's fixed fields put together on the stack and appended at once. Callers keep within
/// its 96 bytes (what does not fit is dropped).
struct Head {
    buf: [u8; 96],
    len: usize,
}

impl Head {
    fn new() -> Head {
        Head {
            buf: [0; 96],
            len: 0,
        }
    }

    fn byte(&mut self, b: u8) {
        if let Some(d) = self.buf.get_mut(self.len) {
            *d = b;
            self.len += 1;
        }
    }

    fn tag(&mut self, field: u32, wire: u8) {
        self.varint((u64::from(field) << 3) | u64::from(wire));
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.byte((v as u8) | 0x80);
            v >>= 7;
        }
        self.byte(v as u8);
    }

    fn bytes(&mut self, b: &[u8]) {
        if let Some(d) = self.buf.get_mut(self.len..self.len + b.len()) {
            d.copy_from_slice(b);
            self.len += b.len();
        }
    }

    fn as_slice(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

/// `field` (a `KeyValue` of `key` and an `AnyValue` of `any` bytes): everything up to the
/// `AnyValue`'s own fields.
#[inline]
fn key_header(out: &mut Vec<u8>, field: u32, key: &str, any: usize) {
    tag(out, field, 2);
    varint(out, (field_len(key.len()) + field_len(any)) as u64);
    string(out, 1, key);
    tag(out, 2, 2);
    varint(out, any as u64);
}

/// Bytes a length-delimited field of `len` bytes takes (a tag below 16 is one byte).
fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// `KeyValue { key = 1, value = 2: AnyValue { string = 1 | bool = 2 | int = 3 } }`.
fn key_value(out: &mut Vec<u8>, key: &str, v: &Value) {
    string(out, 1, key);
    message(out, 2, |any| match v {
        Value::Str(s) => string(any, 1, cut(s)),
        Value::Bool(b) => {
            tag(any, 2, 0);
            varint(any, u64::from(*b));
        }
        Value::Int(i) => {
            tag(any, 3, 0);
            varint(any, *i as u64);
        }
    });
}

#[inline]
fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

#[inline]
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[inline]
fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

#[inline]
fn string(out: &mut Vec<u8>, field: u32, s: &str) {
    bytes(out, field, s.as_bytes());
}

/// A nested message, encoded in place: a one-byte length goes before it, widened afterwards
/// when the message is 128 bytes or more. Only for span events, whose size is not worked out
/// beforehand.
fn message(out: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    tag(out, field, 2);
    let at = out.len();
    out.push(0);
    body(out);
    let mut len = (out.len() - at - 1) as u64;
    // The length as a varint (a u64 takes 10 bytes at most).
    let mut prefix = [0u8; 10];
    let mut n = 0;
    for b in prefix.iter_mut() {
        n += 1;
        if len < 0x80 {
            *b = len as u8;
            break;
        }
        *b = (len as u8) | 0x80;
        len >>= 7;
    }
    let prefix = prefix.get(..n).unwrap_or_default();
    if n > 1 {
        // The first byte takes the placeholder's place; the rest is inserted after it.
        out.splice(at + 1..at + 1, prefix.iter().skip(1).copied());
    }
    if let Some(dst) = out.get_mut(at..at + n) {
        dst.copy_from_slice(prefix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_messages_carry_their_length_at_every_width() {
        for len in [0usize, 1, 127, 128, 300, 16_383, 16_384, 70_000] {
            let mut out = vec![0xaa];
            message(&mut out, 3, |m| m.extend(std::iter::repeat_n(7u8, len)));
            let mut want = vec![0xaa];
            tag(&mut want, 3, 2);
            varint(&mut want, len as u64);
            want.extend(std::iter::repeat_n(7u8, len));
            assert_eq!(out, want, "{len}");
        }
    }

    #[test]
    fn attributes_with_lengths_worked_out_first_are_the_nested_encoding() {
        for len in [
            0usize, 1, 100, 113, 114, 127, 128, 200, 16_370, 16_400, 70_000,
        ] {
            let value = "v".repeat(len);
            let mut direct = Vec::new();
            SpanBody(&mut direct).str("user_agent.original", &value);
            let mut nested = Vec::new();
            message(&mut nested, 9, |kv| {
                key_value(kv, "user_agent.original", &Value::Str(value.clone()))
            });
            assert_eq!(direct, nested, "{len}");
        }
        // Keys too long for the stack header take the general path.
        for key in ["k".repeat(48), "k".repeat(49), "k".repeat(200)] {
            for value in [String::new(), "v".repeat(300)] {
                let mut direct = Vec::new();
                SpanBody(&mut direct).str(&key, &value);
                SpanBody(&mut direct).int(&key, -1);
                let mut nested = Vec::new();
                message(&mut nested, 9, |kv| {
                    key_value(kv, &key, &Value::Str(value.clone()))
                });
                message(&mut nested, 9, |kv| key_value(kv, &key, &Value::Int(-1)));
                assert_eq!(direct, nested, "{} {}", key.len(), value.len());
            }
        }
        for n in [0i64, 1, 127, 128, 65_535, i64::MAX, -1] {
            let mut direct = Vec::new();
            SpanBody(&mut direct).int("server.port", n);
            let mut nested = Vec::new();
            message(&mut nested, 9, |kv| {
                key_value(kv, "server.port", &Value::Int(n))
            });
            assert_eq!(direct, nested, "{n}");
        }
        for n in [0usize, 1, 127, 128, 16_383, 16_384] {
            assert_eq!(field_len(n), {
                let mut v = Vec::new();
                bytes(&mut v, 1, &vec![0; n]);
                v.len()
            });
        }
    }

    #[test]
    fn a_batch_decodes_as_opentelemetry_proto_reads_it() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
        use prost::Message;

        let trace_id = TraceId([7; 16]);
        let (server, client) = (SpanId([1; 8]), SpanId([2; 8]));
        let long = "a".repeat(300);
        let event = Event {
            time_ns: 5,
            name: "auth.denied",
            attrs: vec![("rustygate.reason", Value::Str("expired".into()))],
        };
        let mut spans = Vec::new();
        let mut body = Vec::new();
        let mut s = SpanBody::start(
            &mut body,
            &SpanHead {
                trace_id: &trace_id,
                span_id: &server,
                parent: None,
                name: &["GET", " ", "/orders/{id}"],
                kind: Kind::Server,
                start_ns: 10,
                end_ns: 20,
            },
        );
        s.str("url.path", &long);
        s.int("http.response.status_code", 503);
        s.event(&event);
        s.finish(Some("503"), false);
        push_span(&mut spans, &body);
        let s = SpanBody::start(
            &mut body,
            &SpanHead {
                trace_id: &trace_id,
                span_id: &client,
                parent: Some(&server),
                name: &["GET"],
                kind: Kind::Client,
                start_ns: 12,
                end_ns: 11,
            },
        );
        s.finish(None, true);
        push_span(&mut spans, &body);
        let resource = [("service.name".to_owned(), "gw".repeat(100))];

        let encoded = encode(&resource, &spans);
        // The exporter's way: the heads written into the room left before the spans.
        for resource in [
            &resource[..],
            &[("service.name".to_owned(), "x".repeat(600))],
        ] {
            let mut batch = vec![0xee; BATCH_PREFIX];
            batch.extend_from_slice(&spans);
            assert_eq!(encode_batch(resource, batch), encode(resource, &spans));
        }
        let req = ExportTraceServiceRequest::decode(&encoded[..]).unwrap();
        let rs = &req.resource_spans[0];
        let attr = &rs.resource.as_ref().unwrap().attributes[0];
        assert_eq!(attr.key, "service.name");
        let Some(Any::StringValue(v)) = &attr.value.as_ref().unwrap().value else {
            panic!("{attr:?}")
        };
        assert_eq!(v, &"gw".repeat(100));
        let ss = &rs.scope_spans[0];
        assert_eq!(ss.scope.as_ref().unwrap().name, "rustygate");
        let [s, c] = &ss.spans[..] else {
            panic!("{:?}", ss.spans)
        };
        assert_eq!(s.name, "GET /orders/{id}");
        assert_eq!(
            (s.trace_id.as_slice(), s.span_id.as_slice()),
            (&[7; 16][..], &[1; 8][..])
        );
        assert!(s.parent_span_id.is_empty());
        assert_eq!(
            (s.kind, s.start_time_unix_nano, s.end_time_unix_nano),
            (2, 10, 20)
        );
        assert_eq!(s.attributes[0].key, "url.path");
        assert_eq!(
            s.attributes[0].value.as_ref().unwrap().value,
            Some(Any::StringValue(long))
        );
        assert_eq!(
            s.attributes[1].value.as_ref().unwrap().value,
            Some(Any::IntValue(503))
        );
        assert_eq!(s.events[0].name, "auth.denied");
        assert_eq!(s.events[0].attributes[0].key, "rustygate.reason");
        let status = s.status.as_ref().unwrap();
        assert_eq!((status.code, status.message.as_str()), (2, "503"));
        assert_eq!(s.flags, 0x101, "sampled, parent known to be local");
        assert_eq!(c.name, "GET");
        assert_eq!(c.parent_span_id, vec![1; 8]);
        assert_eq!(
            (c.kind, c.start_time_unix_nano, c.end_time_unix_nano),
            (3, 12, 12)
        );
        assert!(c.status.is_none() && c.attributes.is_empty());
        assert_eq!(c.flags, 0x301, "sampled, parent remote");
    }

    #[test]
    fn long_values_are_cut_at_a_character_boundary() {
        use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
        use opentelemetry_proto::tonic::trace::v1::Span;
        use prost::Message;

        // A 30 KB User-Agent of two-byte characters, after one ASCII byte: byte 1024 falls
        // inside a character.
        let ua = format!("x{}", "é".repeat(15_000));
        let event = Event {
            time_ns: 5,
            name: "policy.failed",
            attrs: vec![("rustygate.message", Value::Str(ua.clone()))],
        };
        let mut body = Vec::new();
        let mut s = SpanBody::start(
            &mut body,
            &SpanHead {
                trace_id: &TraceId([7; 16]),
                span_id: &SpanId([1; 8]),
                parent: None,
                name: &["GET"],
                kind: Kind::Server,
                start_ns: 1,
                end_ns: 2,
            },
        );
        s.str("user_agent.original", &ua);
        s.str("url.path", "/short");
        s.event(&event);
        s.finish(Some(&ua), false);
        assert!(body.len() < 4 * 1024, "a span of {} bytes", body.len());
        let span = Span::decode(&body[..]).unwrap();
        let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
            .as_ref()
            .and_then(|v| v.value.clone())
        {
            Some(Any::StringValue(s)) => s,
            other => panic!("{other:?}"),
        };
        let want = format!("x{}", "é".repeat(511));
        assert_eq!(want.len(), 1023);
        assert_eq!(text(&span.attributes[0].value), want);
        assert_eq!(text(&span.attributes[1].value), "/short");
        assert_eq!(text(&span.events[0].attributes[0].value), want);
        assert_eq!(span.status.unwrap().message, want);
    }

    #[test]
    fn varints_match_the_protobuf_examples() {
        for (n, want) in [
            (0u64, &[0u8][..]),
            (1, &[1]),
            (150, &[0x96, 0x01]),
            (300, &[0xac, 0x02]),
            (
                u64::MAX,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ] {
            let mut out = Vec::new();
            varint(&mut out, n);
            assert_eq!(out, want, "{n}");
        }
    }
}
