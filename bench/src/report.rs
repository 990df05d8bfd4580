//! The results as a markdown section (spliced into BENCHMARKS.md between
//! its markers) and as JSON.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::{Point, Results, Target};

pub const START: &str = "<!-- bench:results:start -->";
pub const END: &str = "<!-- bench:results:end -->";

pub struct Machine {
    pub started: std::time::Instant,
    pub date: String,
    pub cpu: String,
    pub cpus: usize,
    pub kernel: String,
    pub memory_gib: f64,
    pub sluice: String,
    pub nginx: Option<String>,
    /// (proxy CPU, load and mock CPU), when pinned.
    pub pinned: Option<(usize, usize)>,
}

impl Machine {
    pub fn read(
        sluice: &Path,
        nginx: Option<&Path>,
        cpus: usize,
        pinned: Option<(usize, usize)>,
    ) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown".into(), |(_, v)| v.trim().to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0.0);
        let run = |cmd: &str, args: &[&str]| {
            Command::new(cmd)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let version = run(&sluice.display().to_string(), &["--version"]).unwrap_or_default();
        let rev = run("git", &["rev-parse", "--short", "HEAD"])
            .map(|r| format!(" (commit {r})"))
            .unwrap_or_default();
        Machine {
            started: std::time::Instant::now(),
            date: run("date", &["-u", "+%Y-%m-%d"]).unwrap_or_default(),
            cpu,
            cpus,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            memory_gib: mem_kib / 1024.0 / 1024.0,
            sluice: format!("{version}{rev}"),
            nginx: nginx.map(crate::procs::nginx_version),
            pinned,
        }
    }
}

fn us(h: &Histogram<u64>, q: f64) -> u64 {
    h.value_at_quantile(q)
}

fn pair(a: u64, b: u64) -> String {
    format!("{a} / {b}")
}

fn signed_pair(a: i64, b: i64) -> String {
    format!("{a:+} / {b:+}")
}

fn ratio(a: f64, b: f64) -> String {
    if b.abs() < f64::EPSILON {
        "–".into()
    } else {
        format!("{:.2}", a / b)
    }
}

