//! Token usage read from a response as it passes (SPEC §10): OpenAI JSON
//! and SSE, the Responses API's `response.completed`, and Anthropic's
//! `message_start` plus its last `message_delta`.
//!
//! Nothing here parses every chunk. Each frame of an event stream gets one
//! SIMD search for `"usage":`; only an event that names a usage object is
//! parsed (OpenAI's last chunk, Anthropic's first and last events, the
//! Responses API's last). A JSON body keeps a window of its last bytes, and
//! the last `"usage":` object in it is parsed once, at the end. A quote
//! inside a JSON string is escaped (`\"usage\":`), so text in the content
//! never matches; and a matched event is parsed as JSON, so only a real
//! `usage` field counts. A parse failure is only ever a missing figure:
//! the tap reads the bytes, it never changes them.
//!
//! [`Strip`] removes the one chunk sluice caused by asking for usage on
//! the client's behalf (`stream_options.include_usage`), and nothing else.

use bytes::Bytes;
use memchr::memmem;
use serde::Deserialize;

/// Tokens one response used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    /// Input tokens served from the provider's prompt cache.
    pub cached: u64,
    pub reasoning: u64,
}

/// How a response carries its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `text/event-stream`.
    Sse,
    /// One JSON document.
    Json,
}

/// The bytes of a JSON body kept for its usage: the top-level `usage`
/// object comes near the end in every dialect. The Responses API echoes
/// the request's `metadata` (up to about 9 KiB) after it.
const WINDOW: usize = 16 << 10;

/// The longest event kept whole while it arrives in pieces. Past it (a
/// Responses API `response.completed` carries the whole answer) only its
/// last `WINDOW` bytes are kept, where its usage is.
const MAX_EVENT: usize = 256 << 10;

/// Watches one response body's bytes for its usage.
#[derive(Debug)]
pub struct Tap {
    framing: Framing,
    /// SSE: the start of an event whose end has not come yet.
    carry: Vec<u8>,
    /// JSON: the body's last frames, shared (not copied), `WINDOW` bytes
    /// and the frame that reaches past it.
    tail: std::collections::VecDeque<Bytes>,
    tail_len: usize,
    /// The held event grew past `MAX_EVENT`: `carry` keeps its tail only.
    skipping: bool,
    found: Found,
}

/// What the usage events said so far.
#[derive(Debug, Default, Clone, Copy)]
struct Found {
    /// Anthropic's `message_start`: input and cache figures.
    start: Option<Usage>,
    /// The last usage object seen (OpenAI's, the Responses API's,
    /// Anthropic's cumulative `message_delta`).
    last: Option<Usage>,
}

static USAGE_KEY: std::sync::LazyLock<memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memmem::Finder::new(b"\"usage\":"));

impl Tap {
    pub fn new(framing: Framing) -> Self {
        Self {
            framing,
            carry: Vec::new(),
            tail: std::collections::VecDeque::new(),
            tail_len: 0,
            skipping: false,
            found: Found::default(),
        }
    }

    /// The next frame of the body, as it goes to the client.
    pub fn frame(&mut self, data: &Bytes) {
        match self.framing {
            Framing::Sse => self.sse_frame(data),
            Framing::Json => self.json_frame(data),
        }
    }

    /// The body ended (or broke off): the usage, if the response said it.
    pub fn end(mut self) -> Option<Usage> {
        if self.framing == Framing::Json {
            // Most bodies come in one frame: read in place.
            return match self.tail.len() {
                0 => None,
                1 => {
                    let only = &self.tail[0];
                    last_usage_object(&only[only.len().saturating_sub(WINDOW)..])
                }
                _ => {
                    let mut window = Vec::with_capacity(WINDOW.min(self.tail_len));
                    for frame in &self.tail {
                        keep_tail(&mut window, frame, WINDOW);
                    }
                    last_usage_object(&window)
                }
            };
        }
        // A stream that ends without a blank line still ends its event.
        if !self.carry.is_empty() {
            let event = std::mem::take(&mut self.carry);
            self.finish_event(&event);
        }
        match (self.found.start, self.found.last) {
            // Anthropic: input from the start, output (cumulative) from
            // the last delta.
            (Some(start), Some(last)) => Some(Usage {
                output: last.output,
                reasoning: last.reasoning,
                ..start
            }),
            (start, last) => last.or(start),
        }
    }

    fn json_frame(&mut self, data: &Bytes) {
        if data.is_empty() {
            return;
        }
        self.tail.push_back(data.clone());
        self.tail_len += data.len();
        while self
            .tail
            .front()
            .is_some_and(|f| self.tail_len - f.len() >= WINDOW)
        {
            let gone = self.tail.pop_front().expect("a frame");
            self.tail_len -= gone.len();
        }
    }

