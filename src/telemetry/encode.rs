//! OTLP's protobuf, written straight from what a request knows.
//!
//! A span is written as the request goes: an attempt's attributes when it
//! is sent, the rest when the request ends (protobuf takes a message's
//! fields in any order, repeated ones interleaved). Nothing is built to be
//! converted later: no `SpanData`, no `KeyValue`, no copy of a name the
//! config already holds. The batcher ([`super::export`]) concatenates the
//! framed spans and puts one `ExportTraceServiceRequest` head on them.
//!
//! Why not the SDK's `SpanData` and `opentelemetry-otlp`: measured with
//! callgrind (`bench/instructions.sh --trace`), the SDK's spans and that
//! crate's encoder (every span converted into owned protobuf structs, then
//! each nested length recomputed by prost at every level above it) cost
//! 40,000 instructions per request, as much as proxying it; written here
//! the same spans cost a small fraction of that. The tests decode the
//! bytes with `opentelemetry-proto`.

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanId, TraceFlags, TraceId};

const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;
const FIXED32: u64 = 5;

/// `Span.flags`: the context says whether the parent is remote.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// `Span.kind`.
pub const SERVER: u64 = 2;
pub const CLIENT: u64 = 3;

/// `Status.code`.
const STATUS_ERROR: u64 = 2;

// Field numbers, from opentelemetry/proto/trace/v1/trace.proto.
const SPAN_TRACE_ID: u32 = 1;
const SPAN_SPAN_ID: u32 = 2;
const SPAN_TRACE_STATE: u32 = 3;
const SPAN_PARENT: u32 = 4;
const SPAN_NAME: u32 = 5;
const SPAN_KIND: u32 = 6;
const SPAN_START: u32 = 7;
const SPAN_END: u32 = 8;
const SPAN_ATTRIBUTES: u32 = 9;
const SPAN_EVENTS: u32 = 11;
const SPAN_STATUS: u32 = 15;
const SPAN_FLAGS: u32 = 16;

pub fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn tag_len(field: u32) -> usize {
    varint_len(u64::from(field) << 3)
}

/// A length-delimited field whose body is `len` bytes, whole.
pub fn field_len(field: u32, len: usize) -> usize {
    tag_len(field) + varint_len(len as u64) + len
}

pub fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Protobuf written into a growing buffer.
#[derive(Default)]
pub struct Buf(pub Vec<u8>);

impl Buf {
    pub fn with_capacity(n: usize) -> Self {
        Buf(Vec::with_capacity(n))
    }

    pub fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn tag(&mut self, field: u32, wire: u64) {
        self.varint((u64::from(field) << 3) | wire);
    }

    /// A length-delimited field's tag and length; its body follows.
    pub fn head(&mut self, field: u32, len: usize) {
        self.tag(field, LEN);
        self.varint(len as u64);
    }

    pub fn bytes(&mut self, field: u32, b: &[u8]) {
        self.head(field, b.len());
        self.0.extend_from_slice(b);
    }

    fn fixed64(&mut self, field: u32, v: u64) {
        self.tag(field, FIXED64);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn uint(&mut self, field: u32, v: u64) {
        self.tag(field, VARINT);
        self.varint(v);
    }

    // A `KeyValue` (field `f` of its message) of each value type.

    pub fn attr_str(&mut self, f: u32, key: &str, v: &str) {
        let any = field_len(1, v.len());
        self.head(f, field_len(1, key.len()) + field_len(2, any));
        self.bytes(1, key.as_bytes());
        self.head(2, any);
        self.bytes(1, v.as_bytes());
    }

    pub fn attr_int(&mut self, f: u32, key: &str, v: i64) {
        let any = 1 + varint_len(v as u64);
        self.head(f, field_len(1, key.len()) + field_len(2, any));
        self.bytes(1, key.as_bytes());
        self.head(2, any);
        self.uint(3, v as u64);
    }

    pub fn attr_f64(&mut self, f: u32, key: &str, v: f64) {
        self.head(f, field_len(1, key.len()) + field_len(2, 9));
        self.bytes(1, key.as_bytes());
        self.head(2, 9);
        self.fixed64(4, v.to_bits());
    }
}

/// One span's body, written as its parts become known.
#[derive(Default)]
pub struct SpanBody(Buf);

impl SpanBody {
    pub fn with_capacity(n: usize) -> Self {
        SpanBody(Buf::with_capacity(n))
    }