/// Each round's added-p99 ratio, sluice to nginx (the two ran seconds apart,
/// each against the direct round just before it), and their median: drift
/// on a shared machine moves a merged tail more than it moves these.
fn round_ratios(d: &Point, s: &Point, n: &Point) -> String {
    let mut each: Vec<f64> = d
        .rounds
        .iter()
        .zip(&s.rounds)
        .zip(&n.rounds)
        .filter_map(|((d, s), n)| {
            let (sa, na) = (s.1 as f64 - d.1 as f64, n.1 as f64 - d.1 as f64);
            (na.abs() >= f64::EPSILON).then(|| sa / na)
        })
        .collect();
    if each.is_empty() {
        return "–".into();
    }
    let listed: Vec<String> = each.iter().map(|r| format!("{r:.2}")).collect();
    each.sort_by(f64::total_cmp);
    let mid = each.len() / 2;
    let median = if each.len() % 2 == 1 {
        each[mid]
    } else {
        (each[mid - 1] + each[mid]) / 2.0
    };
    format!("{} (median {median:.2})", listed.join(" · "))
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn streams_of(t: &Target) -> Option<&crate::Streams> {
    t.streams.as_ref()
}

fn point(t: &Target, conns: usize) -> Option<&Point> {
    t.points.iter().find(|p| p.conns == conns)
}

struct Table {
    columns: Vec<&'static str>,
    rows: String,
}

impl Table {
    fn new(targets: &[&Target], ratio_cols: &[&'static str]) -> Table {
        let mut columns: Vec<&'static str> = targets.iter().map(|t| t.name).collect();
        columns.extend_from_slice(ratio_cols);
        Table {
            columns,
            rows: String::new(),
        }
    }

    fn row(&mut self, label: &str, cells: Vec<String>) {
        let _ = write!(self.rows, "| {label} |");
        for c in cells {
            let _ = write!(self.rows, " {c} |");
        }
        self.rows.push('\n');
    }

    fn render(&self) -> String {
        let mut s = String::from("| |");
        for c in &self.columns {
            let _ = write!(s, " {c} |");
        }
        s.push_str("\n|---|");
        for _ in &self.columns {
            s.push_str("---:|");
        }
        s.push('\n');
        s + &self.rows
    }
}

pub fn markdown(r: &Results) -> String {
    let m = &r.machine;
    let p = &r.plan;
    let mut out = String::new();
    let _ = writeln!(out, "{START}");
    let pinning = match m.pinned {
        Some((proxy, load)) => format!(
            "Proxies pinned to CPU {proxy}, load generator and mock to CPU {load} (taskset)."
        ),
        None => "Not pinned (fewer than two CPUs or no taskset).".into(),
    };
    let _ = writeln!(
        out,
        "Run of {} on {} ({} CPUs, {:.0} GiB, Linux {}); {}; nginx {}{}. {pinning}{}\n",
        m.date,
        m.cpu,
        m.cpus,
        m.memory_gib,
        m.kernel,
        m.sluice,
        m.nginx.as_deref().unwrap_or("not installed"),
        r.gateways
            .iter()
            .map(|(name, version)| format!("; {name} {version}"))
            .collect::<String>(),
        if p.smoke {
            " **Smoke run: figures are not meaningful.**"
        } else {
            ""
        },
    );

    let all: Vec<&Target> = r.targets.iter().collect();
    let direct = all.iter().find(|t| t.name == "direct").copied();
    // The comparison: sluice and what a user would run instead. The rest
    // are sluice's own variants, in tables of their own.
    let compared = |t: &&Target| {
        matches!(
            t.name,
            "direct" | "sluice" | "sluice-nolog" | "nginx" | "nginx-nolog" | "litellm" | "portkey"
        )
    };
    let main: Vec<&Target> = all.iter().copied().filter(compared).collect();
    let variants: Vec<&Target> = all
        .iter()
        .copied()
        .filter(|t| t.name == "direct" || t.name == "sluice" || !compared(t))
        .collect();
    let pairs = Pairs::of(&all);

    let _ = writeln!(
        out,
        "### Request/response\n\n`POST /v1/chat/completions`, {}-byte body, ~600-byte JSON answer; \
         closed loop. Each point is {} rounds over all targets in turn, each {:.0} s measured after {:.0} s \
         of warm-up, merged. Latencies in µs; \"added\" is the proxy's figure minus the direct path's. \
         `-nolog` targets have their access log off (`sluice::access=off`, nginx `access_log off`); \
         the others write one line per request (LiteLLM at its default, uvicorn's access line; Portkey \
         writes none).{}\n",
        p.chat_bytes,
        p.rounds,
        p.measure.as_secs_f64(),
        p.warmup.as_secs_f64(),
        extra_targets(&all)
    );
    request_table(&mut out, &main, direct, &pairs, &p.conns);
    if variants.len() > 2 {
        let _ = writeln!(out, "\nsluice's variants, in the same rounds:\n");
        // Less the streams-only ones (usage injection): they have no points.
        let answered: Vec<&Target> = variants.iter().copied().filter(|t| t.everywhere).collect();
        request_table(&mut out, &answered, direct, &Pairs(vec![]), &p.conns);
    }

    shared_limit(&mut out, &all, &p.conns);
    llm_layer(&mut out, r);

    let _ = writeln!(
        out,
        "\n### Streaming\n\n{} concurrent SSE streams of {} chunks, {} ms apart, back to back for {:.0} s. \
         Lag is the time a chunk is read minus the time the mock wrote it (embedded in the chunk). µs.\n",
        p.streams,
        p.chunks,
        p.interval_ms,
        p.stream_time.as_secs_f64()
    );
    streaming_table(&mut out, &main, direct, &pairs);
    if variants.len() > 2 {
        let _ = writeln!(out, "\nsluice's variants:\n");
        streaming_table(&mut out, &variants, direct, &Pairs(vec![]));
    }

    let held = |t: &&Target| t.name != "direct" && t.everywhere;
    let main_held: Vec<&Target> = main.iter().copied().filter(held).collect();
    let variants_held: Vec<&Target> = variants.iter().copied().filter(held).collect();
    if !main_held.is_empty() {
        let _ = writeln!(
            out,
            "\n### Memory\n\nRSS of the proxy's whole process tree (nginx: master and worker), in MiB. \
             Streams send one chunk a second and stay open while measured.\n"
        );
        memory_table(&mut out, &main_held, &pairs, &p.held);
        if variants_held.len() > 1 {
            let _ = writeln!(out, "\nsluice's variants:\n");
            memory_table(&mut out, &variants_held, &Pairs(vec![]), &p.held);
        }
        if p.held.len() >= 2 {
            let _ = writeln!(
                out,
                "\nKiB per open stream is the RSS slope between {} and {} streams (over the streams \
                 actually open, for a proxy that failed some).",
                p.held[0],
                p.held[p.held.len() - 1]
            );
        }
    }

    if let Some(s) = &r.soak {
        let first = s.samples.first().map_or(0, |x| x.1);
        let after_warm = s
            .samples
            .iter()
            .find(|x| x.0 >= p.soak_sample.as_secs_f64())
            .map_or(first, |x| x.1);
        let last = s.samples.last().map_or(0, |x| x.1);
        let max = s.samples.iter().map(|x| x.1).max().unwrap_or(0);
        let _ = writeln!(
            out,
            "\n### Soak\n\nA freshly started sluice for {:.0} s under 8 connections pacing requests 1 ms apart plus 20 \
             streams at a time: {} requests ({} errors), {} streams ({} failed, {} chunks lost). \
             RSS in MiB: {} at the start, {} after {:.0} s, {} at the end, {} at most.",
            p.soak.as_secs_f64(),
            s.requests,
            s.errors,
            s.streams,
            s.stream_failures,
            s.chunks_lost,
            mib(first),
            mib(after_warm),
            p.soak_sample.as_secs_f64(),
            mib(last),
            mib(max),
        );
    }
    let _ = writeln!(out, "{END}");
    out
}

/// The ratio columns: sluice to nginx, with logs on and with logs off,
/// where both of a pair ran.
struct Pairs<'a>(Vec<(&'a Target, &'a Target, &'static str)>);