    fn sse_frame(&mut self, data: &[u8]) {
        let mut rest = data;
        if !self.carry.is_empty() {
            // Finish the event the last frame began: its blank line may
            // straddle the two frames.
            let Some(end) = self.joint_end(rest).or_else(|| event_end(rest)) else {
                self.hold(rest);
                return;
            };
            let (head, tail) = rest.split_at(end);
            rest = tail;
            let mut event = std::mem::take(&mut self.carry);
            event.extend_from_slice(head);
            self.finish_event(&event);
        }
        // The complete events in this frame: only one naming a usage
        // object (not `"usage":null`) is parsed. A frame without one costs
        // one search.
        let complete = last_event_end(rest).unwrap_or(0);
        let (events, partial) = rest.split_at(complete);
        let mut from = 0;
        for at in USAGE_KEY.find_iter(events) {
            if at < from || !object_after(events, at) {
                continue;
            }
            let start = from + event_start(&events[from..at]);
            let end = at + event_end(&events[at..]).unwrap_or(events.len() - at);
            self.event(&events[start..end]);
            from = end;
        }
        self.hold(partial);
    }

    /// Keeps the start of an event that continues in the next frame (its
    /// tail only, once it is past `MAX_EVENT`).
    fn hold(&mut self, part: &[u8]) {
        if !self.skipping && self.carry.len() + part.len() > MAX_EVENT {
            self.skipping = true;
        }
        if self.skipping {
            keep_tail(&mut self.carry, part, WINDOW);
        } else {
            self.carry.extend_from_slice(part);
        }
    }

    /// A held event has ended: parsed whole, or by its tail.
    fn finish_event(&mut self, event: &[u8]) {
        if std::mem::take(&mut self.skipping) {
            if let Some(u) = last_usage_object(event) {
                self.found.last = Some(u);
            }
        } else {
            self.event(event);
        }
    }

    /// Where in `next` the held event ends, when its blank line began in
    /// the held bytes (`\n` | `\n`, or any cut of `\r\n\r\n`).
    fn joint_end(&self, next: &[u8]) -> Option<usize> {
        let held = &self.carry[self.carry.len().saturating_sub(3)..];
        let mut joint = [0u8; 6];
        let n = next.len().min(3);
        joint[..held.len()].copy_from_slice(held);
        joint[held.len()..held.len() + n].copy_from_slice(&next[..n]);
        let joint = &joint[..held.len() + n];
        let end = event_end(joint)?;
        (end > held.len()).then(|| end - held.len())
    }

    /// One whole SSE event: parsed only when it names a usage object.
    fn event(&mut self, event: &[u8]) {
        if !USAGE_KEY.find_iter(event).any(|at| object_after(event, at)) {
            return;
        }
        let data = event_data(event);
        let [own, message, response] = match quick::event(&data) {
            Some(found) => found,
            None => match serde_json::from_slice::<Event>(&data) {
                Ok(e) => [
                    e.usage,
                    e.message.and_then(|m| m.usage),
                    e.response.and_then(|r| r.usage),
                ],
                Err(_) => return,
            },
        };
        if let Some(u) = message {
            // Anthropic's message_start.
            self.found.start = Some(u.figures());
        }
        if let Some(u) = response {
            self.found.last = Some(u.figures());
        }
        if let Some(u) = own {
            self.found.last = Some(u.figures());
        }
    }
}

/// Removes from an OpenAI chat stream the usage-only chunk (`"choices":
/// []` with a `usage` object) that sluice's `include_usage` caused; every
/// other byte goes on unchanged, `[DONE]` included. Only complete events
/// go out: the start of an event waits for its end (an SSE client acts on
/// nothing before the blank line anyway), so the chunk is removed whole
/// even when it arrives in pieces.
#[derive(Debug, Default)]
pub struct Strip {
    /// The start of an event whose end has not come yet.
    carry: Vec<u8>,
    /// The chunk was removed: the rest passes as it comes.
    done: bool,
}

impl Strip {
    /// What of `data` goes to the client now.
    pub fn frame(&mut self, data: Bytes) -> Bytes {
        if self.done && self.carry.is_empty() {
            return data;
        }
        if self.carry.is_empty() {
            let end = last_event_end(&data).unwrap_or(0);
            self.carry.extend_from_slice(&data[end..]);
            return self.events(data.slice(..end));
        }
        // Only the new bytes can end the held event (with the three before
        // them, for a blank line cut in two): no rescan of what is held.
        let from = self.carry.len().saturating_sub(3);
        self.carry.extend_from_slice(&data);
        match last_event_end(&self.carry[from..]).map(|end| from + end) {
            None if self.carry.len() > MAX_EVENT => {
                // No chunk of ours is this long: give it up.
                Bytes::from(std::mem::take(&mut self.carry))
            }
            None => Bytes::new(),
            Some(end) => {
                let rest = self.carry.split_off(end);
                let events = std::mem::replace(&mut self.carry, rest);
                self.events(Bytes::from(events))
            }
        }
    }

