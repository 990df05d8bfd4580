//! CI's smoke run of the benchmark: a few seconds of every phase against
//! the debug build of sluice (and nginx when installed). It checks that
//! the harness works end to end and that its figures parse; it never
//! asserts speed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

fn sluice_binary() -> PathBuf {
    // `cargo test --workspace` builds the sluice binary beside ours.
    let bench = Path::new(env!("CARGO_BIN_EXE_sluice-bench"));
    let sluice = bench.with_file_name("sluice");
    assert!(
        sluice.is_file(),
        "no sluice binary at {}: run `cargo test --workspace` (or `cargo build` first)",
        sluice.display()
    );
    sluice
}

#[test]
fn a_smoke_run_measures_every_phase() {
    let dir = std::env::temp_dir().join(format!("sluice-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, md) = (dir.join("results.json"), dir.join("BENCHMARKS.md"));
    std::fs::write(
        &md,
        "# Title\n\nhand-written\n\n<!-- bench:results:start -->\nold\n<!-- bench:results:end -->\n\ntail\n",
    )
    .unwrap();
    let log = dir.join("bench.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .arg("--smoke")
        .arg("--sluice")
        .arg(sluice_binary())
        // The optional targets too: a model-routed sluice, and a baseline
        // build (the same binary here), with a padded request.
        .arg("--model-routing")
        .arg("--usage-off")
        .arg("--llm-layer")
        .arg("--logs-off")
        // Gateways are not part of CI's run: where none is installed, each
        // is skipped with a line saying so.
        .arg("--gateways")
        .args(["--gateways-dir", "/nonexistent/gateways"])
        .arg("--baseline")
        .arg(sluice_binary())
        .args(["--chat-bytes", "600"])
        .arg("--json")
        .arg(&json)
        .arg("--out")
        .arg(&md)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join("bench.err")).unwrap())
        .spawn()
        .unwrap();
    // About 15 s normally: a hang must fail the test, not stall CI.
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("sluice-bench --smoke still running after 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = std::fs::read_to_string(dir.join("bench.err")).unwrap_or_default();
    assert!(status.success(), "sluice-bench failed:\n{stderr}");

    for name in ["litellm", "portkey"] {
        assert!(
            stderr.contains(&format!(
                "{name}: not installed under /nonexistent/gateways (bench/install-gateways.sh), skipped"
            )),
            "{stderr}"
        );
    }
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["smoke"], true);
    let targets = r["targets"].as_array().unwrap();
    let names: Vec<&str> = targets
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(&names[..2], ["direct", "sluice"], "{names:?}");
    assert!(names.contains(&"sluice-models"), "{names:?}");
    assert!(names.contains(&"baseline"), "{names:?}");
    assert!(names.contains(&"sluice-no-usage"), "{names:?}");
    assert!(names.contains(&"sluice-nolog"), "{names:?}");
    assert!(names.contains(&"sluice-usage-inject"), "{names:?}");
    assert_eq!(
        names.contains(&"nginx-nolog"),
        names.contains(&"nginx"),
        "{names:?}"
    );
    // The LLM layer's rounds: every case answered, with a CPU figure.
    let cases = r["llm_layer"]["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8, "{cases:?}");
    for c in cases {
        let p = &c["point"];
        assert!(p["requests"].as_u64().unwrap() > 0, "{c}");
        assert_eq!(p["errors"], 0, "{c}");
        assert!(p["cpu_us_per_request"].is_number(), "{c}");
    }
    assert!(cases
        .iter()
        .any(|c| c["body_bytes"] == 100 * 1024 && c["model_last"] == true));
    assert_eq!(r["chat_bytes"], 600);
    for t in targets {
        let name = t["name"].as_str().unwrap();
        let points = t["points"].as_array().unwrap();
        if t["streams_only"] == true {
            assert_eq!(name, "sluice-usage-inject");
            assert!(points.is_empty());
            let s = &t["streams"];
            assert!(s["requests"].as_u64().unwrap() > 0, "{name}: {s}");
            assert_eq!(s["failed"], 0, "{name}: {s}");
            assert_eq!(s["chunks_expected"], s["chunks_received"], "{name}: {s}");
            continue;
        }
        assert_eq!(points.len(), 2, "{name}");
        for p in points {
            assert!(p["requests"].as_u64().unwrap() > 0, "{name}: {p}");
            assert_eq!(p["errors"], 0, "{name}: {p}");
            assert!(p["rps"].as_f64().unwrap() > 0.0, "{name}: {p}");
            assert!(
                p["latency"]["p99_us"].as_u64().unwrap()
                    >= p["latency"]["p50_us"].as_u64().unwrap()
            );
            // One round per point in a smoke run, each with its tail.
            let rounds = p["rounds"].as_array().unwrap();
            assert_eq!(rounds.len(), 1, "{name}: {p}");
            assert!(rounds[0]["p99_us"].as_u64().unwrap() >= rounds[0]["p50_us"].as_u64().unwrap());
            // Proxies have a CPU figure, the direct path has none.
            assert_eq!(
                p["cpu_us_per_request"].is_number(),
                name != "direct",
                "{name}: {p}"
            );
        }
        let s = &t["streams"];
        assert!(s["requests"].as_u64().unwrap() > 0, "{name}: {s}");
        assert_eq!(s["failed"], 0, "{name}: {s}");
        assert_eq!(s["chunks_expected"], s["chunks_received"], "{name}: {s}");
        assert!(s["lag"]["count"].as_u64().unwrap() > 0, "{name}: {s}");
        assert_eq!(
            s["cpu_us_per_stream"].is_number(),
            name != "direct",
            "{name}: {s}"
        );
        if name != "direct" {
            assert!(t["idle_rss_kib"].as_u64().unwrap() > 0, "{name}");
            let held = t["held"]["points"].as_array().unwrap();
            assert_eq!(held.len(), 2, "{name}");
            for h in held {
                assert!(h["rss_kib"].as_u64().unwrap() > 0, "{name}: {h}");
                assert_eq!(h["failed"], 0, "{name}: {h}");
            }
            assert!(t["held"]["kib_per_stream"].is_number(), "{name}");
        }
    }
    let soak = &r["soak"];
    assert!(soak["requests"].as_u64().unwrap() > 0, "{soak}");
    assert_eq!(soak["errors"], 0, "{soak}");
    assert_eq!(soak["stream_failures"], 0, "{soak}");
    assert_eq!(soak["chunks_lost"], 0, "{soak}");
    assert!(soak["samples"].as_array().unwrap().len() >= 3, "{soak}");

    // The generated section replaced the old one; the hand-written parts stay.
    let md = std::fs::read_to_string(&md).unwrap();
    assert!(
        md.starts_with("# Title\n\nhand-written\n\n<!-- bench:results:start -->"),
        "{md}"
    );
    assert!(md.ends_with("<!-- bench:results:end -->\n\ntail\n"), "{md}");
    assert!(!md.contains("\nold\n"), "{md}");
    for heading in [
        "### Request/response",
        "### Streaming",
        "### Memory",
        "### Soak",
    ] {
        assert!(md.contains(heading), "{heading} missing:\n{md}");
    }
    assert!(md.contains("| requests/s, 8 conn |"), "{md}");
    assert!(md.contains("600-byte body"), "{md}");
    assert!(md.contains("### The LLM layer's own cost"), "{md}");
    assert!(
        md.contains("| model routing | 100 KiB body, model last |"),
        "{md}"
    );
    assert!(md.contains("Usage injection"), "{md}");
    // Round-by-round tail ratios need both proxies.
    assert_eq!(
        md.contains("| added p99, round by round, 8 conn |"),
        names.contains(&"nginx"),
        "{md}"
    );
    // The charts, beside the markdown.
    for chart in [
        "bench-throughput.svg",
        "bench-latency.svg",
        "bench-memory.svg",
        "bench-cpu.svg",
    ] {
        let svg = std::fs::read_to_string(dir.join(chart)).unwrap();
        assert!(svg.starts_with("<svg"), "{chart}");
        let legend = svg.split("<text").skip(1).any(|t| {
            t.split_once('>')
                .and_then(|(_, rest)| rest.split_once("</text>"))
                .is_some_and(|(text, _)| text.trim() == "sluice")
        });
        assert!(legend, "{chart}: no sluice in the legend");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_printed_configs_pass_sluice_check() {
    for routing in [
        &[][..],
        &["--model-routing"][..],
        &["--token-limit"][..],
        &["--usage-inject"][..],
        &["--logs-off"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
            .args([
                "config",
                "--listen",
                "127.0.0.1:1",
                "--upstream",
                "127.0.0.1:2",
            ])
            .args(routing)
            .output()
            .unwrap();
        assert!(out.status.success());
        let path = std::env::temp_dir().join(format!(
            "sluice-bench-config-{}-{}.toml",
            std::process::id(),
            routing.first().unwrap_or(&"plain").trim_start_matches('-')
        ));
        std::fs::write(&path, &out.stdout).unwrap();
        let check = Command::new(sluice_binary())
            .args(["check", "--config"])
            .arg(&path)
            .env("SLUICE_BENCH_KEY", "sk-test")
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(
            check.status.success(),
            "{routing:?}: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let toml = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            toml.contains("model_routing = true"),
            routing == ["--model-routing"]
        );
        assert_eq!(
            toml.contains("sluice::access=off"),
            routing == ["--logs-off"]
        );
    }
}