impl<'a> Pairs<'a> {
    fn of(all: &[&'a Target]) -> Pairs<'a> {
        let find = |name: &str| all.iter().find(|t| t.name == name).copied();
        let mut pairs = vec![];
        for (s, n, label) in [
            ("sluice", "nginx", "sluice ÷ nginx"),
            ("sluice-nolog", "nginx-nolog", "sluice ÷ nginx, logs off"),
        ] {
            if let (Some(s), Some(n)) = (find(s), find(n)) {
                pairs.push((s, n, label));
            }
        }
        Pairs(pairs)
    }

    fn labels(&self) -> Vec<&'static str> {
        self.0.iter().map(|p| p.2).collect()
    }

    /// One cell per pair.
    fn cells(&self, f: impl Fn(&Target, &Target) -> String) -> Vec<String> {
        self.0.iter().map(|(s, n, _)| f(s, n)).collect()
    }

    fn blank(&self) -> Vec<String> {
        vec![String::new(); self.0.len()]
    }
}

fn request_table(
    out: &mut String,
    targets: &[&Target],
    direct: Option<&Target>,
    pairs: &Pairs,
    conns: &[usize],
) {
    let mut t = Table::new(targets, &pairs.labels());
    for &conns in conns {
        let pts: Vec<Option<&Point>> = targets.iter().map(|t| point(t, conns)).collect();
        let d = direct.and_then(|t| point(t, conns));
        let both = |f: &dyn Fn(&Point, &Point) -> String| {
            pairs.cells(|s, n| match (point(s, conns), point(n, conns)) {
                (Some(s), Some(n)) => f(s, n),
                _ => "–".into(),
            })
        };
        let mut cells: Vec<String> = pts
            .iter()
            .map(|x| x.map_or("–".into(), |x| format!("{:.0}", x.fixed.rps())))
            .collect();
        cells.extend(both(&|s, n| ratio(s.fixed.rps(), n.fixed.rps())));
        t.row(&format!("requests/s, {conns} conn"), cells);

        let mut cells: Vec<String> = pts
            .iter()
            .map(|x| {
                x.map_or("–".into(), |x| {
                    pair(us(&x.fixed.latency, 0.5), us(&x.fixed.latency, 0.99))
                })
            })
            .collect();
        cells.extend(pairs.blank());
        t.row(&format!("p50 / p99, {conns} conn"), cells);

        if let Some(d) = d {
            let added = |x: &Point| {
                (
                    us(&x.fixed.latency, 0.5) as i64 - us(&d.fixed.latency, 0.5) as i64,
                    us(&x.fixed.latency, 0.99) as i64 - us(&d.fixed.latency, 0.99) as i64,
                )
            };
            let mut cells: Vec<String> = pts
                .iter()
                .map(|x| match x {
                    Some(x) if x.cpu_us.is_some() => {
                        let (a, b) = added(x);
                        signed_pair(a, b)
                    }
                    _ => "–".into(),
                })
                .collect();
            cells.extend(both(&|s, n| {
                let ((sa, sb), (na, nb)) = (added(s), added(n));
                format!(
                    "{} / {}",
                    ratio(sa as f64, na as f64),
                    ratio(sb as f64, nb as f64)
                )
            }));
            t.row(&format!("added p50 / p99 vs direct, {conns} conn"), cells);
            if !pairs.0.is_empty() {
                let mut cells = vec![String::new(); pts.len()];
                cells.extend(both(&|s, n| round_ratios(d, s, n)));
                t.row(&format!("added p99, round by round, {conns} conn"), cells);
            }
        }

        let mut cells: Vec<String> = pts
            .iter()
            .map(|x| {
                x.and_then(|x| x.cpu_us)
                    .map_or("–".into(), |c| format!("{c:.1}"))
            })
            .collect();
        cells.extend(both(&|s, n| match (s.cpu_us, n.cpu_us) {
            (Some(a), Some(b)) => ratio(a, b),
            _ => "–".into(),
        }));
        t.row(&format!("proxy CPU µs per request, {conns} conn"), cells);

        let errors: u64 = pts.iter().flatten().map(|x| x.fixed.errors).sum();
        if errors > 0 {
            let mut cells: Vec<String> = pts
                .iter()
                .map(|x| x.map_or("–".into(), |x| x.fixed.errors.to_string()))
                .collect();
            cells.extend(pairs.blank());
            t.row(&format!("errors, {conns} conn"), cells);
        }
    }
    out.push_str(&t.render());
}

fn streaming_table(out: &mut String, targets: &[&Target], direct: Option<&Target>, pairs: &Pairs) {
    let mut t = Table::new(targets, &pairs.labels());
    let cells = |f: &dyn Fn(&crate::Streams) -> String| -> Vec<String> {
        let mut c: Vec<String> = targets
            .iter()
            .map(|t| streams_of(t).map_or("–".into(), f))
            .collect();
        c.extend(pairs.blank());
        c
    };
    t.row(
        "streams (failed)",
        cells(&|s| format!("{} ({})", s.requests, s.failed)),
    );
    t.row(
        "time to first chunk p50 / p99",
        cells(&|s| pair(us(&s.first_chunk, 0.5), us(&s.first_chunk, 0.99))),
    );
    let mut cpu: Vec<String> = targets
        .iter()
        .map(|t| t.stream_cpu_us.map_or("–".into(), |c| format!("{c:.0}")))
        .collect();
    cpu.extend(
        pairs.cells(|s, n| match (s.stream_cpu_us, n.stream_cpu_us) {
            (Some(a), Some(b)) => ratio(a, b),
            _ => "–".into(),
        }),
    );
    t.row("proxy CPU per stream, µs", cpu);
    t.row(
        "per-chunk lag p50 / p99",
        cells(&|s| pair(us(&s.lag, 0.5), us(&s.lag, 0.99))),
    );
    if let Some(ds) = direct.and_then(streams_of) {
        let added = |s: &crate::Streams| {
            (
                us(&s.first_chunk, 0.5) as i64 - us(&ds.first_chunk, 0.5) as i64,
                us(&s.first_chunk, 0.99) as i64 - us(&ds.first_chunk, 0.99) as i64,
                us(&s.lag, 0.5) as i64 - us(&ds.lag, 0.5) as i64,
                us(&s.lag, 0.99) as i64 - us(&ds.lag, 0.99) as i64,
            )
        };
        let proxied = |f: &dyn Fn((i64, i64, i64, i64)) -> String| -> Vec<String> {
            let mut c: Vec<String> = targets
                .iter()
                .map(|t| match streams_of(t) {
                    Some(s) if t.name != "direct" => f(added(s)),
                    _ => "–".into(),
                })
                .collect();
            c.extend(pairs.blank());
            c
        };
        t.row(
            "added time to first chunk p50 / p99",
            proxied(&|a| signed_pair(a.0, a.1)),
        );
        t.row(
            "added per-chunk lag p50 / p99",
            proxied(&|a| signed_pair(a.2, a.3)),
        );
    }
    t.row(
        "chunks lost",
        cells(&|s| (s.chunks_expected - s.chunks_received).to_string()),
    );
    out.push_str(&t.render());
}

fn memory_table(out: &mut String, proxies: &[&Target], pairs: &Pairs, held: &[usize]) {
    let mut t = Table::new(proxies, &pairs.labels());
    let ratio_of = |f: &dyn Fn(&Target) -> Option<f64>| {
        pairs.cells(|s, n| match (f(s), f(n)) {
            (Some(a), Some(b)) => ratio(a, b),
            _ => "–".into(),
        })
    };
    let row = |t: &mut Table, label: &str, f: &dyn Fn(&Target) -> String, r: Vec<String>| {
        let mut cells: Vec<String> = proxies.iter().map(|t| f(t)).collect();
        cells.extend(r);
        t.row(label, cells);
    };
    let idle = |t: &Target| t.idle_rss_kib.map(|k| k as f64);
    row(
        &mut t,
        "idle RSS",
        &|t| t.idle_rss_kib.map_or("–".into(), mib),
        ratio_of(&idle),
    );
    for (i, &n) in held.iter().enumerate() {
        let rss = |t: &Target| t.held.as_ref().and_then(|h| h.1.get(i)).map(|x| x.1 as f64);
        row(
            &mut t,
            &format!("RSS holding {n} streams"),
            &|t| rss(t).map_or("–".into(), |k| mib(k as u64)),
            ratio_of(&rss),
        );
    }
    row(
        &mut t,
        "KiB per open stream",
        &|t| per_stream_kib(t).map_or("–".into(), |k| format!("{k:.1}")),
        ratio_of(&per_stream_kib),
    );
    row(
        &mut t,
        "streams held open at the end",
        &|t| {
            t.held
                .as_ref()
                .and_then(|h| h.1.last())
                .map_or("–".into(), |x| open_at(x).to_string())
        },
        pairs.blank(),
    );
    row(
        &mut t,
        "streams failed while held",
        &|t| {
            t.held
                .as_ref()
                .and_then(|h| h.1.last())
                .map_or("–".into(), |x| x.2.to_string())
        },
        pairs.blank(),
    );
    out.push_str(&t.render());
}

/// Streams open at a held step: those asked for less those that failed
/// (a gateway that cannot keep up fails some).
pub fn open_at(step: &crate::HeldStep) -> usize {
    step.0.saturating_sub(step.2 as usize)
}

/// The RSS slope over the streams actually open, between the first held
/// step and the last with more open, or from idle where there is one
/// step with streams open.
fn per_stream_kib(t: &Target) -> Option<f64> {
    let (before, at) = t.held.as_ref()?;
    let last = at.iter().rev().find(|x| open_at(x) > 0)?;
    let first = at
        .first()
        .filter(|f| open_at(f) > 0 && open_at(f) < open_at(last))
        .map_or((0, *before), |f| (open_at(f), f.1));
    (open_at(last) > first.0)
        .then(|| (last.1 as f64 - first.1 as f64) / (open_at(last) - first.0) as f64)
}

fn hist(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50_us": us(h, 0.5),
        "p99_us": us(h, 0.99),
        "p999_us": us(h, 0.999),
        "max_us": h.max(),
    })
}

