//! sluice-bench: what sluice costs against the direct path and nginx, on one
//! machine over loopback. `bench/run.sh` is the one command; see
//! BENCHMARKS.md for the method.

mod client;
mod load;
mod mock;
mod procs;
mod report;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::time::Instant;

use load::{Fixed, Held, Streams, Window};
use procs::{Proc, Spawn};

#[derive(Parser)]
#[command(version, about = "Benchmarks sluice against the direct path and nginx")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the mock OpenAI upstream (the benchmark starts its own).
    Mock {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Print the run's sluice config (bench/instructions.sh uses it).
    Config {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        upstream: SocketAddr,
        /// The route reads the body's model, as with `--model-routing`.
        #[arg(long)]
        model_routing: bool,
    },
    /// Send `count` chat requests one after another on one connection;
    /// fails on the first that is not a 200.
    Send {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: u64,
        /// Pad the chat request's body to this many bytes.
        #[arg(long)]
        chat_bytes: Option<usize>,
        /// Ask for an event stream of this many chunks (then a usage chunk
        /// and `[DONE]`) instead of a JSON answer.
        #[arg(long)]
        stream_chunks: Option<u64>,
    },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// A few seconds of everything, to check the harness (CI runs this).
    #[arg(long)]
    smoke: bool,
    /// The sluice binary [default: `sluice` beside this binary].
    #[arg(long)]
    sluice: Option<PathBuf>,
    /// The nginx binary [default: nginx on PATH or in /usr/sbin, if any].
    #[arg(long)]
    nginx: Option<PathBuf>,
    /// Leave nginx out even if it is installed.
    #[arg(long)]
    no_nginx: bool,
    /// Write the results into this markdown file, between its markers
    /// (the whole file if it has none).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the raw figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seconds of measurement per load point.
    #[arg(long)]
    seconds: Option<u64>,
    /// Rounds over all targets per load point, merged [default: 3].
    #[arg(long)]
    rounds: Option<usize>,
    /// Soak length in seconds [default: 300].
    #[arg(long)]
    soak: Option<u64>,
    /// Open streams to hold for the memory figures, comma-separated.
    #[arg(long, value_delimiter = ',')]
    held: Option<Vec<usize>>,
    /// Connection counts of the request/response points, comma-separated
    /// [default: 1,32,256].
    #[arg(long, value_delimiter = ',')]
    conns: Option<Vec<usize>>,
    /// Also run a second sluice, `sluice-models`, whose route has
    /// model_routing (the body's model read and rewritten through
    /// `[models]`), measured in the same rounds as the plain one.
    #[arg(long)]
    model_routing: bool,
    /// Also run this sluice binary (an earlier build) on the plain route,
    /// as target `baseline`, measured in the same rounds: an A/B of two
    /// builds on a shared machine.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Pad the chat request's body to this many bytes (default: about 200).
    #[arg(long)]
    chat_bytes: Option<usize>,
    /// Also run a sluice whose route does not read usage
    /// (`[routes.usage] observe = false`), as target `sluice-no-usage`, in
    /// the same rounds: what reading usage costs.
    #[arg(long)]
    usage_off: bool,
    /// Also run two sluices whose route has a request limit that never
    /// refuses: `sluice-local-limit` (per process) and `sluice-shared-limit`
    /// (`shared = true`, on a `redis-server` started for the run, whose CPU
    /// is measured too): what keeping the bucket in Redis costs.
    #[arg(long)]
    shared_limit: bool,
    /// Also run a sluice that traces every request (`[telemetry.otlp]`,
    /// `sample_ratio = 1.0`), exporting to the mock (which answers the
    /// OTLP posts with 200), as target `sluice-traced`: what tracing costs.
    #[arg(long)]
    trace: bool,
}

