//! sluice-bench: what sluice costs against the direct path and nginx, on one
//! machine over loopback. `bench/run.sh` is the one command; see
//! BENCHMARKS.md for the method.

mod charts;
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

use client::Shape;
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
        /// The route has the token limit of `sluice-token-limit`.
        #[arg(long)]
        token_limit: bool,
        /// The route injects usage into streams, as `sluice-usage-inject`.
        #[arg(long)]
        usage_inject: bool,
        /// The access log off, as `sluice-nolog`.
        #[arg(long)]
        logs_off: bool,
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
    /// Draws the charts again from a run's JSON (`--json`), into `dir`:
    /// after a change to the charts, without running again.
    Charts {
        #[arg(long)]
        json: PathBuf,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Closed-loop load against `addr` for `seconds` (after 1 s of
    /// warm-up), printing requests/s, p50 and p99: for profiling one target
    /// by hand (BENCHMARKS.md, Profiling).
    Load {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 32)]
        conns: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
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
    /// Also run sluice and nginx with their access logs off, as targets
    /// `sluice-nolog` and `nginx-nolog`, in the same rounds.
    #[arg(long)]
    logs_off: bool,
    /// The LLM layer's own cost: model routing (600-byte and 100 KiB
    /// bodies, model first and last), a token-limited route, and usage
    /// injection on streams, each as a ratio to the plain route with the
    /// same requests, in rounds of their own at `--llm-conns` connections.
    #[arg(long)]
    llm_layer: bool,
    /// Also run the LLM gateways bench/install-gateways.sh installed
    /// (LiteLLM, Portkey) as targets `litellm` and `portkey`; each that is
    /// missing is skipped with a line saying so.
    #[arg(long)]
    gateways: bool,
    /// Where bench/install-gateways.sh put them.
    #[arg(long, default_value = "target/gateways")]
    gateways_dir: PathBuf,
    /// Connections of the LLM-layer rounds [default: 32].
    #[arg(long, default_value_t = 32)]
    llm_conns: usize,
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

    /// CPU per answered request from the ticks summed over the rounds.
    fn per_request(&mut self, ticks_per_second: u64) {
        let per = |c: u64| c as f64 / ticks_per_second as f64 * 1e6 / self.fixed.requests as f64;
        let answered = self.fixed.requests > 0;
        self.cpu_us = self.cpu_ticks.filter(|_| answered).map(per);
        self.store_cpu_us = self.store_ticks.filter(|_| answered).map(per);
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
    /// How its requests differ (a gateway's headers).
    pub shape: Shape,
    /// Measured in the request/response rounds and held streams (not only
    /// in the streaming phase).
    pub everywhere: bool,
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

/// One row of the LLM-layer table: a sluice route with a feature on, or
/// the plain route, with one kind of request.
pub struct Case {
    /// The sluice target that serves it.
    pub target: &'static str,
    /// What the row shows, e.g. "model routing".
    pub feature: &'static str,
    pub shape: Shape,
    pub point: Option<Point>,
}

pub struct Results {
    pub plan: Plan,
    /// The gateways that ran, with their versions.
    pub gateways: Vec<(&'static str, String)>,
    /// The LLM-layer rows (`--llm-layer`) and their connection count.
    pub cases: Vec<Case>,
    pub case_conns: usize,
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
            token_limit,
            usage_inject,
            logs_off,
        }) => {
            let mut config = procs::sluice_config(listen, upstream);
            if model_routing {
                config = procs::model_routed(&config);
            }
            if token_limit {
                config += procs::TOKEN_LIMIT;
            }
            if usage_inject {
                config = procs::usage_injected(&config);
            }
            if logs_off {
                config = procs::logs_off(&config);
            }
            print!("{config}");
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
        Some(Cmd::Charts { json, dir }) => {
            let drawn = std::fs::read_to_string(&json)
                .map_err(|e| format!("{}: {e}", json.display()))
                .and_then(|text| {
                    let value = serde_json::from_str(&text)
                        .map_err(|e| format!("{}: {e}", json.display()))?;
                    charts::write(&charts::results_from_json(&value)?, &dir)
                });
            return match drawn {
                Ok(paths) => {
                    for p in paths {
                        println!("wrote {}", p.display());
                    }
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sluice-bench charts: {e}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Some(Cmd::Load {
            addr,
            conns,
            seconds,
        }) => {
            let window = Window::after(Duration::from_secs(1), Duration::from_secs(seconds));
            let f = runtime.block_on(load::closed_loop(
                addr,
                &Shape::default(),
                conns,
                Duration::ZERO,
                window,
            ));
            let (p50, p99) = p50_p99(&f);
            println!(
                "{:.0} requests/s, p50 {p50} µs, p99 {p99} µs, {} errors",
                f.rps(),
                f.errors
            );
            return std::process::ExitCode::SUCCESS;
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
    let started = machine.started;
    let say = |s: &str| eprintln!("[{:>6.1}s] {s}", started.elapsed().as_secs_f64());

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
    // A sluice on the plain config as `edit` changes it, on a port of its
    // own, its config and log named after it.
    let variant = |program: &Path, name: &'static str, edit: &dyn Fn(String) -> String| {
        let addr = procs::free_addr().map_err(err)?;
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, edit(procs::sluice_config(addr, mock.addr))).map_err(err)?;
        start_with(program, name, &path, addr, &format!("{name}.log"))
    };
    let mut proxies = vec![start_sluice("sluice.log")?];
    if args.model_routing || args.llm_layer {
        proxies.push(variant(&sluice, "sluice-models", &|c| {
            procs::model_routed(&c)
        })?);
    }
    if args.llm_layer {
        proxies.push(variant(&sluice, "sluice-token-limit", &|c| {
            c + procs::TOKEN_LIMIT
        })?);
        proxies.push(variant(&sluice, "sluice-usage-inject", &|c| {
            procs::usage_injected(&c)
        })?);
    }
    if args.usage_off {
        proxies.push(variant(&sluice, "sluice-no-usage", &|c| {
            c + "[routes.usage]\nobserve = false\n"
        })?);
    }
    if args.trace {
        let otlp = format!(
            "\n[telemetry.otlp]\nendpoint = \"http://{}\"\nsample_ratio = 1.0\n",
            mock.addr
        );
        proxies.push(variant(&sluice, "sluice-traced", &|c| c + &otlp)?);
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
        let store = format!(
            "shared = true\n\n[rate_limit_store]\nurl = \"redis://{}/0\"\n",
            redis.addr
        );
        proxies.push(variant(&sluice, "sluice-local-limit", &|c| c + limit)?);
        proxies.push(variant(&sluice, "sluice-shared-limit", &|c| {
            c + limit + &store
        })?);
        Some(redis)
    } else {
        None
    };
    if let Some(base) = &args.baseline {
        if !base.is_file() {
            return Err(format!("no sluice binary at {}", base.display()));
        }
        proxies.push(variant(base, "baseline", &|c| c)?);
    }
    if args.logs_off {
        proxies.push(variant(&sluice, "sluice-nolog", &|c| procs::logs_off(&c))?);
    }
    if let Some(nginx) = &nginx {
        let modes: &[(&'static str, bool)] = if args.logs_off {
            &[("nginx", true), ("nginx-nolog", false)]
        } else {
            &[("nginx", true)]
        };
        for &(name, access_log) in modes {
            let nginx_addr = procs::free_addr().map_err(err)?;
            // Each nginx its own prefix: pid file, logs and temp paths.
            let prefix = dir.join(name);
            std::fs::create_dir_all(&prefix).map_err(err)?;
            let conf = prefix.join("nginx.conf");
            let text = procs::nginx_config(&prefix, nginx_addr, mock.addr, access_log);
            std::fs::write(&conf, text).map_err(err)?;
            proxies.push(
                Proc::start(Spawn {
                    name,
                    program: nginx,
                    args: vec![
                        "-p".into(),
                        prefix.display().to_string(),
                        "-c".into(),
                        conf.display().to_string(),
                        "-e".into(),
                        prefix.join("error.log").display().to_string(),
                    ],
                    env: vec![],
                    cpu: proxy_cpu,
                    log: prefix.join("nginx.out"),
                    addr: nginx_addr,
                })
                .map_err(err)?,
            );
        }
    }
    // Headers each gateway needs on its requests.
    let mut shapes: Vec<(&'static str, Shape)> = Vec::new();
    let mut gateway_versions = Vec::new();
    if args.gateways {
        let found = [
            ("litellm", {
                let addr = procs::free_addr().map_err(err)?;
                procs::litellm(&args.gateways_dir, &dir, addr, mock.addr).map(|g| (g, addr))
            }),
            ("portkey", {
                let addr = procs::free_addr().map_err(err)?;
                procs::portkey(&args.gateways_dir, addr, mock.addr).map(|g| (g, addr))
            }),
        ];
        for (name, gateway) in found {
            let Some((g, addr)) = gateway else {
                say(&format!(
                    "{name}: not installed under {} (bench/install-gateways.sh), skipped",
                    args.gateways_dir.display()
                ));
                continue;
            };
            say(&format!("{name} {}: starting", g.version));
            let started = Proc::start(Spawn {
                name: g.name,
                program: &g.program,
                args: g.args.clone(),
                env: g.env.clone(),
                cpu: proxy_cpu,
                log: dir.join(format!("{name}.log")),
                addr,
            });
            match started {
                Ok(p) => {
                    proxies.push(p);
                    shapes.push((
                        g.name,
                        Shape {
                            headers: g.headers.clone(),
                            ..Shape::default()
                        },
                    ));
                    gateway_versions.push((g.name, g.version.clone()));
                }
                Err(e) => say(&format!("{name}: did not start, skipped: {e}")),
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));

    // Targets only the LLM-layer rounds measure.
    let llm_only = |name: &str| {
        name == "sluice-token-limit" || (name == "sluice-models" && !args.model_routing)
    };
    let mut targets = vec![Target {
        name: "direct",
        shape: Shape::default(),
        everywhere: true,
        points: vec![],
        streams: None,
        idle_rss_kib: None,
        held: None,
        stream_cpu_us: None,
    }];
    for p in proxies.iter().filter(|p| !llm_only(p.name)) {
        targets.push(Target {
            name: p.name,
            shape: shapes
                .iter()
                .find(|s| s.0 == p.name)
                .map(|s| s.1.clone())
                .unwrap_or_default(),
            // Usage injection acts on streams only.
            everywhere: p.name != "sluice-usage-inject",
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
            for t in targets.iter_mut().filter(|t| t.everywhere) {
                say(&format!("{}: {conns} connections, round {round}", t.name));
                let window = Window::after(plan.warmup, plan.measure);
                let p = proc_of(t.name);
                // Redis serves only the shared-limit sluice.
                let store = redis.as_ref().filter(|_| t.name == "sluice-shared-limit");
                let (fixed, ticks_used, store_used) = measure(
                    runtime,
                    load::closed_loop(addr_of(t.name), &t.shape, conns, Duration::ZERO, window),
                    window,
                    p,
                    store,
                );
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
                p.per_request(ticks);
            }
        }
    }

    // The LLM layer: each feature against the plain route with the same
    // requests, in rounds of their own.
    let mut cases = if args.llm_layer { llm_cases() } else { vec![] };
    let conns = args.llm_conns.max(1);
    for round in 1..=plan.rounds {
        for c in cases.iter_mut() {
            let window = Window::after(plan.warmup, plan.measure);
            let (fixed, used, _) = measure(
                runtime,
                load::closed_loop(addr_of(c.target), &c.shape, conns, Duration::ZERO, window),
                window,
                proc_of(c.target),
                None,
            );
            let (p50, p99) = p50_p99(&fixed);
            say(&format!(
                "{} ({}), {conns} connections, round {round}: {:.0} requests/s, p50 {p50} µs, p99 {p99} µs",
                c.target,
                case_label(&c.shape),
                fixed.rps(),
            ));
            match &mut c.point {
                Some(p) => p.merge(fixed, used),
                None => c.point = Some(Point::new(conns, fixed, used)),
            }
        }
    }
    for c in cases.iter_mut() {
        if let Some(p) = &mut c.point {
            p.per_request(ticks);
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
            &t.shape,
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

    for t in targets
        .iter_mut()
        .filter(|t| t.name != "direct" && t.everywhere)
    {
        let p = proc_of(t.name).expect("proxy");
        let before = p.rss_kib();
        let mut at = vec![];
        runtime.block_on(async {
            let mut held = Held::new();
            for &n in &plan.held {
                let more = n.saturating_sub(held.len());
                say(&format!("{}: holding {n} streams", t.name));
                held.open(p.addr, &t.shape, more, Duration::from_secs(120))
                    .await;
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
    // The gateways are done with (their held streams come last); Portkey
    // keeps a stream's upstream going after its client left, so stopping
    // it ends them before the soak.
    for p in proxies
        .iter_mut()
        .filter(|p| gateway_versions.iter().any(|(n, _)| *n == p.name))
    {
        p.stop();
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
        gateways: gateway_versions,
        cases,
        case_conns: conns,
        machine,
        targets,
        soak,
    };
    let text = report::markdown(&results);
    println!("{text}");
    if let Some(out) = &args.out {
        report::write_into(out, &text).map_err(|e| format!("{}: {e}", out.display()))?;
        // The charts go next to the markdown that shows them.
        let dir = out.parent().filter(|d| !d.as_os_str().is_empty());
        for chart in charts::write(&results, dir.unwrap_or(Path::new(".")))? {
            say(&format!("wrote {}", chart.display()));
        }
    }
    if let Some(json) = &args.json {
        std::fs::write(json, report::json(&results).to_string())
            .map_err(|e| format!("{}: {e}", json.display()))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Runs `load` over `window` while reading the proxy's (and the store's)
/// CPU clock at the window's edges.
fn measure(
    runtime: &tokio::runtime::Runtime,
    load: impl std::future::Future<Output = Fixed>,
    window: Window,
    proxy: Option<&Proc>,
    store: Option<&Proc>,
) -> (Fixed, Option<u64>, Option<u64>) {
    let (fixed, ((c0, c1), (r0, r1))) = runtime.block_on(async {
        let sampler = async {
            tokio::time::sleep_until(window.start).await;
            let a = (proxy.map(Proc::cpu_ticks), store.map(Proc::cpu_ticks));
            tokio::time::sleep_until(window.end).await;
            let b = (proxy.map(Proc::cpu_ticks), store.map(Proc::cpu_ticks));
            ((a.0, b.0), (a.1, b.1))
        };
        tokio::join!(load, sampler)
    });
    let used = |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| b.saturating_sub(a));
    (fixed, used(c0, c1), used(r0, r1))
}

/// The LLM-layer rows: model routing with small and large bodies, the
/// model first or last (the scanner stops at the model, or reads the
/// whole body), and a token limit, each beside the plain route with the
/// same body.
pub fn llm_cases() -> Vec<Case> {
    let case = |target, feature, bytes: usize, model_last| Case {
        target,
        feature,
        shape: Shape {
            bytes: Some(bytes),
            model_last,
            ..Shape::default()
        },
        point: None,
    };
    let (small, large) = (600, 100 * 1024);
    vec![
        case("sluice", "plain route", small, false),
        case("sluice-models", "model routing", small, false),
        case("sluice-models", "model routing", small, true),
        case("sluice-token-limit", "token limit", small, false),
        case("sluice", "plain route", large, false),
        case("sluice-models", "model routing", large, false),
        case("sluice-models", "model routing", large, true),
        case("sluice-token-limit", "token limit", large, false),
    ]
}

/// "600-byte body, model first".
pub fn case_label(shape: &Shape) -> String {
    let bytes = shape.bytes.unwrap_or(client::BASE_LEN);
    let size = if bytes >= 1024 {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes}-byte")
    };
    format!(
        "{size} body, model {}",
        if shape.model_last { "last" } else { "first" }
    )
}

/// Moderate mixed load for `plan.soak`: 8 connections pacing requests 1 ms
/// apart, and 20 streams at a time; RSS sampled throughout.
async fn soak(p: &Proc, plan: &Plan) -> Soak {
    let window = Window::after(Duration::ZERO, plan.soak);
    let started = Instant::now();
    let requests = tokio::spawn(load::closed_loop(
        p.addr,
        &Shape::default(),
        8,
        Duration::from_millis(1),
        window,
    ));
    let streams = tokio::spawn(load::streams(
        p.addr,
        &Shape::default(),
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