pub fn json(r: &Results) -> Value {
    let targets: Vec<Value> = r
        .targets
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "streams_only": !t.everywhere,
                "points": t.points.iter().map(|p| json!({
                    "conns": p.conns,
                    "requests": p.fixed.requests,
                    "errors": p.fixed.errors,
                    "rps": p.fixed.rps(),
                    "latency": hist(&p.fixed.latency),
                    "cpu_us_per_request": p.cpu_us,
                    "store_cpu_us_per_request": p.store_cpu_us,
                    "rounds": p.rounds.iter().map(|(p50, p99)| json!({
                        "p50_us": p50, "p99_us": p99,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "streams": t.streams.as_ref().map(|s| json!({
                    "requests": s.requests,
                    "failed": s.failed,
                    "chunks_expected": s.chunks_expected,
                    "chunks_received": s.chunks_received,
                    "first_chunk": hist(&s.first_chunk),
                    "lag": hist(&s.lag),
                    "cpu_us_per_stream": t.stream_cpu_us,
                })),
                "idle_rss_kib": t.idle_rss_kib,
                "held": t.held.as_ref().map(|(before, at)| json!({
                    "before_rss_kib": before,
                    "points": at.iter().map(|x| json!({
                        "streams": x.0, "rss_kib": x.1, "failed": x.2, "open": open_at(x),
                    })).collect::<Vec<_>>(),
                    "kib_per_stream": per_stream_kib(t),
                })),
            })
        })
        .collect();
    let cases: Vec<Value> = r
        .cases
        .iter()
        .map(|c| {
            json!({
                "target": c.target,
                "feature": c.feature,
                "body_bytes": c.shape.bytes,
                "model_last": c.shape.model_last,
                "point": c.point.as_ref().map(|p| json!({
                    "requests": p.fixed.requests,
                    "errors": p.fixed.errors,
                    "rps": p.fixed.rps(),
                    "latency": hist(&p.fixed.latency),
                    "cpu_us_per_request": p.cpu_us,
                })),
            })
        })
        .collect();
    json!({
        "llm_layer": { "conns": r.case_conns, "cases": cases },
        "smoke": r.plan.smoke,
        "chat_bytes": r.plan.chat_bytes,
        "machine": {
            "date": r.machine.date,
            "cpu": r.machine.cpu,
            "cpus": r.machine.cpus,
            "kernel": r.machine.kernel,
            "sluice": r.machine.sluice,
            "nginx": r.machine.nginx,
            "pinned": r.machine.pinned.map(|(p, l)| json!({"proxy": p, "load": l})),
        },
        "targets": targets,
        "soak": r.soak.as_ref().map(|s| json!({
            "samples": s.samples.iter().map(|(t, rss)| json!({"t": t, "rss_kib": rss})).collect::<Vec<_>>(),
            "requests": s.requests,
            "errors": s.errors,
            "streams": s.streams,
            "stream_failures": s.stream_failures,
            "chunks_lost": s.chunks_lost,
        })),
    })
}

/// Replaces the section between the markers of `path` with `section`, or
/// writes `section` as the whole file where there are no markers.
pub fn write_into(path: &Path, section: &str) -> std::io::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(START), old.find(END)) {
        (Some(a), Some(b)) if a < b => {
            format!(
                "{}{}{}",
                &old[..a],
                section.trim_end(),
                &old[b + END.len()..]
            )
        }
        _ => section.to_string(),
    };
    std::fs::write(path, new)
}