    /// Whether it holds the start of an event.
    pub fn holds(&self) -> bool {
        !self.carry.is_empty()
    }

    /// The body ended: what is still held (an event without its blank line).
    pub fn end(&mut self) -> Bytes {
        let held = Bytes::from(std::mem::take(&mut self.carry));
        if !self.done && is_usage_only(&held) {
            self.done = true;
            return Bytes::new();
        }
        held
    }

    /// Complete events, less the usage-only chunk if it is among them.
    fn events(&mut self, events: Bytes) -> Bytes {
        if self.done {
            return events;
        }
        for at in USAGE_KEY.find_iter(&events) {
            if !object_after(&events, at) {
                continue;
            }
            let start = event_start(&events[..at]);
            let end = at + event_end(&events[at..]).unwrap_or(events.len() - at);
            if is_usage_only(&events[start..end]) {
                self.done = true;
                if start == 0 {
                    return events.slice(end..);
                }
                if end == events.len() {
                    return events.slice(..start);
                }
                let mut out = Vec::with_capacity(events.len() - (end - start));
                out.extend_from_slice(&events[..start]);
                out.extend_from_slice(&events[end..]);
                return Bytes::from(out);
            }
        }
        events
    }
}

/// Whether `event` is a chat chunk with no choices and a usage object.
fn is_usage_only(event: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Chunk {
        choices: Option<Vec<serde::de::IgnoredAny>>,
        usage: Option<serde::de::IgnoredAny>,
    }
    let data = event_data(event);
    serde_json::from_slice::<Chunk>(&data)
        .is_ok_and(|c| c.choices.is_some_and(|c| c.is_empty()) && c.usage.is_some())
}

/// An event's data lines, joined as SSE joins them.
fn event_data(event: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    use std::borrow::Cow;
    let mut data: Option<Cow<'_, [u8]>> = None;
    let mut from = 0;
    let ends = memchr::memchr_iter(b'\n', event).chain(std::iter::once(event.len()));
    for end in ends {
        let line = &event[from..end];
        from = (end + 1).min(event.len());
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(v) = line.strip_prefix(b"data:") {
            let v = v.strip_prefix(b" ").unwrap_or(v);
            // One data line (nearly every event) is borrowed, not copied.
            match &mut data {
                None => data = Some(Cow::Borrowed(v)),
                Some(d) => {
                    let d = d.to_mut();
                    d.push(b'\n');
                    d.extend_from_slice(v);
                }
            }
        }
    }
    data.unwrap_or_default()
}

/// Where the event that `before` ends in begins: after the last blank line.
fn event_start(before: &[u8]) -> usize {
    last_event_end(before).unwrap_or(0)
}

/// Whether the `\n` at `i` ends a blank line: `\n\n`, or `\n\r\n` (which
/// `\r\n\r\n` ends with).
fn blank_line_at(buf: &[u8], i: usize) -> bool {
    (i >= 1 && buf[i - 1] == b'\n') || (i >= 2 && buf[i - 1] == b'\r' && buf[i - 2] == b'\n')
}

/// The end of the first event in `buf`, past its blank line. (One memchr
/// pass over the line feeds: a memmem searcher built per call costs more
/// than the search on a chunk-sized frame.)
fn event_end(buf: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', buf)
        .find(|&i| blank_line_at(buf, i))
        .map(|i| i + 1)
}

/// The end of the last complete event in `buf`, past its blank line.
fn last_event_end(buf: &[u8]) -> Option<usize> {
    memchr::memrchr_iter(b'\n', buf)
        .find(|&i| blank_line_at(buf, i))
        .map(|i| i + 1)
}

