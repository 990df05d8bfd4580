//! Token accounting for one request (SPEC §10). Before the attempts: what
//! the body says (`stream`, `stream_options`, the output cap, `n`, images),
//! read by the body scanner without a JSON tree; the estimate a token
//! limit charges; the `include_usage` edit. After the response: the usage
//! it reported settles the charges both ways and feeds the metrics and the
//! access line.

use std::ops::Range;

use bytes::Bytes;
use memchr::memmem;

use super::build::RouteState;
use crate::config::{Estimate, TokenCount};
use crate::scan::{self, Field, Fields, Scanner};
use crate::tokens::Charge;
use crate::usage::Usage;

/// The fields read when a route counts or asks for usage.
pub const FIELDS: Fields = Fields::empty()
    .with(Field::Stream)
    .with(Field::StreamOptions)
    .with(Field::MaxTokens)
    .with(Field::MaxCompletionTokens)
    .with(Field::MaxOutputTokens)
    .with(Field::N);

/// What a whole JSON body says, as far as tokens go.
#[derive(Debug, Default)]
pub struct Facts {
    /// `"stream": true`.
    pub stream: bool,
    /// The client set `stream_options.include_usage = true` itself.
    pub asked: bool,
    /// The edit that asks for usage: the `stream_options` value replaced,
    /// or one inserted before `stream` (an empty range).
    pub ask: Option<(Range<u64>, Bytes)>,
    /// `max_completion_tokens`, else `max_tokens`, else `max_output_tokens`.
    pub max_output: Option<u64>,
    pub n: Option<u64>,
    /// `data:` URIs, and their bytes (not counted as text).
    pub images: u64,
    pub image_bytes: u64,
}

static DATA_URI: std::sync::LazyLock<memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memmem::Finder::new(b"\"data:"));

/// What one insertion asks for when the body has no `stream_options`.
const ASK: &[u8] = br#""stream_options":{"include_usage":true},"#;

impl Facts {
    /// Reads what `scanner` found in `held` (the whole body).
    pub fn read(scanner: &Scanner, held: &[Bytes]) -> Self {
        let value = |f: Field| scanner.span(f).map(|s| scan::slice(held, s.value.clone()));
        let number = |f: Field| value(f).and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok());
        let stream = value(Field::Stream).is_some_and(|v| *v == *b"true");
        let mut facts = Facts {
            stream,
            max_output: number(Field::MaxCompletionTokens)
                .or_else(|| number(Field::MaxTokens))
                .or_else(|| number(Field::MaxOutputTokens)),
            n: number(Field::N),
            ..Facts::default()
        };
        for chunk in held {
            for at in DATA_URI.find_iter(chunk) {
                let rest = &chunk[at + 1..];
                // `data:` then a media type (`image/png`): a URI, not text.
                let kind = rest[5..]
                    .iter()
                    .take_while(|c| c.is_ascii_alphabetic())
                    .count();
                if kind == 0 || rest.get(5 + kind) != Some(&b'/') {
                    continue;
                }
                facts.images += 1;
                facts.image_bytes += memchr::memchr(b'"', rest).unwrap_or(rest.len()) as u64;
            }
        }
        if !stream {
            return facts;
        }
        match scanner.span(Field::StreamOptions) {
            None => {
                let at = scanner.span(Field::Stream).map_or(0, |s| s.key_start);
                facts.ask = Some((at..at, Bytes::from_static(ASK)));
            }
            Some(span) => {
                let raw = scan::slice(held, span.value.clone());
                type Options = Option<serde_json::Map<String, serde_json::Value>>;
                // Not an object (nor null): the upstream answers for it.
                if let Ok(options) = serde_json::from_slice::<Options>(&raw) {
                    let mut options = options.unwrap_or_default();
                    facts.asked = options.get("include_usage") == Some(&true.into());
                    if !facts.asked {
                        options.insert("include_usage".into(), true.into());
                        let with = serde_json::to_vec(&options).expect("serialises");
                        facts.ask = Some((span.value.clone(), Bytes::from(with)));
                    }
                }
            }
        }
        facts
    }
}

/// A request's tokens as estimated at admission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Estimated {
    pub input: u64,
    pub output: u64,
}

impl Estimated {
    /// Input from the body's bytes (images apart), output from its cap
    /// times `n`.
    pub fn new(body_len: u64, facts: Option<&Facts>, e: &Estimate) -> Self {
        let (images, image_bytes, cap, n) = facts.map_or((0, 0, None, None), |f| {
            (f.images, f.image_bytes, f.max_output, f.n)
        });
        let text = body_len.saturating_sub(image_bytes) as f64;
        // Saturating: a client's max_tokens of 2^64-1 is a large charge,
        // never a wrapped small one. (A float cast saturates too.)
        let images = images.saturating_mul(e.image_tokens);
        Self {
            input: ((text / e.chars_per_token).ceil() as u64).saturating_add(images),
            output: cap
                .unwrap_or(e.default_output_tokens)
                .saturating_mul(n.unwrap_or(1).max(1)),
        }
    }