/// The shared limit against the same limit per process (`--shared-limit`):
/// what the Redis round trip adds, to the proxy and to Redis.
fn shared_limit(out: &mut String, all: &[&Target], conns: &[usize]) {
    let find = |name: &str| all.iter().find(|t| t.name == name).copied();
    let (Some(local), Some(shared)) = (find("sluice-local-limit"), find("sluice-shared-limit"))
    else {
        return;
    };
    let _ = writeln!(
        out,
        "\n### Shared limit (Redis)\n\nThe same route and request limit (never refusing), its bucket \
         per process (`sluice-local-limit`) or in a local `redis-server` (`sluice-shared-limit`: one \
         script call per request). µs; \"added\" is shared minus local. Redis ran on the load \
         generator's CPU.\n\n\
         | connections | local p50 / p99 | shared p50 / p99 | added p50 / p99 | proxy CPU per request, local / shared | Redis CPU per request |\n\
         |---:|---:|---:|---:|---:|---:|"
    );
    let cpu = |x: Option<f64>| x.map_or("–".into(), |c| format!("{c:.1}"));
    for &c in conns {
        let (Some(l), Some(s)) = (point(local, c), point(shared, c)) else {
            continue;
        };
        let q = |x: &Point, q| us(&x.fixed.latency, q);
        let _ = writeln!(
            out,
            "| {c} | {} | {} | {} | {} / {} | {} |",
            pair(q(l, 0.5), q(l, 0.99)),
            pair(q(s, 0.5), q(s, 0.99)),
            signed_pair(
                q(s, 0.5) as i64 - q(l, 0.5) as i64,
                q(s, 0.99) as i64 - q(l, 0.99) as i64
            ),
            cpu(l.cpu_us),
            cpu(s.cpu_us),
            cpu(s.store_cpu_us),
        );
    }
}