/// Whether the `"usage":` at `at` is followed by an object.
fn object_after(buf: &[u8], at: usize) -> bool {
    buf[at + USAGE_KEY.needle().len()..]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{')
}

/// The last `"usage":{...}` object in `window` (the tail of a JSON body or
/// of a long event) that reads as usage: a client's `metadata` echoed
/// after it may name `usage` too, but only with a string value.
fn last_usage_object(window: &[u8]) -> Option<Usage> {
    // The forward searcher is the vectorised one; a window names usage a
    // few times at most (the last few are kept, newest last).
    let mut found = [0usize; 8];
    let mut n = 0;
    for at in USAGE_KEY.find_iter(window) {
        if n == found.len() {
            found.copy_within(1.., 0);
            n -= 1;
        }
        found[n] = at;
        n += 1;
    }
    found[..n].iter().rev().find_map(|&at| {
        if !object_after(window, at) {
            return None;
        }
        let value = &window[at + USAGE_KEY.needle().len()..];
        if let Some(u) = quick::usage(value) {
            return Some(u.figures());
        }
        let mut values = serde_json::Deserializer::from_slice(value).into_iter::<Reported>();
        values.next()?.ok().map(Reported::figures)
    })
}

/// A usage object read in one pass without serde, for the common shape:
/// keys without escapes, numbers, `*_details` objects of numbers, and
/// other values skipped. Anything else (an escape in a key, a number that
/// is not a plain integer, broken JSON) is `None`, and serde reads it.
/// Parsing a whole response's usage with serde's derive cost about as much
/// as proxying the rest of the request.
mod quick {
    use super::{Details, Reported};

    pub fn usage(v: &[u8]) -> Option<Reported> {
        Reader { b: v, i: 0 }.usage()
    }

    /// The usage objects of one SSE event's data, as [`super::Event`]
    /// reads them: its own, its `message`'s and its `response`'s.
    pub fn event(v: &[u8]) -> Option<[Option<Reported>; 3]> {
        let mut r = Reader { b: v, i: 0 };
        let [mut own, mut message, mut response] = [None, None, None];
        r.object(|r, key| match key {
            b"usage" => r.maybe_usage(&mut own),
            b"message" => r.wrapped(&mut message),
            b"response" => r.wrapped(&mut response),
            _ => r.skip(),
        })?;
        Some([own, message, response])
    }

    struct Reader<'a> {
        b: &'a [u8],
        i: usize,
    }

    impl Reader<'_> {
        fn usage(&mut self) -> Option<Reported> {
            let mut u = Reported::default();
            self.object(|r, key| {
                let slot = match key {
                    b"prompt_tokens" => &mut u.prompt_tokens,
                    b"input_tokens" => &mut u.input_tokens,
                    b"completion_tokens" => &mut u.completion_tokens,
                    b"output_tokens" => &mut u.output_tokens,
                    b"cache_read_input_tokens" => &mut u.cache_read_input_tokens,
                    b"prompt_tokens_details" => return r.details(&mut u.prompt_tokens_details),
                    b"input_tokens_details" => return r.details(&mut u.input_tokens_details),
                    b"completion_tokens_details" => {
                        return r.details(&mut u.completion_tokens_details)
                    }
                    b"output_tokens_details" => return r.details(&mut u.output_tokens_details),
                    _ => return r.skip(),
                };
                *slot = r.number()?;
                Some(())
            })?;
            Some(u)
        }

        /// A usage object or null (anything else: not ours to read).
        fn maybe_usage(&mut self, slot: &mut Option<Reported>) -> Option<()> {
            if !self.null() {
                *slot = Some(self.usage()?);
            }
            Some(())
        }

        /// An object whose `usage` is read (`message`, `response`), or any
        /// other value passed over.
        fn wrapped(&mut self, slot: &mut Option<Reported>) -> Option<()> {
            if self.peek()? != b'{' {
                return self.skip();
            }
            self.object(|r, key| match key {
                b"usage" => r.maybe_usage(slot),
                _ => r.skip(),
            })
        }

        fn peek(&mut self) -> Option<u8> {
            while let Some(&c) = self.b.get(self.i) {
                if !matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
                    return Some(c);
                }
                self.i += 1;
            }
            None
        }

        fn eat(&mut self, c: u8) -> Option<()> {
            (self.peek()? == c).then(|| self.i += 1)
        }

        /// `{ "key": value, ... }`, each value read by `f`.
        fn object(&mut self, mut f: impl FnMut(&mut Self, &[u8]) -> Option<()>) -> Option<()> {
            self.eat(b'{')?;
            if self.eat(b'}').is_some() {
                return Some(());
            }
            loop {
                self.eat(b'"')?;
                let len = memchr::memchr2(b'"', b'\\', self.b.get(self.i..)?)?;
                let start = self.i;
                self.i += len;
                self.eat(b'"')?;
                let key = &self.b[start..start + len];
                self.eat(b':')?;
                f(self, key)?;
                match self.peek()? {
                    b',' => self.i += 1,
                    b'}' => {
                        self.i += 1;
                        return Some(());
                    }
                    _ => return None,
                }
            }
        }

        fn details(&mut self, slot: &mut Option<Details>) -> Option<()> {
            if self.null() {
                return Some(());
            }
            let mut d = Details::default();
            self.object(|r, key| {
                let slot = match key {
                    b"cached_tokens" => &mut d.cached_tokens,
                    b"reasoning_tokens" => &mut d.reasoning_tokens,
                    _ => return r.skip(),
                };
                *slot = r.number()?;
                Some(())
            })?;
            *slot = Some(d);
            Some(())
        }

        fn null(&mut self) -> bool {
            let null = self.peek() == Some(b'n') && self.b[self.i..].starts_with(b"null");
            if null {
                self.i += 4;
            }
            null
        }

        /// A plain non-negative integer, or null.
        fn number(&mut self) -> Option<Option<u64>> {
            if self.null() {
                return Some(None);
            }
            self.peek()?;
            let start = self.i;
            let mut n: u64 = 0;
            while let Some(&c) = self.b.get(self.i) {
                if !c.is_ascii_digit() {
                    break;
                }
                n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
                self.i += 1;
            }
            if self.i == start || matches!(self.b.get(self.i), Some(b'.' | b'e' | b'E')) {
                return None;
            }
            Some(Some(n))
        }

        /// Any value, passed over.
        fn skip(&mut self) -> Option<()> {
            let mut depth = 0usize;
            loop {
                match self.peek()? {
                    b'"' => {
                        self.i += 1;
                        loop {
                            // Past the end after an escape at the end: None.
                            let at = memchr::memchr2(b'"', b'\\', self.b.get(self.i..)?)?;
                            self.i += at + 1;
                            if self.b[self.i - 1] == b'"' {
                                break;
                            }
                            // An escape: its next byte is never the end.
                            self.i += 1;
                        }
                    }
                    b'{' | b'[' => {
                        depth += 1;
                        self.i += 1;
                    }
                    b'}' | b']' if depth > 0 => {
                        depth -= 1;
                        self.i += 1;
                    }
                    b':' | b',' if depth > 0 => self.i += 1,
                    // No value at all.
                    b',' | b'}' | b']' | b':' => return None,
                    _ => {
                        // A scalar: up to the next delimiter.
                        let rest = &self.b[self.i..];
                        let n = rest
                            .iter()
                            .position(|c| {
                                matches!(
                                    c,
                                    b',' | b'}' | b']' | b':' | b' ' | b'\t' | b'\n' | b'\r'
                                )
                            })
                            .unwrap_or(rest.len());
                        if n == 0 {
                            return None;
                        }
                        self.i += n;
                    }
                }
                if depth == 0 && matches!(self.peek()?, b',' | b'}' | b']') {
                    return Some(());
                }
            }
        }
    }
}