    /// What a limit counting `count` charges.
    pub fn counted(&self, count: TokenCount) -> u64 {
        match count {
            TokenCount::Total => self.input.saturating_add(self.output),
            TokenCount::Input => self.input,
            TokenCount::Output => self.output,
        }
    }
}

fn counted(u: &Usage, count: TokenCount) -> u64 {
    match count {
        TokenCount::Total => u.input.saturating_add(u.output),
        TokenCount::Input => u.input,
        TokenCount::Output => u.output,
    }
}

/// Where a request's usage came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Reported,
    Estimated,
    None,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reported => "reported",
            Self::Estimated => "estimated",
            Self::None => "none",
        }
    }
}

/// A request's charges (boxed in the context: a route without a token
/// limit or `tpm` carries one pointer).
#[derive(Debug, Default)]
pub struct Tokens {
    /// Charged at admission.
    pub estimate: Option<Estimated>,
    /// The route's token limit.
    pub route: Option<Charge>,
    /// The answering deployment's `tpm`.
    pub deployment: Option<Charge>,
}

/// Whether a response's body was read for usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Watched {
    /// Not a 2xx JSON or SSE body, or the route does not observe.
    #[default]
    No,
    Yes,
    /// A compressed body: not read.
    Compressed,
}

/// How the request ended, as settling sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A 2xx whose body ended whole.
    Complete,
    /// A 2xx cut after its headers went out.
    Cut,
    /// No response, or not a 2xx.
    Failed,
}

impl Tokens {
    /// Settles the charges and says what the request used, and from where.
    /// A reported usage settles both ways; a 2xx without one keeps the
    /// estimate; anything else refunds it all.
    pub fn settle(
        &mut self,
        ending: Ending,
        count: Option<TokenCount>,
        usage: Option<Usage>,
        now: tokio::time::Instant,
    ) -> (Option<Usage>, Source) {
        let usage = usage.filter(|_| ending != Ending::Failed);
        let count = count.unwrap_or(TokenCount::Total);
        // A deployment's `tpm` counts every token.
        let charges = [
            self.route.take().map(|c| (c, count)),
            self.deployment.take().map(|c| (c, TokenCount::Total)),
        ];
        for (charge, count) in charges.into_iter().flatten() {
            match (ending, &usage) {
                (_, Some(u)) => charge.settle_at(counted(u, count), now),
                (Ending::Failed, None) => charge.settle_at(0, now),
                // The estimate stands.
                _ => {}
            }
        }
        match (usage, self.estimate) {
            (Some(u), _) => (Some(u), Source::Reported),
            (None, Some(e)) if ending != Ending::Failed => (
                Some(Usage {
                    input: e.input,
                    output: e.output,
                    ..Usage::default()
                }),
                Source::Estimated,
            ),
            _ => (None, Source::None),
        }
    }
}

/// Whether `path` is a chat completion's (where `stream_options` exists).
pub fn is_chat(path: &str) -> bool {
    path.ends_with("/chat/completions")
}