/// The LLM layer's own cost (`--llm-layer`): each feature as a ratio to
/// the plain route measured with the same requests in the same rounds.
fn llm_layer(out: &mut String, r: &Results) {
    let find = |name: &str| r.targets.iter().find(|t| t.name == name);
    let plain_main = find("sluice");
    let conns = r.case_conns;
    let mut rows = String::new();
    let cpu = |x: Option<f64>| x.map_or("–".into(), |c| format!("{c:.1}"));
    let mut row = |feature: &str, request: String, x: &Point, plain: Option<&Point>| {
        let q = |p: &Point, q| us(&p.fixed.latency, q);
        let (cpu_ratio, rps_ratio) = match plain {
            Some(b) => (
                match (x.cpu_us, b.cpu_us) {
                    (Some(a), Some(b)) => ratio(a, b),
                    _ => "–".into(),
                },
                ratio(x.fixed.rps(), b.fixed.rps()),
            ),
            None => ("–".into(), "–".into()),
        };
        let _ = writeln!(
            rows,
            "| {feature} | {request} | {:.0} | {} | {} | {cpu_ratio} | {rps_ratio} |",
            x.fixed.rps(),
            pair(q(x, 0.5), q(x, 0.99)),
            cpu(x.cpu_us),
        );
    };
    // The rows of the LLM-layer rounds, each beside the plain route with
    // the same shape of request.
    for c in &r.cases {
        let Some(x) = &c.point else { continue };
        let plain = r
            .cases
            .iter()
            .find(|b| {
                b.target == "sluice"
                    && b.shape.bytes == c.shape.bytes
                    && b.shape.model_last == c.shape.model_last
            })
            .or_else(|| {
                r.cases
                    .iter()
                    .find(|b| b.target == "sluice" && b.shape.bytes == c.shape.bytes)
            })
            .and_then(|b| b.point.as_ref());
        row(c.feature, crate::case_label(&c.shape), x, plain);
    }
    // Features measured in the main rounds, at the same connection count.
    let body = format!("{}-byte body (main rounds)", r.plan.chat_bytes);
    let base = plain_main.and_then(|t| point(t, conns));
    for (name, feature) in [
        ("sluice-no-usage", "usage observation off"),
        ("sluice-local-limit", "request limit (per process)"),
        ("sluice-shared-limit", "request limit (Redis)"),
        ("sluice-traced", "every request traced"),
    ] {
        if let Some(x) = find(name).and_then(|t| point(t, conns)) {
            row(feature, body.clone(), x, base);
        }
    }
    // Usage injection acts on streams: CPU per stream against the plain
    // route's in the streaming phase.
    let inject = find("sluice-usage-inject").and_then(|t| t.stream_cpu_us.zip(t.streams.as_ref()));
    if rows.is_empty() && inject.is_none() {
        return;
    }
    let _ = writeln!(
        out,
        "\n### The LLM layer's own cost\n\nEach row is a sluice route with one feature on, \
         measured at {conns} connections beside the plain route with the same requests (rounds of \
         their own for the first rows, the main rounds for the rest); the ratios are to that plain \
         route. Model routing reads the body up to the model and rewrites it; with the model last, \
         the scanner reads the whole body. The token limit (never refusing) estimates each \
         request's tokens from its body and settles against the reported usage.\n\n\
         | feature | request | requests/s | p50 / p99 µs | CPU µs per request | CPU ÷ plain | requests/s ÷ plain |\n\
         |---|---|---:|---:|---:|---:|---:|"
    );
    out.push_str(&rows);
    if let Some((cpu_inject, streams)) = inject {
        let plain = plain_main.and_then(|t| t.stream_cpu_us);
        let _ = writeln!(
            out,
            "\nUsage injection (`[routes.usage] inject = \"always\"`): {:.0} µs of CPU per stream \
             of {} chunks against the plain route's {} ({} ×), {} streams, {} failed.",
            cpu_inject,
            r.plan.chunks,
            cpu(plain),
            plain.map_or("–".into(), |p| ratio(cpu_inject, p)),
            streams.requests,
            streams.failed,
        );
    }
}