/// Appends `data` to `buf`, keeping only its last `cap` bytes.
fn keep_tail(buf: &mut Vec<u8>, data: &[u8], cap: usize) {
    if data.len() >= cap {
        buf.clear();
        buf.extend_from_slice(&data[data.len() - cap..]);
        return;
    }
    let keep = cap - data.len();
    if buf.len() > keep {
        buf.drain(..buf.len() - keep);
    }
    buf.extend_from_slice(data);
}

/// The parts of an event that carry usage.
#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    usage: Option<Reported>,
    /// Anthropic's `message_start`.
    #[serde(default)]
    message: Option<Wrapped>,
    /// The Responses API's `response.completed`.
    #[serde(default)]
    response: Option<Wrapped>,
}

#[derive(Deserialize)]
struct Wrapped {
    #[serde(default)]
    usage: Option<Reported>,
}

/// A usage object in any dialect: OpenAI chat (`prompt_tokens`,
/// `completion_tokens`), the Responses API (`input_tokens`,
/// `output_tokens`), Anthropic (`input_tokens`, `output_tokens`,
/// `cache_read_input_tokens`). Both spellings are read, and the chat one
/// wins where a server sends both.
#[derive(Deserialize, Default, Debug, PartialEq)]
struct Reported {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    #[serde(default)]
    input_tokens_details: Option<Details>,
    #[serde(default)]
    completion_tokens_details: Option<Details>,
    #[serde(default)]
    output_tokens_details: Option<Details>,
}