/// What one run measures.
pub struct Plan {
    pub smoke: bool,
    /// The chat request body's length.
    pub chat_bytes: usize,
    pub conns: Vec<usize>,
    pub rounds: usize,
    pub warmup: Duration,
    pub measure: Duration,
    pub streams: usize,
    pub chunks: u64,
    pub interval_ms: u64,
    pub stream_time: Duration,
    pub held: Vec<usize>,
    pub soak: Duration,
    pub soak_sample: Duration,
}

impl Plan {
    fn from(args: &RunArgs) -> Plan {
        let mut plan = if args.smoke {
            Plan {
                smoke: true,
                chat_bytes: client::BASE_LEN,
                conns: vec![1, 8],
                rounds: 1,
                warmup: Duration::from_millis(200),
                measure: Duration::from_secs(1),
                streams: 20,
                chunks: 5,
                interval_ms: 10,
                stream_time: Duration::from_millis(200),
                held: vec![50, 100],
                soak: Duration::from_secs(3),
                soak_sample: Duration::from_secs(1),
            }
        } else {
            Plan {
                smoke: false,
                chat_bytes: client::BASE_LEN,
                conns: vec![1, 32, 256],
                rounds: 3,
                warmup: Duration::from_secs(1),
                measure: Duration::from_secs(5),
                streams: 200,
                chunks: 20,
                interval_ms: 10,
                stream_time: Duration::from_secs(5),
                held: vec![2000, 8000],
                soak: Duration::from_secs(300),
                soak_sample: Duration::from_secs(10),
            }
        };
        if let Some(s) = args.seconds {
            plan.measure = Duration::from_secs(s);
        }
        if let Some(r) = args.rounds {
            plan.rounds = r.max(1);
        }
        if let Some(s) = args.soak {
            plan.soak = Duration::from_secs(s);
        }
        if let Some(h) = &args.held {
            plan.held = h.clone();
        }
        if let Some(n) = args.chat_bytes {
            plan.chat_bytes = n.max(client::BASE_LEN);
        }
        if let Some(c) = &args.conns {
            plan.conns = c.iter().copied().filter(|&c| c > 0).collect();
        }
        plan
    }
}

/// One load point against one target.
pub struct Point {
    pub conns: usize,
    pub fixed: Fixed,
    /// The proxy's CPU clock ticks over the measured windows.
    pub cpu_ticks: Option<u64>,
    /// Proxy CPU per answered request, µs (none for the direct path).
    pub cpu_us: Option<f64>,
    /// Each round's p50 and p99 latency, µs, in order.
    pub rounds: Vec<(u64, u64)>,
    /// The shared store's (Redis's) CPU clock ticks over the same windows.
    pub store_ticks: Option<u64>,
    /// Redis CPU per answered request, µs.
    pub store_cpu_us: Option<f64>,
}

impl Point {
    fn new(conns: usize, fixed: Fixed, cpu_ticks: Option<u64>) -> Point {
        let rounds = vec![p50_p99(&fixed)];
        Point {
            conns,
            fixed,
            cpu_ticks,
            cpu_us: None,
            rounds,
            store_ticks: None,
            store_cpu_us: None,
        }
    }

    fn merge(&mut self, more: Fixed, ticks: Option<u64>) {
        self.rounds.push(p50_p99(&more));
        self.fixed.requests += more.requests;
        self.fixed.errors += more.errors;
        self.fixed.seconds += more.seconds;
        self.fixed.latency.add(more.latency).expect("same bounds");
        self.cpu_ticks = self.cpu_ticks.zip(ticks).map(|(a, b)| a + b);
    }

    fn add_store_ticks(&mut self, ticks: Option<u64>) {
        if let Some(t) = ticks {
            self.store_ticks = Some(self.store_ticks.unwrap_or(0) + t);
        }
    }
}

/// A round's p50 and p99 latency, µs.
fn p50_p99(f: &Fixed) -> (u64, u64) {
    (
        f.latency.value_at_quantile(0.5),
        f.latency.value_at_quantile(0.99),
    )
}

