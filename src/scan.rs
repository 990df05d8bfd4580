//! The incremental scanner over a JSON request body (SPEC §7, "Reading the
//! body"): finds the top-level fields a route acts on without building a
//! JSON tree, refuses a body that repeats one, and says where each value
//! lies so the caller can read it ([`slice()`]) or replace it ([`splice`])
//! without copying or re-serialising the prompt.
//!
//! The body arrives in chunks that may split it anywhere, so all state
//! lives in [`Scanner`] between calls: a small enum, the nesting depth with
//! one bit per level for its kind, and one key's raw bytes. Memory is O(1).
//!
//! Speed comes from skipping: string bodies (nearly all of a chat body) are
//! skipped with `memchr2` for `"` and `\`, and only the few bytes between
//! strings in nested values are looked at one by one. Validation is light:
//! the top-level object's own grammar, scalar characters at the top level,
//! and matching brackets; never what a valid body could fail.

use std::borrow::Cow;
use std::ops::Range;

use bytes::Bytes;
use memchr::memchr2;

/// A top-level field sluice may act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Model,
    Stream,
    StreamOptions,
    MaxTokens,
    MaxCompletionTokens,
    /// The Responses API's output cap.
    MaxOutputTokens,
    N,
}

impl Field {
    /// Every field, in declaration order.
    pub const ALL: [Field; 7] = [
        Field::Model,
        Field::Stream,
        Field::StreamOptions,
        Field::MaxTokens,
        Field::MaxCompletionTokens,
        Field::MaxOutputTokens,
        Field::N,
    ];