#[derive(Deserialize, Default, Debug, PartialEq)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl Reported {
    fn figures(self) -> Usage {
        let details = |a: &Option<Details>, b: &Option<Details>, f: fn(&Details) -> Option<u64>| {
            a.as_ref().and_then(f).or_else(|| b.as_ref().and_then(f))
        };
        Usage {
            input: self.prompt_tokens.or(self.input_tokens).unwrap_or(0),
            output: self.completion_tokens.or(self.output_tokens).unwrap_or(0),
            cached: self
                .cache_read_input_tokens
                .or_else(|| {
                    details(
                        &self.prompt_tokens_details,
                        &self.input_tokens_details,
                        |d| d.cached_tokens,
                    )
                })
                .unwrap_or(0),
            reasoning: details(
                &self.completion_tokens_details,
                &self.output_tokens_details,
                |d| d.reasoning_tokens,
            )
            .unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` to a tap in frames cut at `cuts`.
    fn tap(framing: Framing, body: &str, cuts: &[usize]) -> Option<Usage> {
        let mut t = Tap::new(framing);
        let mut from = 0;
        for &c in cuts.iter().chain(std::iter::once(&body.len())) {
            t.frame(&Bytes::copy_from_slice(&body.as_bytes()[from..c]));
            from = c;
        }
        t.end()
    }

    /// Every way of cutting `body` in two and in three (with a stride).
    fn every_split(framing: Framing, body: &str) -> Vec<Option<Usage>> {
        let mut out = vec![tap(framing, body, &[])];
        for a in 0..=body.len() {
            out.push(tap(framing, body, &[a]));
            for b in (a..=body.len()).step_by(7) {
                out.push(tap(framing, body, &[a, b]));
            }
        }
        out
    }

    /// Asserts `want` however `body` is cut.
    fn at_every_split(framing: Framing, body: &str, want: Option<Usage>) {
        for got in every_split(framing, body) {
            assert_eq!(got, want);
        }
    }

    const OPENAI_SSE: &str = concat!(
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"say \\\"usage\\\":{\\\"prompt_tokens\\\":999}\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":34,\"total_tokens\":46,",
        "\"prompt_tokens_details\":{\"cached_tokens\":8},\"completion_tokens_details\":{\"reasoning_tokens\":5}}}\n\n",
        "data: [DONE]\n\n"
    );

    #[test]
    fn openai_sse_usage_comes_from_the_last_usage_event_at_every_split() {
        let want = Usage {
            input: 12,
            output: 34,
            cached: 8,
            reasoning: 5,
        };
        at_every_split(Framing::Sse, OPENAI_SSE, Some(want));
    }

    #[test]
    fn crlf_events_split_anywhere_still_count() {
        let body = OPENAI_SSE.replace('\n', "\r\n");
        for got in every_split(Framing::Sse, &body) {
            assert_eq!(got.map(|u| (u.input, u.output)), Some((12, 34)));
        }
    }

    #[test]
    fn text_that_looks_like_usage_inside_content_never_counts() {
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"\\\"usage\\\":{\\\"prompt_tokens\\\":7}\"}}]}\n\ndata: [DONE]\n\n";
        at_every_split(Framing::Sse, body, None);
        let json = r#"{"choices":[{"message":{"content":"\"usage\":{\"prompt_tokens\":7}"}}]}"#;
        at_every_split(Framing::Json, json, None);
    }

    #[test]
    fn anthropic_output_is_the_last_delta_not_the_sum() {
        let body = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":20,\"cache_read_input_tokens\":4,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":null},\"usage\":{\"output_tokens\":5}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":12}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
        );
        let want = Usage {
            input: 20,
            output: 12,
            cached: 4,
            reasoning: 0,
        };
        at_every_split(Framing::Sse, body, Some(want));
    }

    #[test]
    fn the_responses_api_reports_in_response_completed() {
        let body = concat!(
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"usage\":null}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"hi\"}]}],",
            "\"usage\":{\"input_tokens\":9,\"input_tokens_details\":{\"cached_tokens\":2},\"output_tokens\":3,\"output_tokens_details\":{\"reasoning_tokens\":1},\"total_tokens\":12}}}\n\n"
        );
        let want = Usage {
            input: 9,
            output: 3,
            cached: 2,
            reasoning: 1,
        };
        at_every_split(Framing::Sse, body, Some(want));
    }

    #[test]
    fn a_malformed_event_is_passed_over_and_a_stream_without_done_still_counts() {
        let body = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"prompt_tokens\":\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}"
        );
        let want = Usage {
            input: 3,
            output: 4,
            ..Usage::default()
        };
        at_every_split(Framing::Sse, body, Some(want));
    }

    #[test]
    fn a_json_body_reports_its_top_level_usage_even_after_a_large_answer() {
        let big = "x".repeat(100_000);
        let body = format!(
            r#"{{"object":"list","data":[{{"embedding":"{big}","usage":{{"prompt_tokens":1}}}}],"model":"m","usage":{{"prompt_tokens":21,"total_tokens":21}}}}"#
        );
        let want = Some(Usage {
            input: 21,
            ..Usage::default()
        });
        assert_eq!(tap(Framing::Json, &body, &[]), want);
        for cut in [1, 5000, body.len() - 40, body.len() - 1] {
            assert_eq!(tap(Framing::Json, &body, &[cut]), want, "{cut}");
        }
        let anthropic = r#"{"id":"m","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":5,"cache_read_input_tokens":1,"output_tokens":2}}"#;
        let want = Usage {
            input: 5,
            output: 2,
            cached: 1,
            reasoning: 0,
        };
        at_every_split(Framing::Json, anthropic, Some(want));
    }

    #[test]
    fn a_stream_without_usage_reports_none_and_holds_nothing_between_events() {
        let mut t = Tap::new(Framing::Sse);
        for _ in 0..1000 {
            t.frame(&Bytes::from_static(
                b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
            ));
            assert!(t.carry.is_empty());
        }
        assert_eq!(t.end(), None);
    }

    /// A tap holding a response.completed longer than MAX_EVENT, up to
    /// the first half of its blank line.
    fn long_event() -> Tap {
        let mut t = Tap::new(Framing::Sse);
        t.frame(&Bytes::from_static(
            b"data: {\"type\":\"response.completed\",\"response\":{\"output\":\"",
        ));
        for _ in 0..(MAX_EVENT / 1024 + 1) {
            t.frame(&Bytes::from_static(&[b'y'; 1024]));
            assert!(t.carry.len() <= MAX_EVENT);
        }
        assert!(t.skipping && t.carry.len() <= WINDOW);
        t.frame(&Bytes::from_static(b"\",\"usage\":{\"input_tokens\":7,\"output_tokens\":3},\"metadata\":{\"usage\":\"x\"}}}\n"));
        t
    }

    #[test]
    fn a_long_event_keeps_its_tail_and_its_usage_there_counts() {
        let mut t = long_event();
        t.frame(&Bytes::from_static(b"\n"));
        let want = Usage {
            input: 7,
            output: 3,
            ..Usage::default()
        };
        assert_eq!(t.end(), Some(want));
        // A later usage event, after a blank line cut across frames.
        let mut t = long_event();
        t.frame(&Bytes::from_static(
            b"\ndata: {\"usage\":{\"prompt_tokens\":2}}\n\n",
        ));
        assert_eq!(
            t.end(),
            Some(Usage {
                input: 2,
                ..Usage::default()
            })
        );
    }

    #[test]
    fn echoed_metadata_after_usage_does_not_hide_it() {
        let meta: String = (0..16)
            .map(|i| format!(r#""k{i}":"{}""#, "v".repeat(500)))
            .collect::<Vec<_>>()
            .join(",");
        let body = format!(
            r#"{{"id":"r","output":[],"usage":{{"input_tokens":4,"output_tokens":6}},"metadata":{{"usage":"x",{meta}}}}}"#
        );
        let want = Some(Usage {
            input: 4,
            output: 6,
            ..Usage::default()
        });
        assert_eq!(tap(Framing::Json, &body, &[]), want);
        assert_eq!(tap(Framing::Json, &body, &[100, 5000]), want);
    }

    #[test]
    fn a_server_that_sends_both_spellings_still_counts() {
        let body = r#"{"usage":{"prompt_tokens":1,"input_tokens":1,"completion_tokens":2,"output_tokens":2,"prompt_tokens_details":{"cached_tokens":1},"input_tokens_details":{"cached_tokens":1}}}"#;
        assert_eq!(
            tap(Framing::Json, body, &[]),
            Some(Usage {
                input: 1,
                output: 2,
                cached: 1,
                reasoning: 0
            })
        );
    }

    /// Runs `body` through a strip in frames cut at `cuts`.
    fn strip(body: &str, cuts: &[usize]) -> String {
        let mut s = Strip::default();
        let mut out = Vec::new();
        let mut from = 0;
        for &c in cuts.iter().chain(std::iter::once(&body.len())) {
            out.extend_from_slice(&s.frame(Bytes::copy_from_slice(&body.as_bytes()[from..c])));
            from = c;
        }
        out.extend_from_slice(&s.end());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strip_removes_exactly_the_usage_only_chunk_at_every_split() {
        let usage_chunk = "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":34,\"total_tokens\":46,\"prompt_tokens_details\":{\"cached_tokens\":8},\"completion_tokens_details\":{\"reasoning_tokens\":5}}}\n\n";
        assert!(OPENAI_SSE.contains(usage_chunk));
        let want = OPENAI_SSE.replace(usage_chunk, "");
        assert!(want.ends_with("data: [DONE]\n\n"));
        for a in 0..=OPENAI_SSE.len() {
            assert_eq!(strip(OPENAI_SSE, &[a]), want, "cut at {a}");
            for b in (a..=OPENAI_SSE.len()).step_by(5) {
                assert_eq!(strip(OPENAI_SSE, &[a, b]), want, "cut at {a}, {b}");
            }
        }
        // CRLF events, and a stream that ends without its blank line.
        let crlf = OPENAI_SSE.replace("\n", "\r\n");
        let crlf_want = want.replace("\n", "\r\n");
        for a in 0..=crlf.len() {
            assert_eq!(strip(&crlf, &[a]), crlf_want, "cut at {a}");
        }
        let last = "data: {\"choices\":[{\"delta\":{}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}";
        assert_eq!(
            strip(last, &[10]),
            "data: {\"choices\":[{\"delta\":{}}]}\n\n"
        );
    }

    #[test]
    fn strip_leaves_every_other_chunk_alone() {
        // Usage on a chunk that has choices (continuous usage), a second
        // usage-only chunk after the first, look-alikes in content, a
        // malformed event, comments: all pass byte for byte.
        let body = concat!(
            ": comment\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"\\\"choices\\\":[],\\\"usage\\\":{}\"}}],\"usage\":{\"prompt_tokens\":1}}\n\n",
            "data: {\"choices\":[], \"usage\": {broken\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2}}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3}}\n\n",
            "data: [DONE]\n\n",
        );
        let once = body.replace(
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2}}\n\n",
            "",
        );
        for a in 0..=body.len() {
            assert_eq!(strip(body, &[a]), once, "cut at {a}");
        }
        // Nothing to remove: the stream is unchanged and the frames after
        // the removal are passed as they come.
        let plain = "data: {\"choices\":[{\"delta\":{}}]}\n\ndata: [DONE]\n\n";
        assert_eq!(strip(plain, &[3, 40]), plain);
    }

    #[test]
    fn the_quick_reader_agrees_with_serde_or_steps_aside() {
        let cases = [
            r#"{"prompt_tokens":24,"completion_tokens":58,"total_tokens":82,"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":5,"accepted_prediction_tokens":0}}"#,
            r#"{ "input_tokens" : 7 , "output_tokens":3,"cache_read_input_tokens":2,"cache_creation":{"ephemeral_5m_input_tokens":0,"x":[1,{"a":"}]\"\\"}]},"service_tier":"standard","server_tool_use":null}"#,
            r#"{"prompt_tokens":1,"prompt_tokens_details":null,"input_tokens_details":{"cached_tokens":null}}"#,
            r#"{}"#,
            r#"{"input_tokens":5,"output_tokens_details":{"reasoning_tokens":2},"extra":[[],{},"",true,false,-1.5e3]}"#,
        ];
        for c in cases {
            let quick = quick::usage(c.as_bytes()).unwrap_or_else(|| panic!("quick: {c}"));
            let serde: Reported = serde_json::from_str(c).unwrap();
            assert_eq!(quick, serde, "{c}");
        }
        // What it does not read, serde does: escaped keys, fractions, broken JSON.
        for c in [
            r#"{"prompt\u005ftokens":3}"#,
            r#"{"prompt_tokens":3.0}"#,
            r#"{"prompt_tokens":3"#,
            r#"{"prompt_tokens":}"#,
            r#"{"a":"unterminated}"#,
        ] {
            assert_eq!(quick::usage(c.as_bytes()), None, "{c}");
        }
        let body = r#"{"usage":{"prompt\u005ftokens":3,"completion_tokens":1}}"#;
        assert_eq!(
            tap(Framing::Json, body, &[]),
            Some(Usage {
                input: 3,
                output: 1,
                ..Usage::default()
            })
        );
    }

    #[test]
    fn no_cut_of_a_usage_object_panics_or_counts_wrong() {
        let whole = r#"{"usage":{"prompt_tokens":5,"note":"a\"b\\","x":[{"y":"\u0022"}],"completion_tokens":2}}"#;
        assert_eq!(
            tap(Framing::Json, whole, &[]),
            Some(Usage {
                input: 5,
                output: 2,
                ..Usage::default()
            })
        );
        for end in 0..whole.len() {
            let cut = &whole[..end];
            let _ = quick::usage(cut.as_bytes());
            let _ = tap(Framing::Json, cut, &[]);
            let _ = tap(Framing::Sse, &format!("data: {cut}"), &[]);
        }
        assert_eq!(quick::usage(br#"{"a":"\"#), None);
    }

    #[test]
    fn the_quick_event_reader_agrees_with_serde() {
        let events = [
            r#"{"id":"c","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34}}"#,
            r#"{"id":"c","choices":[{"delta":{"content":"x"}}],"usage":null}"#,
            r#"{"type":"message_start","message":{"id":"m","content":[],"usage":{"input_tokens":20,"output_tokens":1,"cache_read_input_tokens":4}}}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":null},"usage":{"output_tokens":12}}"#,
            r#"{"type":"response.completed","response":{"id":"r","output":[{"content":[{"text":"\"usage\":{}"}]}],"usage":{"input_tokens":4,"output_tokens":6,"output_tokens_details":{"reasoning_tokens":2}}}}"#,
        ];
        for e in events {
            let quick = quick::event(e.as_bytes()).unwrap_or_else(|| panic!("quick: {e}"));
            let serde: Event = serde_json::from_str(e).unwrap();
            let serde = [
                serde.usage,
                serde.message.and_then(|m| m.usage),
                serde.response.and_then(|r| r.usage),
            ];
            assert_eq!(quick, serde, "{e}");
        }
        // Where serde refuses the event (a string where it wants an
        // object), the quick reader finds no usage either.
        let odd = br#"{"type":"x","message":"a string","response":null}"#;
        assert_eq!(quick::event(odd), Some([None, None, None]));
    }
}