/// The route's figures at the end of a request: tokens by type, a missing
/// usage, the estimate's ratio. `backend` answered.
pub fn record(
    route: &RouteState,
    backend: usize,
    estimate: Option<Estimated>,
    usage: Option<&Usage>,
    source: Source,
    missing: Option<&'static str>,
) {
    let m = &route.backends.get(backend).metrics;
    // Only what an upstream reported: an estimate is not a count.
    if let (Source::Reported, Some(u)) = (source, usage) {
        m.tokens(u);
    }
    if let Some(why) = missing {
        m.usage_missing(why);
    }
    if let (Source::Reported, Some(u), Some(e)) = (source, usage, estimate) {
        if e.input > 0 {
            route
                .metrics
                .estimate_ratio(u.input as f64 / e.input as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(body: &str) -> Facts {
        let mut s = Scanner::new(FIELDS);
        s.feed(body.as_bytes()).unwrap();
        s.finish().unwrap();
        Facts::read(&s, &[Bytes::copy_from_slice(body.as_bytes())])
    }

    /// The body as the upstream gets it with the ask spliced in.
    fn asked(body: &str) -> Option<String> {
        let (range, with) = facts(body).ask?;
        let out = scan::splice(&[Bytes::copy_from_slice(body.as_bytes())], range, with);
        Some(String::from_utf8(out.concat()).unwrap())
    }

    fn parsed(body: &str) -> serde_json::Value {
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn a_streamed_chat_is_asked_for_usage_by_a_splice() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"\"stream\":true"}],"stream":true}"#;
        let out = asked(body).unwrap();
        assert_eq!(
            out,
            r#"{"model":"m","messages":[{"role":"user","content":"\"stream\":true"}],"stream_options":{"include_usage":true},"stream":true}"#
        );
        // false, null and other options: set, the others kept.
        for opts in [
            r#"{"include_usage":false}"#,
            r#"null"#,
            r#"{"include_usage":null,"x":1}"#,
        ] {
            let body = format!(r#"{{"stream":true,"stream_options":{opts},"model":"m"}}"#);
            let out = parsed(&asked(&body).unwrap());
            assert_eq!(out["stream_options"]["include_usage"], true, "{opts}");
            assert_eq!(out["model"], "m");
        }
        let out = parsed(&asked(r#"{"stream":true,"stream_options":{"x":1}}"#).unwrap());
        assert_eq!(out["stream_options"]["x"], 1);
    }

    #[test]
    fn a_client_that_asked_or_did_not_stream_is_left_alone() {
        let f = facts(r#"{"stream":true,"stream_options":{"include_usage":true}}"#);
        assert!(f.asked && f.ask.is_none());
        for body in [
            r#"{"stream":false}"#,
            r#"{"model":"m"}"#,
            r#"{"stream":"true"}"#,
            r#"{"stream":true,"stream_options":"yes"}"#,
        ] {
            assert!(facts(body).ask.is_none(), "{body}");
        }
    }

    #[test]
    fn the_estimate_reads_caps_n_and_images() {
        let e = Estimate::default();
        let body = r#"{"max_tokens":100,"max_completion_tokens":300,"n":2}"#;
        let est = Estimated::new(400, Some(&facts(body)), &e);
        assert_eq!(
            est,
            Estimated {
                input: 100,
                output: 600
            }
        );
        let img = format!(
            r#"{{"messages":[{{"content":[{{"image_url":{{"url":"data:image/png;base64,{}"}}}}]}}]}}"#,
            "A".repeat(4000)
        );
        let f = facts(&img);
        assert_eq!(f.images, 1);
        // Text that starts with "data:" is text.
        assert_eq!(
            facts(r#"{"messages":[{"content":"data: [DONE]"}]}"#).images,
            0
        );
        let est = Estimated::new(img.len() as u64, Some(&f), &e);
        // The image's bytes are not text: about 60 bytes of JSON around it.
        assert!(est.input >= 1000 && est.input < 1000 + 30, "{est:?}");
        assert_eq!(est.output, 1024);
        let est = Estimated::new(
            10,
            None,
            &Estimate {
                chars_per_token: 2.5,
                ..e
            },
        );
        assert_eq!(est.input, 4);
        assert_eq!(est.counted(TokenCount::Input), 4);
        assert_eq!(est.counted(TokenCount::Output), 1024);
        assert_eq!(est.counted(TokenCount::Total), 1028);
        let huge = facts(r#"{"max_tokens":18446744073709551615,"n":2}"#);
        let est = Estimated::new(10, Some(&huge), &e);
        assert_eq!(est.output, u64::MAX);
        assert_eq!(est.counted(TokenCount::Total), u64::MAX);
    }

    #[test]
    fn settling_reports_the_source_and_moves_the_charges() {
        use crate::tokens::Cell;
        use std::sync::Arc;
        use tokio::time::Instant;
        let usage = Usage {
            input: 7,
            output: 3,
            ..Usage::default()
        };
        let estimate = Some(Estimated {
            input: 50,
            output: 50,
        });
        // 60,000 a minute, a burst of 1,000: one token a millisecond.
        let now = Instant::now();
        let cell = Arc::new(Cell::new(60_000, 1_000, now));
        let charged = |cell: &Arc<Cell>| Tokens {
            estimate,
            route: Some(cell.charge(100, now).unwrap()),
            deployment: None,
        };
        // Reported: settled down to 10 (input + output).
        let mut t = charged(&cell);
        let got = t.settle(Ending::Complete, None, Some(usage), now);
        assert_eq!(got, (Some(usage), Source::Reported));
        assert_eq!(cell.remaining(now), 990);
        // Counting output only: settled to 3.
        let mut t = charged(&cell);
        t.settle(Ending::Complete, Some(TokenCount::Output), Some(usage), now);
        assert_eq!(cell.remaining(now), 987);
        // Cut with nothing reported: the estimate stands.
        let mut t = charged(&cell);
        let (u, source) = t.settle(Ending::Cut, None, None, now);
        assert_eq!((u.map(|u| u.input), source), (Some(50), Source::Estimated));
        assert_eq!(cell.remaining(now), 887);
        // Failed: all refunded, whatever the body said.
        let mut t = charged(&cell);
        let got = t.settle(Ending::Failed, None, Some(usage), now);
        assert_eq!(got, (None, Source::None));
        assert_eq!(cell.remaining(now), 887);
    }
}