    /// The JSON key.
    pub const fn key(self) -> &'static str {
        match self {
            Field::Model => "model",
            Field::Stream => "stream",
            Field::StreamOptions => "stream_options",
            Field::MaxTokens => "max_tokens",
            Field::MaxCompletionTokens => "max_completion_tokens",
            Field::MaxOutputTokens => "max_output_tokens",
            Field::N => "n",
        }
    }

    /// The field named by an (unescaped) key, compared exactly.
    fn from_key(key: &[u8]) -> Option<Field> {
        Some(match key {
            b"model" => Field::Model,
            b"stream" => Field::Stream,
            b"stream_options" => Field::StreamOptions,
            b"max_tokens" => Field::MaxTokens,
            b"max_completion_tokens" => Field::MaxCompletionTokens,
            b"max_output_tokens" => Field::MaxOutputTokens,
            b"n" => Field::N,
            _ => return None,
        })
    }

    const fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of fields (a small bitset, Copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fields(u8);

impl Fields {
    pub const fn empty() -> Self {
        Fields(0)
    }

    /// Every field.
    pub const fn all() -> Self {
        let mut all = Fields(0);
        let mut i = 0;
        while i < Field::ALL.len() {
            all = all.with(Field::ALL[i]);
            i += 1;
        }
        all
    }

    pub const fn with(self, f: Field) -> Self {
        Fields(self.0 | f.bit())
    }

    pub fn contains(self, f: Field) -> bool {
        self.0 & f.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// Where a field's value lies in the body: absolute byte offsets from the
/// body's start. `key_start` is the key's opening quote; `value` is exactly
/// the value's JSON text (a string's quotes included, no whitespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub key_start: u64,
    pub value: Range<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanError {
    /// Not a JSON object (or broken JSON) at this byte offset.
    Invalid { at: u64 },
    /// A field in the watched set appears twice at the top level.
    Duplicate(Field),
    /// The body ended before the object closed.
    Truncated,
}

/// The longest key we match, `max_completion_tokens`.
const LONGEST: usize = 21;

/// The most raw key bytes kept for matching. An escape writes one ASCII
/// character in at most 6 bytes (`\u006d`), so a raw key longer than
/// 6 x 21 cannot unescape to one of ours: the bound is exact, and a fully
/// escaped `max_completion_tokens` is still caught as a duplicate.
const KEY_MAX: usize = 6 * LONGEST;

/// Nesting levels whose kind (object or array) is remembered, one bit each.
/// Deeper levels are only counted: still never a valid body refused.
const TYPED_LEVELS: u64 = 256;

/// Where the scanner is in the body, between any two bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the opening `{`.
    Start,
    /// Right after `{`: a key or `}`.
    FirstKey,
    /// After `,`: a key.
    Key,
    /// Inside a top-level key; `escaped`: the previous chunk ended on a
    /// backslash, so the next byte is escaped.
    InKey { escaped: bool },
    /// After a key: `:`.
    Colon,
    /// After `:`: a value.
    Value,
    /// Inside a top-level string value.
    Str { escaped: bool },
    /// Inside a top-level number or literal.
    Scalar,
    /// Inside a top-level object or array value, `depth` levels deep.
    Nested { in_str: bool, escaped: bool },
    /// After a top-level value: `,` or `}`.
    AfterValue,
    /// The object closed; only whitespace may follow.
    Done,
}

/// How a string's scan ended within a chunk.
enum StrEnd {
    /// The closing quote is at this index.
    Closed(usize),
    /// The chunk ended inside the string, on a backslash or not.
    Open { escaped: bool },
}

/// Finds the closing quote of a string whose body starts at `i`.
fn string_end(buf: &[u8], mut i: usize, escaped: bool) -> StrEnd {
    if escaped {
        // The escape's backslash ended the previous chunk: this byte is
        // its second half (`\"` must not close the string).
        if i >= buf.len() {
            return StrEnd::Open { escaped: true };
        }
        i += 1;
    }
    loop {
        // i <= buf.len() always: a backslash is skipped with its escaped byte
        // only when that byte is in this chunk.
        let Some(k) = buf.get(i..).and_then(|rest| memchr2(b'"', b'\\', rest)) else {
            return StrEnd::Open { escaped: false };
        };
        let j = i + k;
        if buf[j] == b'"' {
            return StrEnd::Closed(j);
        }
        if j + 1 >= buf.len() {
            return StrEnd::Open { escaped: true };
        }
        // `\uXXXX` needs no more: its hex digits are never `"` or `\`.
        i = j + 2;
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Bytes a number or literal may contain (loosely: the grammar is the
/// reader's business; this only finds where the value ends).
fn is_scalar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-')
}

/// `raw` (a key's bytes between its quotes) with JSON escapes undone, when
/// the result is ASCII and short enough to be one of ours.
fn unescape(raw: &[u8], out: &mut [u8; LONGEST]) -> Option<usize> {
    let (mut i, mut n) = (0, 0);
    while let Some(&b) = raw.get(i) {
        i += 1;
        let c = if b != b'\\' {
            b
        } else {
            let e = *raw.get(i)?;
            i += 1;
            match e {
                b'"' | b'\\' | b'/' => e,
                b'b' => 0x08,
                b'f' => 0x0c,
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'u' => {
                    let hex = raw.get(i..i + 4)?;
                    i += 4;
                    let mut code = 0u32;
                    for &h in hex {
                        code = code * 16 + char::from(h).to_digit(16)?;
                    }
                    // Not ASCII: cannot be one of our names.
                    u8::try_from(code).ok().filter(u8::is_ascii)?
                }
                _ => return None,
            }
        };
        *out.get_mut(n)? = c;
        n += 1;
    }
    Some(n)
}

/// Scans one JSON request body fed in chunks; see the module docs.
#[derive(Debug)]
pub struct Scanner {
    watched: Fields,
    state: State,
    /// The first error, returned again by every later call.
    error: Option<ScanError>,
    /// Bytes fed before the current chunk.
    offset: u64,
    /// Watched keys seen at the top level (refused a second time).
    seen: Fields,
    /// Watched fields whose value is complete, and where.
    found: Fields,
    spans: [Option<Span>; Field::ALL.len()],
    /// The watched field whose value is being read, and its key's start.
    pending: Option<(Field, u64)>,
    /// The current top-level key's opening quote and value's first byte.
    key_start: u64,
    value_start: u64,
    /// The current key's raw bytes; `key_len > KEY_MAX` when it is too long
    /// to be ours (then nothing more is kept).
    key: [u8; KEY_MAX],
    key_len: usize,
    /// The current key has a backslash: unescape before comparing.
    key_escaped: bool,
    /// Nesting inside a top-level value, and the kind of each of the first
    /// `TYPED_LEVELS` levels (bit set: object).
    depth: u64,
    kinds: [u64; (TYPED_LEVELS / 64) as usize],
}

impl Scanner {
    /// Watches `fields`: records their spans, refuses them twice.
    pub fn new(fields: Fields) -> Self {
        Scanner {
            watched: fields,
            state: State::Start,
            error: None,
            offset: 0,
            seen: Fields::empty(),
            found: Fields::empty(),
            spans: Default::default(),
            pending: None,
            key_start: 0,
            value_start: 0,
            key: [0; KEY_MAX],
            key_len: 0,
            key_escaped: false,
            depth: 0,
            kinds: [0; (TYPED_LEVELS / 64) as usize],
        }
    }

    /// The next chunk of the body. Keeps scanning after every watched field
    /// was found (a later duplicate or broken JSON is still caught), at the
    /// same low cost. After an error, further feeds return the same error.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), ScanError> {
        let result = match &self.error {
            Some(e) => Err(e.clone()),
            None => self.run(chunk),
        };
        self.offset += chunk.len() as u64;
        if let Err(e) = &result {
            self.error = Some(e.clone());
        }
        result
    }

    /// The body ended: Ok only if one complete top-level object was read,
    /// followed by JSON whitespace at most. An empty (or all-whitespace)
    /// body is `Invalid` at its end: no object was begun, none truncated.
    pub fn finish(&mut self) -> Result<(), ScanError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let result = match self.state {
            State::Done => return Ok(()),
            State::Start => ScanError::Invalid { at: self.offset },
            _ => ScanError::Truncated,
        };
        self.error = Some(result.clone());
        Err(result)
    }

    /// Every watched field was seen with its value complete.
    pub fn has_all(&self) -> bool {
        self.found == self.watched
    }

    /// The span of a watched field whose value is complete.
    pub fn span(&self, f: Field) -> Option<&Span> {
        self.spans[f as usize].as_ref()
    }

    /// Bytes fed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The top-level object has closed (and nothing invalid followed yet).
    pub fn is_done(&self) -> bool {
        self.state == State::Done && self.error.is_none()
    }

    /// The watched set.
    pub fn watched(&self) -> Fields {
        self.watched
    }

    fn run(&mut self, buf: &[u8]) -> Result<(), ScanError> {
        let mut i = 0;
        while i < buf.len() {
            i = match self.state {
                State::InKey { escaped } => self.key_bytes(buf, i, escaped)?,
                State::Str { escaped } => match string_end(buf, i, escaped) {
                    StrEnd::Closed(j) => {
                        self.value_done(j + 1);
                        j + 1
                    }
                    StrEnd::Open { escaped } => {
                        self.state = State::Str { escaped };
                        buf.len()
                    }
                },
                State::Scalar => match buf[i..].iter().position(|&b| !is_scalar(b)) {
                    // The delimiter is left for `AfterValue` to judge.
                    Some(k) => {
                        self.value_done(i + k);
                        i + k
                    }
                    None => buf.len(),
                },
                State::Nested { in_str, escaped } => self.nested(buf, i, in_str, escaped)?,
                _ => {
                    let b = buf[i];
                    if !is_ws(b) {
                        self.token(b, i)?;
                    }
                    i + 1
                }
            };
        }
        Ok(())
    }

    /// Absolute offset of index `i` in the current chunk.
    fn at(&self, i: usize) -> u64 {
        self.offset + i as u64
    }

    /// One structural byte of the top-level object at index `i`.
    fn token(&mut self, b: u8, i: usize) -> Result<(), ScanError> {
        let at = self.at(i);
        self.state = match (self.state, b) {
            (State::Start, b'{') => State::FirstKey,
            (State::FirstKey | State::Key, b'"') => {
                self.key_start = at;
                self.key_len = 0;
                self.key_escaped = false;
                State::InKey { escaped: false }
            }
            (State::FirstKey | State::AfterValue, b'}') => State::Done,
            (State::Colon, b':') => State::Value,
            (State::AfterValue, b',') => State::Key,
            (State::Value, _) => {
                self.value_start = at;
                match b {
                    b'"' => State::Str { escaped: false },
                    b'{' | b'[' => {
                        self.depth = 0;
                        self.push(b == b'{');
                        State::Nested {
                            in_str: false,
                            escaped: false,
                        }
                    }
                    b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => State::Scalar,
                    _ => return Err(ScanError::Invalid { at }),
                }
            }
            _ => return Err(ScanError::Invalid { at }),
        };
        Ok(())
    }

    /// Inside a top-level key from index `i`: keeps its raw bytes (up to
    /// `KEY_MAX`), and at the closing quote decides what it names.
    fn key_bytes(&mut self, buf: &[u8], mut i: usize, escaped: bool) -> Result<usize, ScanError> {
        if escaped {
            self.keep(&buf[i..i + 1]);
            i += 1;
        }
        loop {
            let Some(k) = buf.get(i..).and_then(|rest| memchr2(b'"', b'\\', rest)) else {
                self.keep(&buf[i..]);
                self.state = State::InKey { escaped: false };
                return Ok(buf.len());
            };
            let j = i + k;
            if buf[j] == b'"' {
                self.keep(&buf[i..j]);
                self.key_done()?;
                return Ok(j + 1);
            }
            self.key_escaped = true;
            if j + 1 >= buf.len() {
                self.keep(&buf[i..]);
                self.state = State::InKey { escaped: true };
                return Ok(buf.len());
            }
            self.keep(&buf[i..j + 2]);
            i = j + 2;
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        let end = self.key_len + bytes.len();
        if end <= KEY_MAX {
            self.key[self.key_len..end].copy_from_slice(bytes);
            self.key_len = end;
        } else {
            self.key_len = KEY_MAX + 1;
        }
    }

    /// The key closed: a watched field seen twice is refused here, as
    /// early as the second key, before its value is read.
    fn key_done(&mut self) -> Result<(), ScanError> {
        self.state = State::Colon;
        if self.key_len > KEY_MAX {
            return Ok(());
        }
        let raw = &self.key[..self.key_len];
        let field = if self.key_escaped {
            let mut out = [0; LONGEST];
            unescape(raw, &mut out).and_then(|n| Field::from_key(&out[..n]))
        } else {
            Field::from_key(raw)
        };
        let Some(f) = field.filter(|&f| self.watched.contains(f)) else {
            return Ok(());
        };
        if self.seen.contains(f) {
            return Err(ScanError::Duplicate(f));
        }
        self.seen = self.seen.with(f);
        self.pending = Some((f, self.key_start));
        Ok(())
    }

    /// A top-level value ended just before index `end`.
    fn value_done(&mut self, end: usize) {
        self.state = State::AfterValue;
        if let Some((f, key_start)) = self.pending.take() {
            self.spans[f as usize] = Some(Span {
                key_start,
                value: self.value_start..self.at(end),
            });
            self.found = self.found.with(f);
        }
    }

    /// Inside a nested value from index `i`; returns where scanning goes
    /// on. Strings are skipped with memchr; between them, only brackets
    /// matter (numbers, literals, `:` and `,` are not checked).
    fn nested(
        &mut self,
        buf: &[u8],
        mut i: usize,
        mut in_str: bool,
        mut escaped: bool,
    ) -> Result<usize, ScanError> {
        loop {
            if in_str {
                match string_end(buf, i, escaped) {
                    StrEnd::Closed(j) => i = j + 1,
                    StrEnd::Open { escaped } => {
                        self.state = State::Nested {
                            in_str: true,
                            escaped,
                        };
                        return Ok(buf.len());
                    }
                }
                escaped = false;
            }
            loop {
                let Some(&b) = buf.get(i) else {
                    self.state = State::Nested {
                        in_str: false,
                        escaped: false,
                    };
                    return Ok(buf.len());
                };
                i += 1;
                match b {
                    b'"' => break,
                    b'{' | b'[' => self.push(b == b'{'),
                    b'}' | b']' => {
                        if !self.pop(b == b'}') {
                            return Err(ScanError::Invalid { at: self.at(i - 1) });
                        }
                        if self.depth == 0 {
                            self.value_done(i);
                            return Ok(i);
                        }
                    }
                    _ => {}
                }
            }
            in_str = true;
        }
    }

    fn push(&mut self, object: bool) {
        let d = self.depth;
        if d < TYPED_LEVELS {
            let (word, bit) = ((d / 64) as usize, d % 64);
            if object {
                self.kinds[word] |= 1 << bit;
            } else {
                self.kinds[word] &= !(1 << bit);
            }
        }
        self.depth = d.saturating_add(1);
    }

    /// Closes a level; false when the bracket does not match its opener.
    fn pop(&mut self, object: bool) -> bool {
        let Some(d) = self.depth.checked_sub(1) else {
            return false;
        };
        self.depth = d;
        if d < TYPED_LEVELS {
            let (word, bit) = ((d / 64) as usize, d % 64);
            (self.kinds[word] >> bit & 1 == 1) == object
        } else {
            true
        }
    }
}

/// The bytes of `range` out of `chunks`, which together are the body from
/// offset 0; copied only when the range crosses chunks. A range past the
/// body's end is cut at the end.
pub fn slice(chunks: &[Bytes], range: Range<u64>) -> Cow<'_, [u8]> {
    let mut start = 0u64;
    let mut copy: Option<Vec<u8>> = None;
    for c in chunks {
        let end = start + c.len() as u64;
        let (a, b) = (range.start.max(start), range.end.min(end));
        if a < b {
            let part = &c[(a - start) as usize..(b - start) as usize];
            match &mut copy {
                None if b == range.end => return Cow::Borrowed(part),
                None => {
                    let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
                    let mut v = Vec::with_capacity((range.end.min(total) - a) as usize);
                    v.extend_from_slice(part);
                    copy = Some(v);
                }
                Some(v) => v.extend_from_slice(part),
            }
        }
        if end >= range.end {
            break;
        }
        start = end;
    }
    copy.map_or(Cow::Borrowed(&[]), Cow::Owned)
}

/// The body with `range` replaced by `with`, as chunks: zero-copy slices of
/// the originals around the new bytes (`Bytes::slice`), never a copy of the
/// prompt. A range past the body's end is cut at the end.
pub fn splice(chunks: &[Bytes], range: Range<u64>, with: Bytes) -> Vec<Bytes> {
    let (cut_start, cut_end) = (range.start, range.end.max(range.start));
    let mut out = Vec::with_capacity(chunks.len() + 2);
    let mut with = Some(with);
    let mut push = |b: Bytes| {
        if !b.is_empty() {
            out.push(b);
        }
    };
    let mut start = 0u64;
    for c in chunks {
        let end = start + c.len() as u64;
        if start < cut_start {
            push(c.slice(..(cut_start.min(end) - start) as usize));
        }
        if cut_start <= end {
            if let Some(w) = with.take() {
                push(w);
            }
        }
        if end > cut_end {
            push(c.slice((cut_end.max(start) - start) as usize..));
        }
        start = end;
    }
    if let Some(w) = with {
        push(w);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::fmt;

    use proptest::prelude::*;
    use proptest::sample::Index;
    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
    use serde_json::Value;

    use super::*;

    const ALL: Fields = Fields::all();
    const MODEL: Fields = Fields::empty().with(Field::Model);
    const NO_SPANS: [Option<Span>; 7] = [None, None, None, None, None, None, None];

    /// Everything a scan ends with, to compare one feed against many.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Outcome {
        result: Result<(), ScanError>,
        spans: [Option<Span>; Field::ALL.len()],
        has_all: bool,
        done: bool,
        offset: u64,
    }

    fn scan(parts: &[&[u8]], watched: Fields) -> Outcome {
        let mut s = Scanner::new(watched);
        let mut result = Ok(());
        for p in parts {
            let r = s.feed(p);
            // Sticky: once wrong, every later feed says the same.
            if result.is_err() {
                assert_eq!(r, result);
            }
            result = r;
        }
        if result.is_ok() {
            result = s.finish();
        }
        // Sticky: the same answer again.
        assert_eq!(s.finish(), result);
        Outcome {
            result,
            spans: s.spans.clone(),
            has_all: s.has_all(),
            done: s.is_done(),
            offset: s.offset(),
        }
    }

    fn whole(body: &str, watched: Fields) -> Outcome {
        scan(&[body.as_bytes()], watched)
    }

    fn value_of<'a>(body: &'a str, o: &Outcome, f: Field) -> Option<&'a str> {
        let span = o.spans[f as usize].as_ref()?;
        Some(&body[span.value.start as usize..span.value.end as usize])
    }

    /// A chat body's `messages` of at least `bytes`, with escapes, brackets
    /// and `"model":` inside its strings, and nested `model` keys.
    fn messages(bytes: usize) -> String {
        let content =
            r#"Here is some \"model\": \"evil\" text, a {\"model\": [1, 2]} and \\ \u00e9 [{\n"#;
        let mut s = String::from("[");
        while s.len() < bytes {
            if s.len() > 1 {
                s.push(',');
            }
            s.push_str(r#"{"role":"user","model":"nested","content":""#);
            s.push_str(&content.repeat(30));
            s.push_str(r#"","meta":{"model":{"x":[]}}}"#);
        }
        s.push(']');
        s
    }

    #[test]
    fn model_first_then_a_mebibyte() {
        let body = format!(r#"{{"model":"gpt-4o","messages":{}}}"#, messages(1 << 20));
        let mut s = Scanner::new(MODEL);
        let mut chunks = body.as_bytes().chunks(8 * 1024);
        s.feed(chunks.next().unwrap()).unwrap();
        // Known after the first chunk: the caller may stop waiting here.
        assert!(s.has_all());
        assert_eq!(
            s.span(Field::Model),
            Some(&Span {
                key_start: 1,
                value: 9..17
            })
        );
        for c in chunks {
            s.feed(c).unwrap();
        }
        s.finish().unwrap();
        assert!(s.is_done());
        assert_eq!(s.offset(), body.len() as u64);
    }

    #[test]
    fn model_last_after_a_mebibyte() {
        let body = format!(
            r#"{{"messages":{}, "model" : "gpt-4o" }}"#,
            messages(1 << 20)
        );
        let mut s = Scanner::new(MODEL);
        let chunks: Vec<_> = body.as_bytes().chunks(8 * 1024).collect();
        for c in &chunks[..chunks.len() - 1] {
            s.feed(c).unwrap();
            assert!(!s.has_all() && s.span(Field::Model).is_none());
        }
        s.feed(chunks[chunks.len() - 1]).unwrap();
        s.finish().unwrap();
        let span = s.span(Field::Model).unwrap().clone();
        let v = &body[span.value.start as usize..span.value.end as usize];
        assert_eq!(v, r#""gpt-4o""#);
        assert_eq!(&body[span.key_start as usize..][..7], r#""model""#);
    }

    #[test]
    fn nested_model_never_matches() {
        let body = r#"{"messages":[{"role":"user","model":"a"}],
            "tools":[{"type":"function","function":{"parameters":{"properties":{"model":{"type":"string"}}}}}],
            "meta":{"model":"b","stream":true},"x":[["model"],{"model":1}]}"#;
        let o = whole(body, ALL);
        assert_eq!(o.result, Ok(()));
        assert_eq!(o.spans, NO_SPANS);
    }

    #[test]
    fn model_inside_a_string_never_matches() {
        let body = r#"{"prompt":"\"model\": \"evil\", \"n\": 9","x":"{\"model\":1}","\"model\"":2,"model ":3}"#;
        let o = whole(body, ALL);
        assert_eq!(o.result, Ok(()));
        assert_eq!(o.spans, NO_SPANS);
    }

    #[test]
    fn escaped_keys_match_after_unescaping() {
        for key in [
            r#""mod\u0065l""#,
            r#""\u006D\u006F\u0064\u0065\u006C""#,
            r#""m\u006fdel""#,
        ] {
            let body = format!(r#"{{{key}:"x"}}"#);
            let o = whole(&body, ALL);
            assert_eq!(o.result, Ok(()), "{body}");
            assert_eq!(value_of(&body, &o, Field::Model), Some(r#""x""#), "{body}");
        }
        // Escapes that do not spell a name of ours.
        for key in [
            r#""mo\/del""#,
            r#""mod\u00e9l""#,
            r#""model\u0000""#,
            r#""mod\el""#,
            r#""\u006""#,
        ] {
            let body = format!(r#"{{{key}:"x"}}"#);
            assert_eq!(whole(&body, ALL).spans, NO_SPANS, "{body}");
        }
    }

    #[test]
    fn a_watched_field_twice_is_refused() {
        let cases = [
            (r#"{"model":"a","model":"b"}"#, Field::Model),
            (
                r#"{"model":"a","messages":[],"mod\u0065l":"b"}"#,
                Field::Model,
            ),
            (r#"{"n":1,"stream":true,"n":2}"#, Field::N),
            (
                r#"{"stream_options":{},"stream_options":null}"#,
                Field::StreamOptions,
            ),
        ];
        for (body, f) in cases {
            assert_eq!(
                whole(body, ALL).result,
                Err(ScanError::Duplicate(f)),
                "{body}"
            );
        }
        // The longest name fully escaped (126 bytes) is still recognised.
        let escaped: String = "max_completion_tokens"
            .bytes()
            .map(|b| format!("\\u{b:04x}"))
            .collect();
        assert_eq!(escaped.len(), KEY_MAX);
        let body = format!(r#"{{"max_completion_tokens":10,"{escaped}":100000}}"#);
        assert_eq!(
            whole(&body, ALL).result,
            Err(ScanError::Duplicate(Field::MaxCompletionTokens))
        );
        // Refused at the second key, before its value arrives.
        let mut s = Scanner::new(ALL);
        assert_eq!(
            s.feed(br#"{"model":"a","model""#),
            Err(ScanError::Duplicate(Field::Model))
        );
        assert_eq!(s.feed(b":1}"), Err(ScanError::Duplicate(Field::Model)));
    }

    #[test]
    fn an_unwatched_field_twice_is_fine() {
        let body = r#"{"stream":true,"stream":false,"model":"x","foo":1,"foo":2}"#;
        let o = whole(body, MODEL);
        assert_eq!(o.result, Ok(()));
        assert!(o.has_all);
        assert_eq!(value_of(body, &o, Field::Model), Some(r#""x""#));
        assert_eq!(o.spans[Field::Stream as usize], None);
    }

    #[test]
    fn a_long_key_is_not_ours() {
        let key = format!("{}model", "\\u0020".repeat(40));
        let body = format!(r#"{{"{key}":1,"{}":2}}"#, "m".repeat(500));
        let o = whole(&body, ALL);
        assert_eq!(o.result, Ok(()));
        assert_eq!(o.spans, NO_SPANS);
    }

    #[test]
    fn not_an_object_is_invalid_where_it_shows() {
        for (body, at) in [
            ("[", 0),
            (r#""x""#, 0),
            ("nul", 0),
            ("garbage", 0),
            ("  \n[1]", 3),
            ("", 0),
            ("   ", 3),
            ("{}x", 2),
            ("{} {}", 3),
            (r#"{"a":1}}"#, 7),
            (r#"{"a":1,}"#, 7),
            (r#"{"a":[}}"#, 6),
            (r#"{"a":{]}"#, 6),
            (r#"{"a" 1}"#, 5),
            (r#"{"a":}"#, 5),
            (r#"{"a":x}"#, 5),
            (r#"{,}"#, 1),
            (r#"{"a":1 "b":2}"#, 7),
            (r#"{"a":"b"c}"#, 8),
            (r#"{"a":1,"b"}"#, 10),
            (r#"{1:2}"#, 1),
        ] {
            assert_eq!(
                whole(body, ALL).result,
                Err(ScanError::Invalid { at }),
                "{body:?}"
            );
        }
        // Told at the first byte, before the body ends.
        let mut s = Scanner::new(ALL);
        assert_eq!(s.feed(b"["), Err(ScanError::Invalid { at: 0 }));
        assert_eq!(s.feed(b"{}"), Err(ScanError::Invalid { at: 0 }));
        assert!(!s.is_done());
    }

    #[test]
    fn a_short_body_is_truncated() {
        for body in [
            "{",
            r#"{"model""#,
            r#"{"model":"x""#,
            r#"{"model":"x\"}"#,
            r#"{"a":[1,2"#,
            r#"{"a":[{"b":"]}"}]"#,
            r#"{"n":1"#,
            r#"{"a":1,"#,
            r#"{"mod"#,
        ] {
            assert_eq!(
                whole(body, ALL).result,
                Err(ScanError::Truncated),
                "{body:?}"
            );
        }
    }

    #[test]
    fn valid_objects() {
        for body in [
            "{}",
            " \t\r\n{ } \n",
            r#"{"a":{"b":[[],{}]},"c":"}]","d":-1.5e+3,"e":true,"f":null}"#,
            r#"{"n":0,"stream":false,"max_tokens":1E9}"#,
        ] {
            let o = whole(body, ALL);
            assert_eq!(o.result, Ok(()), "{body:?}");
            assert!(o.done);
        }
    }

    /// A body with a split hazard at nearly every byte.
    const TRICKY: &str = r#" { "a" : "x\\\"y\\\\" , "b":[{"c":"}]\\\"{["},"\u005d",[[]],{}], "mod\u0065l" : "m\"x\\" , "n":-1.5e+3 , "stream":true, "stream_options" : { "include_usage" : true } ,"max_tokens":7,"max_completion_tokens":null, "max_output_\u0074okens" :9}  "#;

    #[test]
    fn tricky_body_at_every_split() {
        let o = whole(TRICKY, ALL);
        assert_eq!(o.result, Ok(()));
        assert!(o.has_all);
        let values: Vec<_> = Field::ALL
            .iter()
            .map(|&f| value_of(TRICKY, &o, f).unwrap())
            .collect();
        assert_eq!(
            values,
            [
                r#""m\"x\\""#,
                "true",
                r#"{ "include_usage" : true }"#,
                "7",
                "null",
                "9",
                "-1.5e+3"
            ]
        );
        let b = TRICKY.as_bytes();
        for at in 0..=b.len() {
            assert_eq!(scan(&[&b[..at], &b[at..]], ALL), o, "split at {at}");
        }
        let bytes: Vec<&[u8]> = b.chunks(1).collect();
        assert_eq!(scan(&bytes, ALL), o);
    }

    #[test]
    fn slice_within_and_across_chunks() {
        let chunks: Vec<Bytes> = [&b"{\"mo"[..], b"del\":\"g", b"pt\"}"]
            .into_iter()
            .map(Bytes::from_static)
            .collect();
        let mut s = Scanner::new(MODEL);
        chunks.iter().for_each(|c| s.feed(c).unwrap());
        s.finish().unwrap();
        let span = s.span(Field::Model).unwrap();
        assert_eq!(span.value, 9..14);
        let across = slice(&chunks, span.value.clone());
        assert!(matches!(across, Cow::Owned(_)));
        assert_eq!(&*across, b"\"gpt\"");
        assert_eq!(serde_json::from_slice::<String>(&across).unwrap(), "gpt");
        let within = slice(&chunks, 4..8);
        assert!(matches!(within, Cow::Borrowed(_)));
        assert_eq!(&*within, b"del\"");
        assert_eq!(&*slice(&chunks, 0..15), br#"{"model":"gpt"}"#);
        assert_eq!(&*slice(&chunks, 3..3), b"");
        assert_eq!(&*slice(&chunks, 13..99), b"\"}");
        assert_eq!(&*slice(&[], 0..4), b"");
    }

    fn hash(bytes: &[u8]) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        h.finish()
    }

    #[test]
    fn splice_keeps_every_other_byte_and_copies_nothing() {
        let msgs = messages(1 << 20);
        let body = format!(r#"{{"messages":{msgs},"model":"gpt-4o","stream":true}}"#);
        let model_at = body.find(r#""gpt-4o""#).unwrap();
        // Chunk edges inside the model's value and elsewhere.
        let cuts = [0, 4096, model_at + 3, model_at + 5, body.len()];
        let chunks: Vec<Bytes> = cuts
            .windows(2)
            .map(|w| Bytes::copy_from_slice(&body.as_bytes()[w[0]..w[1]]))
            .collect();
        let mut s = Scanner::new(MODEL);
        chunks.iter().for_each(|c| s.feed(c).unwrap());
        s.finish().unwrap();
        let range = s.span(Field::Model).unwrap().value.clone();
        assert_eq!(&*slice(&chunks, range.clone()), br#""gpt-4o""#);
        let new = Bytes::from_static(br#""fast-model""#);
        let out = splice(&chunks, range, new.clone());
        let joined: Vec<u8> = out.iter().flat_map(|c| c.iter().copied()).collect();
        let want = body.replacen(r#""gpt-4o""#, r#""fast-model""#, 1);
        assert_eq!(hash(&joined), hash(want.as_bytes()));
        assert_eq!(joined, want.as_bytes());
        // Every piece but the new bytes points into an original chunk.
        for piece in &out {
            let p = piece.as_ptr() as usize;
            let inside = chunks.iter().any(|c| {
                let c0 = c.as_ptr() as usize;
                p >= c0 && p + piece.len() <= c0 + c.len()
            });
            assert!(
                inside || piece.as_ptr() == new.as_ptr(),
                "a copy of {} bytes",
                piece.len()
            );
        }
        // Edges: at the start, at the end, the whole body, nothing.
        let b = Bytes::from_static(b"abcdef");
        let parts = [b.slice(..2), b.slice(2..)];
        let cat = |v: Vec<Bytes>| v.concat();
        assert_eq!(
            cat(splice(&parts, 0..0, Bytes::from_static(b"X"))),
            b"Xabcdef"
        );
        assert_eq!(
            cat(splice(&parts, 6..6, Bytes::from_static(b"X"))),
            b"abcdefX"
        );
        assert_eq!(
            cat(splice(&parts, 2..2, Bytes::from_static(b"X"))),
            b"abXcdef"
        );
        assert_eq!(cat(splice(&parts, 1..4, Bytes::new())), b"aef");
        assert_eq!(cat(splice(&parts, 0..6, Bytes::from_static(b"Y"))), b"Y");
        assert_eq!(
            cat(splice(&parts, 4..99, Bytes::from_static(b"Z"))),
            b"abcdZ"
        );
        assert!(splice(&parts, 0..6, Bytes::new()).is_empty());
    }

    #[test]
    fn errors_stick() {
        let mut s = Scanner::new(ALL);
        s.feed(br#"{"a":1"#).unwrap();
        let e = ScanError::Invalid { at: 6 };
        assert_eq!(s.feed(b"]"), Err(e.clone()));
        assert_eq!(s.feed(b"}"), Err(e.clone()));
        assert_eq!(s.finish(), Err(e));
        let mut s = Scanner::new(ALL);
        s.feed(b"{").unwrap();
        assert_eq!(s.finish(), Err(ScanError::Truncated));
        assert_eq!(s.feed(b"}"), Err(ScanError::Truncated));
    }

    #[test]
    fn fields_set() {
        let f = Fields::empty().with(Field::N).with(Field::Model);
        assert!(f.contains(Field::N) && f.contains(Field::Model) && !f.contains(Field::Stream));
        assert!(Fields::empty().is_empty() && !f.is_empty());
        assert!(Field::ALL.iter().all(|&g| Fields::all().contains(g)));
        assert!(Field::ALL
            .iter()
            .all(|&g| Field::from_key(g.key().as_bytes()) == Some(g)));
        // Nothing watched: has_all from the start; keys are not refused.
        let o = whole(r#"{"model":1,"model":2}"#, Fields::empty());
        assert_eq!(o.result, Ok(()));
        assert!(o.has_all);
    }

    // Differential property tests against serde_json.

    /// The top-level entries as serde_json reads them, in order.
    struct Entries(Vec<(String, Value)>);

    impl<'de> Deserialize<'de> for Entries {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Entries;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                    let mut entries = Vec::new();
                    while let Some(e) = map.next_entry()? {
                        entries.push(e);
                    }
                    Ok(Entries(entries))
                }
            }
            d.deserialize_map(V)
        }
    }

    /// What the scan must answer, when serde_json reads `body` as an object.
    fn oracle(body: &[u8], watched: Fields) -> Option<Result<Vec<(Field, Value)>, ScanError>> {
        let Entries(entries) = serde_json::from_slice(body).ok()?;
        let (mut seen, mut out) = (Fields::empty(), Vec::new());
        for (k, v) in entries {
            if let Some(f) = Field::from_key(k.as_bytes()).filter(|&f| watched.contains(f)) {
                if seen.contains(f) {
                    return Some(Err(ScanError::Duplicate(f)));
                }
                seen = seen.with(f);
                out.push((f, v));
            }
        }
        Some(Ok(out))
    }

    /// `body` fed whole agrees with serde_json, and fed in pieces agrees
    /// with fed whole. `cuts` picks a random multi-chunk split.
    fn check(body: &[u8], watched: Fields, cuts: &[Index]) -> Result<(), TestCaseError> {
        let one = scan(&[body], watched);
        prop_assert_eq!(one.offset, body.len() as u64);
        if let Some(want) = oracle(body, watched) {
            let chunks = [Bytes::copy_from_slice(body)];
            match want {
                Err(e) => prop_assert_eq!(&one.result, &Err(e)),
                Ok(fields) => {
                    prop_assert_eq!(&one.result, &Ok(()), "{:?}", String::from_utf8_lossy(body));
                    prop_assert!(one.done);
                    for f in Field::ALL {
                        let want = fields.iter().find(|(g, _)| *g == f).map(|(_, v)| v);
                        let got = one.spans[f as usize].as_ref();
                        prop_assert_eq!(want.is_some(), got.is_some(), "{:?}", f);
                        if let (Some(want), Some(span)) = (want, got) {
                            let text = slice(&chunks, span.value.clone());
                            let v: Value = serde_json::from_slice(&text).unwrap();
                            prop_assert_eq!(&v, want);
                            prop_assert_eq!(body[span.key_start as usize], b'"');
                        }
                    }
                    prop_assert_eq!(
                        one.has_all,
                        fields.len() == Field::ALL.iter().filter(|&&f| watched.contains(f)).count()
                    );
                    // Every body cut short of its closing brace is refused.
                    let open = body.iter().position(|&b| b == b'{').unwrap();
                    let close = body.iter().rposition(|&b| b == b'}').unwrap();
                    for at in (0..close).filter(|_| body.len() <= 400) {
                        let want = if at <= open {
                            ScanError::Invalid { at: at as u64 }
                        } else {
                            ScanError::Truncated
                        };
                        prop_assert_eq!(
                            scan(&[&body[..at]], watched).result,
                            Err(want),
                            "cut at {}",
                            at
                        );
                    }
                }
            }
        }
        if body.len() <= 400 {
            for at in 0..=body.len() {
                prop_assert_eq!(
                    &scan(&[&body[..at], &body[at..]], watched),
                    &one,
                    "split at {}",
                    at
                );
            }
        }
        if body.len() <= 4096 {
            let bytes: Vec<&[u8]> = body.chunks(1).collect();
            prop_assert_eq!(&scan(&bytes, watched), &one, "byte by byte");
        }
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(body.len() + 1)).collect();
        at.push(0);
        at.push(body.len());
        at.sort_unstable();
        let parts: Vec<&[u8]> = at.windows(2).map(|w| &body[w[0]..w[1]]).collect();
        prop_assert_eq!(&scan(&parts, watched), &one, "cut at {:?}", at);
        Ok(())
    }

    const NAMES: [&str; 6] = [
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "n",
    ];

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z ]{0,12}",
            "\\PC{0,12}",
            "[\"\\\\/{}\\[\\]:,\u{0}-\u{1f}\u{7f}\u{e9}\u{20ac}\u{1f600}a]{0,12}",
            Just(r#""model": "x", "n": 1}"#.to_string()),
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        let near = [
            "models",
            "xmodel",
            "Model",
            "mode",
            "stream_option",
            "stream_options_",
            "max_tokens2",
            "max_completion_token",
            "nn",
            "N",
            "",
            "messages",
            "tools",
            " model",
        ];
        prop_oneof![
            3 => prop::sample::select(NAMES.to_vec()).prop_map(String::from),
            2 => prop::sample::select(near.to_vec()).prop_map(String::from),
            1 => text(),
        ]
    }

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
                .map(Value::Number)),
            text().prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((key(), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// A top-level entry: key, value, and which of the key's characters to
    /// write as `\uXXXX` (bit i % 8 for character i).
    fn entries() -> impl Strategy<Value = Vec<(String, Value, u8)>> {
        prop::collection::vec(
            (key(), json(), prop_oneof![3 => Just(0u8), 1 => any::<u8>()]),
            0..8,
        )
    }

    fn whitespace() -> impl Strategy<Value = Vec<&'static str>> {
        prop::collection::vec(
            prop::sample::select(vec!["", "", " ", "\n", "\t", "\r\n  "]),
            1..12,
        )
    }

    fn write_key(out: &mut String, key: &str, escape: u8) {
        out.push('"');
        for (i, c) in key.chars().enumerate() {
            if c.is_ascii() && escape >> (i % 8) & 1 == 1 {
                out.push_str(&format!("\\u{:04x}", c as u32));
            } else {
                let one = serde_json::to_string(&c.to_string()).unwrap();
                out.push_str(&one[1..one.len() - 1]);
            }
        }
        out.push('"');
    }

    fn write_value(out: &mut String, v: &Value, ws: &mut impl Iterator<Item = &'static str>) {
        match v {
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    out.push_str(if i > 0 { "," } else { "" });
                    out.push_str(ws.next().unwrap());
                    write_value(out, item, ws);
                    out.push_str(ws.next().unwrap());
                }
                out.push(']');
            }
            Value::Object(map) => {
                out.push('{');
                for (i, (k, item)) in map.iter().enumerate() {
                    out.push_str(if i > 0 { "," } else { "" });
                    out.push_str(ws.next().unwrap());
                    write_key(out, k, 0);
                    out.push_str(ws.next().unwrap());
                    out.push(':');
                    out.push_str(ws.next().unwrap());
                    write_value(out, item, ws);
                    out.push_str(ws.next().unwrap());
                }
                out.push('}');
            }
            other => out.push_str(&serde_json::to_string(other).unwrap()),
        }
    }

    /// The body in our own writing: entries in the given order (duplicates
    /// kept), escaped keys, whitespace everywhere JSON allows it.
    fn write_body(entries: &[(String, Value, u8)], ws: &[&'static str]) -> String {
        let mut ws = ws.iter().copied().cycle();
        let mut out = String::new();
        out.push_str(ws.next().unwrap());
        out.push('{');
        for (i, (k, v, escape)) in entries.iter().enumerate() {
            out.push_str(if i > 0 { "," } else { "" });
            out.push_str(ws.next().unwrap());
            write_key(&mut out, k, *escape);
            out.push_str(ws.next().unwrap());
            out.push(':');
            out.push_str(ws.next().unwrap());
            write_value(&mut out, v, &mut ws);
            out.push_str(ws.next().unwrap());
        }
        out.push('}');
        out.push_str(ws.next().unwrap());
        out
    }

    fn unique(mut entries: Vec<(String, Value, u8)>) -> Vec<(String, Value, u8)> {
        let mut seen = std::collections::HashSet::new();
        entries.retain(|(k, _, _)| seen.insert(k.clone()));
        entries
    }

    fn watched() -> impl Strategy<Value = Fields> {
        prop_oneof![
            Just(ALL),
            Just(MODEL),
            any::<u8>().prop_map(|b| Fields(b & ALL.0))
        ]
    }

    /// Cases per property: 256, or `PROPTEST_CASES`.
    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(256),
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn objects_read_as_serde_reads_them(
            entries in entries(),
            ws in whitespace(),
            watched in watched(),
            cuts in prop::collection::vec(any::<Index>(), 0..8),
        ) {
            let entries = unique(entries);
            let ours = write_body(&entries, &ws);
            check(ours.as_bytes(), watched, &cuts)?;
            // serde_json's own writing (keys sorted).
            let map: serde_json::Map<String, Value> =
                entries.into_iter().map(|(k, v, _)| (k, v)).collect();
            let value = Value::Object(map);
            check(&serde_json::to_vec(&value).unwrap(), watched, &cuts)?;
            check(&serde_json::to_vec_pretty(&value).unwrap(), watched, &cuts)?;
        }

        #[test]
        fn a_repeated_watched_key_is_refused(
            entries in entries(),
            which in 0..NAMES.len(),
            (first, second) in (json(), json()),
            (at1, at2) in (any::<Index>(), any::<Index>()),
            escape in any::<u8>(),
            ws in whitespace(),
            cuts in prop::collection::vec(any::<Index>(), 0..8),
        ) {
            let f = Field::ALL[which];
            let mut entries = unique(entries);
            entries.retain(|(k, _, _)| k != f.key());
            let at1 = at1.index(entries.len() + 1);
            entries.insert(at1, (f.key().to_string(), first, 0));
            let at2 = at2.index(entries.len() + 1);
            entries.insert(at2, (f.key().to_string(), second, escape));
            let body = write_body(&entries, &ws);
            prop_assert_eq!(whole(&body, ALL).result, Err(ScanError::Duplicate(f)));
            check(body.as_bytes(), ALL, &cuts)?;
            // Not watched: no refusal.
            let others = Field::ALL.iter().filter(|&&g| g != f).fold(Fields::empty(), |s, &g| s.with(g));
            prop_assert_eq!(whole(&body, others).result, Ok(()));
            check(body.as_bytes(), others, &cuts)?;
        }

        #[test]
        fn mutated_bodies_never_panic_and_agree_when_valid(
            entries in entries(),
            ws in whitespace(),
            edits in prop::collection::vec((any::<Index>(), any::<u8>(), 0..3u8), 1..4),
            watched in watched(),
            cuts in prop::collection::vec(any::<Index>(), 0..8),
        ) {
            let mut body = write_body(&unique(entries), &ws).into_bytes();
            for (at, byte, kind) in edits {
                let i = at.index(body.len() + 1);
                match kind {
                    0 if i < body.len() => body[i] = byte,
                    1 => body.insert(i, byte),
                    _ => body.truncate(i.max(1)),
                }
            }
            check(&body, watched, &cuts)?;
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            brace in any::<bool>(),
            mut body in prop::collection::vec(any::<u8>(), 0..64),
            cuts in prop::collection::vec(any::<Index>(), 0..8),
        ) {
            if brace {
                body.insert(0, b'{');
            }
            check(&body, ALL, &cuts)?;
        }
    }
}