    pub fn str(&mut self, key: &str, v: &str) {
        self.0.attr_str(SPAN_ATTRIBUTES, key, v);
    }

    pub fn int(&mut self, key: &str, v: i64) {
        self.0.attr_int(SPAN_ATTRIBUTES, key, v);
    }

    pub fn f64(&mut self, key: &str, v: f64) {
        self.0.attr_f64(SPAN_ATTRIBUTES, key, v);
    }

    /// An event with a name and no attributes.
    pub fn event(&mut self, name: &str, at: SystemTime) {
        self.0.head(SPAN_EVENTS, 9 + field_len(2, name.len()));
        self.0.fixed64(1, nanos(at));
        self.0.bytes(2, name.as_bytes());
    }

    /// `Status { code: ERROR }`.
    pub fn error(&mut self) {
        self.0.head(SPAN_STATUS, 2);
        self.0.uint(3, STATUS_ERROR);
    }

    /// The span's identity and times; with them the body is whole, and
    /// it goes onto `out` as a `ScopeSpans.spans` field.
    /// `name` is the concatenation of its parts.
    pub fn finish(
        mut self,
        id: &Ids<'_>,
        name: &[&str],
        start: SystemTime,
        end: SystemTime,
        out: &mut Vec<u8>,
    ) {
        let b = &mut self.0;
        b.bytes(SPAN_TRACE_ID, &id.trace.to_bytes());
        b.bytes(SPAN_SPAN_ID, &id.span.to_bytes());
        if !id.state.is_empty() {
            b.bytes(SPAN_TRACE_STATE, id.state.as_bytes());
        }
        if let Some(p) = id.parent {
            b.bytes(SPAN_PARENT, &p.to_bytes());
        }
        b.head(SPAN_NAME, name.iter().map(|p| p.len()).sum());
        for part in name {
            b.0.extend_from_slice(part.as_bytes());
        }
        b.uint(SPAN_KIND, id.kind);
        b.fixed64(SPAN_START, nanos(start));
        b.fixed64(SPAN_END, nanos(end.max(start)));
        let remote = if id.parent_is_remote { IS_REMOTE } else { 0 };
        b.tag(SPAN_FLAGS, FIXED32);
        let flags = u32::from(id.flags.to_u8()) | HAS_IS_REMOTE | remote;
        b.0.extend_from_slice(&flags.to_le_bytes());
        let mut frame = Buf(std::mem::take(out));
        frame.head(2, b.0.len());
        frame.0.extend_from_slice(&b.0);
        *out = frame.0;
    }
}

/// Who a span is.
pub struct Ids<'a> {
    pub trace: TraceId,
    pub span: SpanId,
    pub parent: Option<SpanId>,
    pub parent_is_remote: bool,
    pub flags: TraceFlags,
    /// The W3C `tracestate` header's text.
    pub state: &'a str,
    pub kind: u64,
}

/// A `Resource` message's body: its attributes.
pub fn resource(attrs: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Buf::default();
    for (k, v) in attrs {
        b.attr_str(1, k, v);
    }
    b.0
}

/// An `InstrumentationScope` message's body.
pub fn scope(name: &str, version: &str) -> Vec<u8> {
    let mut b = Buf::default();
    b.bytes(1, name.as_bytes());
    b.bytes(2, version.as_bytes());
    b.0
}

