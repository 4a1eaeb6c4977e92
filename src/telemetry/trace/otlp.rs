//! Finished spans, and their OTLP/protobuf encoding (`ExportTraceServiceRequest`, the body of
//! `POST /v1/traces`), written by hand: the dozen fields used here do not justify a protobuf
//! code generator in the build. Field numbers are those of `opentelemetry/proto/trace/v1`; the
//! tests decode this output with the `opentelemetry-proto` crate.

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

/// One finished span.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub name: String,
    pub kind: Kind,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attrs: Vec<Attr>,
    pub events: Vec<Event>,
    /// `Some(message)`: status ERROR. `None`: status unset.
    pub error: Option<String>,
    /// The parent was in another process (bit 9 of `flags`, and bit 8 saying it is known).
    pub remote_parent: bool,
}

/// `ExportTraceServiceRequest` with one resource and one scope.
pub fn encode(resource: &[(String, String)], spans: &[SpanRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + spans.len() * 384);
    // resource_spans = 1
    message(&mut out, 1, |rs| {
        // resource = 1
        message(rs, 1, |r| {
            for (k, v) in resource {
                message(r, 1, |kv| key_value(kv, k, &Value::Str(v.clone())));
            }
        });
        // scope_spans = 2
        message(rs, 2, |ss| {
            // scope = 1: InstrumentationScope { name = 1, version = 2 }
            message(ss, 1, |scope| {
                string(scope, 1, "rustygate");
                string(scope, 2, env!("CARGO_PKG_VERSION"));
            });
            for s in spans {
                message(ss, 2, |buf| span(buf, s));
            }
        });
    });
    out
}

fn span(out: &mut Vec<u8>, s: &SpanRecord) {
    bytes(out, 1, &s.trace_id.0);
    bytes(out, 2, &s.span_id.0);
    if let Some(p) = &s.parent {
        bytes(out, 4, &p.0);
    }
    string(out, 5, &s.name);
    tag(out, 6, 0);
    varint(out, s.kind as u64);
    tag(out, 7, 1);
    out.extend_from_slice(&s.start_ns.to_le_bytes());
    tag(out, 8, 1);
    out.extend_from_slice(&s.end_ns.max(s.start_ns).to_le_bytes());
    for (k, v) in &s.attrs {
        message(out, 9, |kv| key_value(kv, k, v));
    }
    for e in &s.events {
        message(out, 11, |ev| {
            tag(ev, 1, 1);
            ev.extend_from_slice(&e.time_ns.to_le_bytes());
            string(ev, 2, e.name);
            for (k, v) in &e.attrs {
                message(ev, 3, |kv| key_value(kv, k, v));
            }
        });
    }
    if let Some(msg) = &s.error {
        // Status { message = 2, code = 3 (ERROR = 2) }
        message(out, 15, |st| {
            string(st, 2, msg);
            tag(st, 3, 0);
            varint(st, 2);
        });
    }
    // flags = 16 (fixed32): SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK, and IS_REMOTE when it is.
    tag(out, 16, 5);
    let flags: u32 = 0x100 | if s.remote_parent { 0x200 } else { 0 };
    out.extend_from_slice(&flags.to_le_bytes());
}

/// `KeyValue { key = 1, value = 2: AnyValue { string = 1 | bool = 2 | int = 3 } }`.
fn key_value(out: &mut Vec<u8>, key: &str, v: &Value) {
    string(out, 1, key);
    message(out, 2, |any| match v {
        Value::Str(s) => string(any, 1, s),
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

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn string(out: &mut Vec<u8>, field: u32, s: &str) {
    bytes(out, field, s.as_bytes());
}

/// A nested message, encoded in place: a one-byte length goes before it, widened afterwards
/// when the message is 128 bytes or more (a span; the batch). A buffer per message would cost
/// an allocation, its growth and a copy for each attribute of each span.
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