pub struct Target {
    pub name: &'static str,
    pub points: Vec<Point>,
    pub streams: Option<Streams>,
    pub idle_rss_kib: Option<u64>,
    /// RSS before opening streams, then each step.
    pub held: Option<(u64, Vec<HeldStep>)>,
    /// The proxy's CPU per stream in the streaming phase, µs.
    pub stream_cpu_us: Option<f64>,
}

/// Streams open, the proxy's RSS in KiB, streams failed so far.
pub type HeldStep = (usize, u64, u64);

pub struct Soak {
    pub samples: Vec<(f64, u64)>,
    pub requests: u64,
    pub errors: u64,
    pub streams: u64,
    pub stream_failures: u64,
    pub chunks_lost: u64,
}

pub struct Results {
    pub plan: Plan,
    pub machine: report::Machine,
    pub targets: Vec<Target>,
    pub soak: Option<Soak>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match cli.command {
        Some(Cmd::Config {
            listen,
            upstream,
            model_routing,
        }) => {
            let config = procs::sluice_config(listen, upstream);
            print!(
                "{}",
                if model_routing {
                    procs::model_routed(&config)
                } else {
                    config
                }
            );
            return std::process::ExitCode::SUCCESS;
        }
        Some(Cmd::Send {
            addr,
            count,
            chat_bytes,
            stream_chunks,
        }) => {
            if let Some(n) = chat_bytes {
                client::pad_chat_to(n);
            }
            return match runtime.block_on(load::one_by_one(addr, count, stream_chunks)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sluice-bench send: {e}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Some(Cmd::Mock { .. }) | None => {}
    }
    if let Some(Cmd::Mock { listen }) = cli.command {
        return runtime.block_on(async {
            let listener = match tokio::net::TcpListener::bind(listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("mock: cannot listen on {listen}: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            println!("mock listening on {}", listener.local_addr().expect("addr"));
            mock::serve(listener).await;
            std::process::ExitCode::SUCCESS
        });
    }
    match run(&runtime, cli.run) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(runtime: &tokio::runtime::Runtime, args: RunArgs) -> Result<(), String> {
    let plan = Plan::from(&args);
    if let Some(n) = args.chat_bytes {
        client::pad_chat_to(n);
    }
    let cpu_count = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpus = procs::cpus();
    let (proxy_cpu, load_cpu) = match cpus {
        Some((p, l)) => (Some(p), Some(l)),
        None => (None, None),
    };
    if let Some(cpu) = load_cpu {
        procs::pin_self(cpu).map_err(|e| format!("cannot pin to CPU {cpu}: {e}"))?;
    }
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let sluice = args
        .sluice
        .clone()
        .unwrap_or_else(|| me.with_file_name("sluice"));
    if !sluice.is_file() {
        return Err(format!(
            "no sluice binary at {} (build it, or pass --sluice)",
            sluice.display()
        ));
    }
    let nginx = (!args.no_nginx)
        .then(|| procs::find_nginx(args.nginx.clone()))
        .flatten();
    let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let machine = report::Machine::read(&sluice, nginx.as_deref(), cpu_count, cpus);
    let say = |s: &str| eprintln!("[{:>6.1}s] {s}", machine.started.elapsed().as_secs_f64());

    let err = |e: std::io::Error| e.to_string();
    let mock_addr = procs::free_addr().map_err(err)?;
    let mock = Proc::start(Spawn {
        name: "mock",
        program: &me,
        args: vec!["mock".into(), "--listen".into(), mock_addr.to_string()],
        env: vec![],
        cpu: load_cpu,
        log: dir.join("mock.log"),
        addr: mock_addr,
    })
    .map_err(err)?;

    let sluice_addr = procs::free_addr().map_err(err)?;
    let config = dir.join("sluice.toml");
    std::fs::write(&config, procs::sluice_config(sluice_addr, mock.addr)).map_err(err)?;
    let start_with =
        |program: &Path, name: &'static str, config: &Path, addr: SocketAddr, log: &str| {
            Proc::start(Spawn {
                name,
                program,
                args: vec!["--config".into(), config.display().to_string()],
                env: vec![("SLUICE_BENCH_KEY", "sk-bench-not-a-real-key".into())],
                cpu: proxy_cpu,
                log: dir.join(log),
                addr,
            })
            .map_err(err)
        };
    let start = |name, config: &Path, addr, log: &str| start_with(&sluice, name, config, addr, log);
    let start_sluice = |log: &str| start("sluice", &config, sluice_addr, log);
    let mut proxies = vec![start_sluice("sluice.log")?];
    if args.model_routing {
        let addr = procs::free_addr().map_err(err)?;
        let routed = dir.join("sluice-models.toml");
        let toml = procs::model_routed(&procs::sluice_config(addr, mock.addr));
        std::fs::write(&routed, toml).map_err(err)?;
        proxies.push(start("sluice-models", &routed, addr, "sluice-models.log")?);
    }
    if args.usage_off {
        let addr = procs::free_addr().map_err(err)?;
        let off = dir.join("sluice-no-usage.toml");
        let toml = procs::sluice_config(addr, mock.addr) + "[routes.usage]\nobserve = false\n";
        std::fs::write(&off, toml).map_err(err)?;
        proxies.push(start("sluice-no-usage", &off, addr, "sluice-no-usage.log")?);
    }
    if args.trace {
        let addr = procs::free_addr().map_err(err)?;
        let path = dir.join("sluice-traced.toml");
        let toml = procs::sluice_config(addr, mock.addr)
            + &format!(
                "\n[telemetry.otlp]\nendpoint = \"http://{}\"\nsample_ratio = 1.0\n",
                mock.addr
            );
        std::fs::write(&path, toml).map_err(err)?;
        proxies.push(start("sluice-traced", &path, addr, "sluice-traced.log")?);
    }
    let redis = if args.shared_limit {
        let addr = procs::free_addr().map_err(err)?;
        let port = addr.port().to_string();
        let redis = Proc::start(Spawn {
            name: "redis",
            program: Path::new("redis-server"),
            args: [
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .map(String::from)
            .to_vec(),
            env: vec![],
            cpu: load_cpu,
            log: dir.join("redis.log"),
            addr,
        })
        .map_err(|e| format!("{e} (install Debian's redis-server)"))?;
        let limit = "[routes.rate_limit]\nrequests_per_minute = 600000000\nburst = 1000000\n";
        for (name, shared) in [("sluice-local-limit", false), ("sluice-shared-limit", true)] {
            let addr = procs::free_addr().map_err(err)?;
            let path = dir.join(format!("{name}.toml"));
            let mut toml = procs::sluice_config(addr, mock.addr) + limit;
            if shared {
                toml += &format!(
                    "shared = true\n\n[rate_limit_store]\nurl = \"redis://{}/0\"\n",
                    redis.addr
                );
            }
            std::fs::write(&path, toml).map_err(err)?;
            proxies.push(start(name, &path, addr, &format!("{name}.log"))?);
        }
        Some(redis)
    } else {
        None
    };
    if let Some(base) = &args.baseline {
        if !base.is_file() {
            return Err(format!("no sluice binary at {}", base.display()));
        }
        let addr = procs::free_addr().map_err(err)?;
        let plain = dir.join("baseline.toml");
        std::fs::write(&plain, procs::sluice_config(addr, mock.addr)).map_err(err)?;
        proxies.push(start_with(base, "baseline", &plain, addr, "baseline.log")?);
    }
    if let Some(nginx) = &nginx {
        let nginx_addr = procs::free_addr().map_err(err)?;
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, procs::nginx_config(&dir, nginx_addr, mock.addr)).map_err(err)?;
        proxies.push(
            Proc::start(Spawn {
                name: "nginx",
                program: nginx,
                args: vec![
                    "-p".into(),
                    dir.display().to_string(),
                    "-c".into(),
                    conf.display().to_string(),
                    "-e".into(),
                    dir.join("error.log").display().to_string(),
                ],
                env: vec![],
                cpu: proxy_cpu,
                log: dir.join("nginx.out"),
                addr: nginx_addr,
            })
            .map_err(err)?,
        );
    }
    std::thread::sleep(Duration::from_millis(500));

    let mut targets = vec![Target {
        name: "direct",
        points: vec![],
        streams: None,
        idle_rss_kib: None,
        held: None,
        stream_cpu_us: None,
    }];
    for p in &proxies {
        targets.push(Target {
            name: p.name,
            points: vec![],
            streams: None,
            idle_rss_kib: Some(p.rss_kib()),
            held: None,
            stream_cpu_us: None,
        });
    }
    let addr_of = |name: &str| match name {
        "direct" => mock.addr,
        _ => proxies.iter().find(|p| p.name == name).expect("proxy").addr,
    };
    let proc_of = |name: &str| proxies.iter().find(|p| p.name == name);
    let ticks = procs::clock_ticks();

    // Request/response load: alternate targets at each point, round after
    // round, so drift on a shared machine touches all of them alike; the
    // rounds are merged.
    for &conns in &plan.conns {
        for round in 1..=plan.rounds {
            for t in targets.iter_mut() {
                say(&format!("{}: {conns} connections, round {round}", t.name));
                let window = Window::after(plan.warmup, plan.measure);
                let p = proc_of(t.name);
                // Redis serves only the shared-limit sluice.
                let store = redis.as_ref().filter(|_| t.name == "sluice-shared-limit");
                let (fixed, ((c0, c1), (r0, r1))) = runtime.block_on(async {
                    let sampler = async {
                        tokio::time::sleep_until(window.start).await;
                        let a = (p.map(Proc::cpu_ticks), store.map(Proc::cpu_ticks));
                        tokio::time::sleep_until(window.end).await;
                        let b = (p.map(Proc::cpu_ticks), store.map(Proc::cpu_ticks));
                        ((a.0, b.0), (a.1, b.1))
                    };
                    tokio::join!(
                        load::closed_loop(addr_of(t.name), conns, Duration::ZERO, window),
                        sampler
                    )
                });
                let ticks_used = c0.zip(c1).map(|(a, b)| b.saturating_sub(a));
                let store_used = r0.zip(r1).map(|(a, b)| b.saturating_sub(a));
                let (p50, p99) = p50_p99(&fixed);
                say(&format!(
                    "{}: {conns} connections, round {round}: {:.0} requests/s, p50 {p50} µs, p99 {p99} µs",
                    t.name,
                    fixed.rps(),
                ));
                let point = match t.points.iter().position(|p| p.conns == conns) {
                    Some(i) => {
                        t.points[i].merge(fixed, ticks_used);
                        &mut t.points[i]
                    }
                    None => {
                        t.points.push(Point::new(conns, fixed, ticks_used));
                        t.points.last_mut().expect("pushed")
                    }
                };
                point.add_store_ticks(store_used);
            }
        }
        for t in targets.iter_mut() {
            if let Some(p) = t.points.iter_mut().find(|p| p.conns == conns) {
                p.cpu_us = p
                    .cpu_ticks
                    .filter(|_| p.fixed.requests > 0)
                    .map(|c| c as f64 / ticks as f64 * 1e6 / p.fixed.requests as f64);
                p.store_cpu_us = p
                    .store_ticks
                    .filter(|_| p.fixed.requests > 0)
                    .map(|c| c as f64 / ticks as f64 * 1e6 / p.fixed.requests as f64);
            }
        }
    }

    for t in targets.iter_mut() {
        say(&format!(
            "{}: {} streams of {} chunks, {} ms apart",
            t.name, plan.streams, plan.chunks, plan.interval_ms
        ));
        let p = proc_of(t.name);
        let before = p.map(Proc::cpu_ticks);
        let streams = runtime.block_on(load::streams(
            addr_of(t.name),
            plan.streams,
            plan.chunks,
            plan.interval_ms,
            plan.stream_time,
        ));
        let used = before
            .zip(p.map(Proc::cpu_ticks))
            .map(|(a, b)| b.saturating_sub(a));
        t.stream_cpu_us = used
            .filter(|_| streams.requests > 0)
            .map(|c| c as f64 / ticks as f64 * 1e6 / streams.requests as f64);
        t.streams = Some(streams);
    }

    for t in targets.iter_mut().filter(|t| t.name != "direct") {
        let p = proc_of(t.name).expect("proxy");
        let before = p.rss_kib();
        let mut at = vec![];
        runtime.block_on(async {
            let mut held = Held::new();
            for &n in &plan.held {
                let more = n.saturating_sub(held.len());
                say(&format!("{}: holding {n} streams", t.name));
                held.open(p.addr, more, Duration::from_secs(120)).await;
                // Let every stream pass a chunk or two in steady state.
                tokio::time::sleep(Duration::from_millis(if plan.smoke { 300 } else { 3000 }))
                    .await;
                let failed = held.failed.load(std::sync::atomic::Ordering::Relaxed);
                at.push((n, p.rss_kib(), failed));
            }
            held.close().await;
            // Give the proxy a moment to see the closes.
            tokio::time::sleep(Duration::from_millis(500)).await;
        });
        t.held = Some((before, at));
    }

    // The soak gets a fresh sluice: the streams held above leave their
    // memory with the allocator, which would hide any growth.
    let soak = if plan.soak.is_zero() {
        None
    } else {
        proxies[0].stop();
        proxies[0] = start_sluice("sluice-soak.log")?;
        std::thread::sleep(Duration::from_millis(300));
        say(&format!(
            "sluice (restarted): soak for {} s",
            plan.soak.as_secs()
        ));
        Some(runtime.block_on(soak(&proxies[0], &plan)))
    };

    for p in proxies.iter_mut() {
        p.stop();
    }
    if let Some(mut r) = redis {
        r.stop();
    }
    drop(mock);
    let results = Results {
        plan,
        machine,
        targets,
        soak,
    };
    let text = report::markdown(&results);
    println!("{text}");
    if let Some(out) = &args.out {
        report::write_into(out, &text).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    if let Some(json) = &args.json {
        std::fs::write(json, report::json(&results).to_string())
            .map_err(|e| format!("{}: {e}", json.display()))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Moderate mixed load for `plan.soak`: 8 connections pacing requests 1 ms
/// apart, and 20 streams at a time; RSS sampled throughout.
async fn soak(p: &Proc, plan: &Plan) -> Soak {
    let window = Window::after(Duration::ZERO, plan.soak);
    let started = Instant::now();
    let requests = tokio::spawn(load::closed_loop(
        p.addr,
        8,
        Duration::from_millis(1),
        window,
    ));
    let streams = tokio::spawn(load::streams(
        p.addr,
        20,
        plan.chunks,
        plan.interval_ms,
        plan.soak,
    ));
    let mut samples = vec![(0.0, p.rss_kib())];
    let mut next = started;
    while Instant::now() < window.end {
        next += plan.soak_sample;
        tokio::time::sleep_until(next.min(window.end)).await;
        samples.push((started.elapsed().as_secs_f64(), p.rss_kib()));
    }
    let fixed = requests.await.expect("soak load");
    let s = streams.await.expect("soak streams");
    samples.push((started.elapsed().as_secs_f64(), p.rss_kib()));
    Soak {
        samples,
        requests: fixed.requests,
        errors: fixed.errors,
        streams: s.requests,
        stream_failures: s.failed,
        chunks_lost: s.chunks_expected - s.chunks_received,
    }
}
