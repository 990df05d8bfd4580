//! Micro-benchmark of the body scanner (`sluice::scan`): nanoseconds per
//! body byte for a short chat body and for a 1 MiB one whose `model` comes
//! last (the whole body is scanned), fed whole and in 16 KiB reads. Every
//! field is watched and every body is scanned to its end, as the proxy does
//! to catch a later duplicate. Run: `cargo bench --bench scan`.

use std::hint::black_box;
use std::time::Instant;

use sluice::scan::{Field, Fields, Scanner};

/// The full run under `cargo bench`, a smoke run under `cargo test`.
fn full() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// A typical chat completion request, about 600 bytes.
const CHAT: &str = r#"{"model":"gpt-4.1-mini","messages":[{"role":"system","content":"You are a helpful assistant. Answer briefly, in plain words, and say so when you are not sure."},{"role":"user","content":"What is the capital of France, and what is it known for? Give me three facts about its history, one about its food and one about its museums.\nKeep it short."},{"role":"assistant","content":"Paris. It is known for the Eiffel Tower, the Louvre and its caf\u00e9s; it has been the capital since the 10th century."},{"role":"user","content":"And what about \"Lyon\"?"}],"temperature":0.2,"stream":true,"stream_options":{"include_usage":true},"max_tokens":256}"#;

/// About 1 MiB of conversation (long strings with an escape every few
/// dozen bytes, as code and prose have), then the model.
fn large() -> String {
    let content = "Here is the function you asked for, with \\\"quotes\\\" and a newline.\\n    let x = compute(a, b); // {not: [json]}\\n".repeat(40);
    let mut body = String::from(r#"{"messages":["#);
    while body.len() < 1 << 20 {
        if !body.ends_with('[') {
            body.push(',');
        }
        body.push_str(r#"{"role":"user","content":""#);
        body.push_str(&content);
        body.push_str(r#""}"#);
    }
    body.push_str(r#"],"stream":false,"model":"gpt-4.1-mini"}"#);
    body
}

fn scan(chunks: &[&[u8]]) {
    let mut s = Scanner::new(Fields::all());
    for c in chunks {
        s.feed(black_box(c)).unwrap();
    }
    s.finish().unwrap();
    assert!(s.is_done());
    black_box(s.span(Field::Model).unwrap());
}

/// Nanoseconds per byte over `runs` scans of `chunks`.
fn per_byte(chunks: &[&[u8]], runs: u32) -> f64 {
    let bytes: usize = chunks.iter().map(|c| c.len()).sum();
    scan(chunks); // warm up
    let started = Instant::now();
    for _ in 0..runs {
        scan(chunks);
    }
    started.elapsed().as_nanos() as f64 / (f64::from(runs) * bytes as f64)
}

fn main() {
    let (small_runs, large_runs) = if full() { (1_000_000, 500) } else { (100, 2) };
    let chat = CHAT.as_bytes();
    println!(
        "scan {} B chat body, whole: {:.3} ns/byte",
        chat.len(),
        per_byte(&[chat], small_runs)
    );
    let body = large();
    let b = body.as_bytes();
    println!(
        "scan {} B body, model last, whole: {:.3} ns/byte",
        b.len(),
        per_byte(&[b], large_runs)
    );
    let reads: Vec<&[u8]> = b.chunks(16 * 1024).collect();
    println!(
        "scan {} B body, model last, 16 KiB reads: {:.3} ns/byte",
        b.len(),
        per_byte(&reads, large_runs)
    );
}