/// The `ExportTraceServiceRequest` around `spans`, each already framed as
/// a `ScopeSpans.spans` field.
pub fn request(resource: &[u8], scope: &[u8], spans: &[u8]) -> Vec<u8> {
    let scope_spans = field_len(1, scope.len()) + spans.len();
    let resource_spans = field_len(1, resource.len()) + field_len(2, scope_spans);
    let mut b = Buf::with_capacity(field_len(1, resource_spans));
    b.head(1, resource_spans);
    b.bytes(1, resource);
    b.head(2, scope_spans);
    b.bytes(1, scope);
    b.0.extend_from_slice(spans);
    b.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use prost::Message;
    use std::time::Duration;

    #[test]
    fn spans_written_in_parts_decode_whole() {
        let t0 = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_001);
        let t1 = t0 + Duration::from_millis(250);
        let mut out = Vec::new();
        let mut client = SpanBody::with_capacity(64);
        client.str("gen_ai.operation.name", "chat");
        client.int("sluice.attempt", 1);
        client.int("negative", -3);
        client.str("empty", "");
        client.str("unicode", "modèle-✓");
        client.str("long", &"x".repeat(300));
        // Attributes after others: protobuf takes fields in any order.
        client.f64("sluice.time_to_first_chunk", 0.125);
        client.event("first_chunk", t0 + Duration::from_millis(5));
        client.error();
        let server_id = SpanId::from(0x00f0_67aa_0ba9_02b7);
        let trace = TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
        client.finish(
            &Ids {
                trace,
                span: SpanId::from(7),
                parent: Some(server_id),
                parent_is_remote: false,
                flags: TraceFlags::SAMPLED,
                state: "vendor=opaque",
                kind: CLIENT,
            },
            &["chat", " ", "gpt-4.1"],
            t0,
            t1,
            &mut out,
        );
        let mut server = SpanBody::default();
        server.int("http.response.status_code", 200);
        server.finish(
            &Ids {
                trace,
                span: server_id,
                parent: Some(SpanId::from(1)),
                parent_is_remote: true,
                flags: TraceFlags::SAMPLED,
                state: "",
                kind: SERVER,
            },
            &["POST llm"],
            t0,
            // An end before the start (a clock step) is the start.
            t0 - Duration::from_secs(1),
            &mut out,
        );
        let resource = resource(&[("service.name", "sluice"), ("service.version", "0.1.0")]);
        let body = request(&resource, &scope("sluice", "0.1.0"), &out);
        let r = ExportTraceServiceRequest::decode(&body[..]).expect("valid protobuf");
        assert_eq!(r.resource_spans.len(), 1);
        let rs = &r.resource_spans[0];
        let res = rs.resource.as_ref().unwrap();
        assert_eq!(res.attributes[0].key, "service.name");
        assert_eq!(rs.scope_spans.len(), 1);
        let ss = &rs.scope_spans[0];
        let scope = ss.scope.as_ref().unwrap();
        assert_eq!(
            (scope.name.as_str(), scope.version.as_str()),
            ("sluice", "0.1.0")
        );
        assert_eq!(ss.spans.len(), 2);
        let c = &ss.spans[0];
        assert_eq!(c.trace_id, trace.to_bytes().to_vec());
        assert_eq!(c.span_id, 7u64.to_be_bytes().to_vec());
        assert_eq!(c.parent_span_id, server_id.to_bytes().to_vec());
        assert_eq!(c.trace_state, "vendor=opaque");
        assert_eq!(c.name, "chat gpt-4.1");
        assert_eq!(c.kind, 3);
        assert_eq!(c.start_time_unix_nano, 1_700_000_000_000_000_001);
        assert_eq!(c.end_time_unix_nano - c.start_time_unix_nano, 250_000_000);
        assert_eq!(c.flags, 0x101);
        assert_eq!(c.status.as_ref().unwrap().code, 2);
        let attrs: Vec<(String, Value)> = c
            .attributes
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone().unwrap().value.unwrap()))
            .collect();
        assert_eq!(
            attrs,
            vec![
                (
                    "gen_ai.operation.name".into(),
                    Value::StringValue("chat".into())
                ),
                ("sluice.attempt".into(), Value::IntValue(1)),
                ("negative".into(), Value::IntValue(-3)),
                ("empty".into(), Value::StringValue(String::new())),
                ("unicode".into(), Value::StringValue("modèle-✓".into())),
                ("long".into(), Value::StringValue("x".repeat(300))),
                (
                    "sluice.time_to_first_chunk".into(),
                    Value::DoubleValue(0.125)
                ),
            ]
        );
        assert_eq!(c.events.len(), 1);
        assert_eq!(c.events[0].name, "first_chunk");
        assert_eq!(c.events[0].time_unix_nano, 1_700_000_000_005_000_001);
        let s = &ss.spans[1];
        assert_eq!(s.kind, 2);
        assert_eq!(s.flags, 0x301, "sampled, parent remote");
        assert_eq!(s.end_time_unix_nano, s.start_time_unix_nano);
        assert!(s.status.is_none() && s.trace_state.is_empty());
    }

    #[test]
    fn varint_lengths_at_their_edges() {
        for (v, n) in [
            (0, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (u64::MAX, 10),
        ] {
            assert_eq!(varint_len(v), n, "{v}");
            let mut b = Buf::default();
            b.varint(v);
            assert_eq!(b.0.len(), n, "{v}");
        }
    }
}