/// What the optional targets are, for the request/response text.
fn extra_targets(all: &[&Target]) -> String {
    let mut out = String::new();
    if all.iter().any(|t| t.name == "sluice-models") {
        out.push_str(
            " `sluice-models` is a second sluice whose route reads the body's `model` and \
             rewrites it through `[models]` (`--model-routing`).",
        );
    }
    if all.iter().any(|t| t.name == "sluice-no-usage") {
        out.push_str(
            " `sluice-no-usage` is the plain route with usage reading off \
             (`[routes.usage] observe = false`, `--usage-off`).",
        );
    }
    if all.iter().any(|t| t.name == "sluice-shared-limit") {
        out.push_str(
            " `sluice-local-limit` and `sluice-shared-limit` have a request limit that never \
             refuses, per process and in Redis (`shared = true`, `--shared-limit`).",
        );
    }
    if all.iter().any(|t| t.name == "sluice-traced") {
        out.push_str(
            " `sluice-traced` is the plain route with every request traced and exported \
             (`[telemetry.otlp]`, `sample_ratio = 1.0`, `--trace`; the OTLP posts go to the mock).",
        );
    }
    if all
        .iter()
        .any(|t| t.name == "litellm" || t.name == "portkey")
    {
        out.push_str(
            " `litellm` is LiteLLM's proxy (one uvicorn worker, a `model_list` entry for the mock, \
             a master key) and `portkey` Portkey's gateway (one Node process, the upstream and its \
             key in an `x-portkey-config` header), each pinned like the others, with its own \
             retries at their defaults (LiteLLM: 2; Portkey: none) (`--gateways`, installed by \
             `bench/install-gateways.sh`).",
        );
    }
    if all.iter().any(|t| t.name == "baseline") {
        out.push_str(" `baseline` is an earlier sluice build on the plain route (`--baseline`).");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{histogram, Fixed};

    fn point(rounds: &[(u64, u64)]) -> Point {
        let fixed = Fixed {
            requests: 0,
            errors: 0,
            seconds: 1.0,
            latency: histogram(),
        };
        let mut p = Point::new(1, fixed, None);
        p.rounds = rounds.to_vec();
        p
    }

    fn held(before: u64, steps: Vec<crate::HeldStep>) -> Target {
        Target {
            name: "x",
            shape: crate::client::Shape::default(),
            everywhere: true,
            points: vec![],
            streams: None,
            idle_rss_kib: Some(before),
            held: Some((before, steps)),
            stream_cpu_us: None,
        }
    }

    #[test]
    fn memory_per_stream_counts_the_streams_actually_open() {
        // All open: the slope between the steps.
        let t = held(1000, vec![(2000, 11_000, 0), (8000, 41_000, 0)]);
        assert_eq!(per_stream_kib(&t), Some(5.0));
        // Some failed at the last step: over the 7,000 open.
        let t = held(1000, vec![(2000, 11_000, 0), (8000, 36_000, 1000)]);
        assert_eq!(per_stream_kib(&t), Some(5.0));
        // None open at the last step, 500 at the first: from idle to it.
        let t = held(1000, vec![(2000, 3500, 1500), (8000, 9000, 8600)]);
        assert_eq!(per_stream_kib(&t), Some(5.0));
        assert_eq!(open_at(&(8000, 9000, 8600)), 0);
        // Nothing ever open: no figure.
        assert_eq!(per_stream_kib(&held(1000, vec![(10, 1000, 10)])), None);
    }

    #[test]
    fn round_ratios_pair_each_round_with_its_own_direct_run() {
        let d = point(&[(10, 100), (10, 200), (10, 100)]);
        let s = point(&[(20, 150), (20, 300), (20, 400)]);
        let n = point(&[(20, 200), (20, 300), (20, 200)]);
        // (150-100)/(200-100), (300-200)/(300-200), (400-100)/(200-100)
        assert_eq!(round_ratios(&d, &s, &n), "0.50 · 1.00 · 3.00 (median 1.00)");
        let even = point(&[(20, 150), (20, 300)]);
        assert_eq!(round_ratios(&d, &even, &n), "0.50 · 1.00 (median 0.75)");
        // A round where nginx added nothing has no ratio.
        assert_eq!(round_ratios(&d, &s, &point(&[(1, 100)])), "–");
    }
}
