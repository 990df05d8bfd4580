//! The `sluice` binary: parse the command line, load the config, serve.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::Config;

/// mimalloc: a proxied request's allocations cost less than half what they
/// cost with glibc's malloc (BENCHMARKS.md has the figures). Built with
/// `no_thp`: with transparent huge pages its arenas would double the idle
/// RSS. `--no-default-features` leaves it out (for DHAT).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A reverse-proxy sidecar for LLM APIs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Config file.
    #[arg(
        long,
        global = true,
        env = "SLUICE_CONFIG",
        default_value = "sluice.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and exit: 0 and "ok", or 1 and every error.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config, &|name| std::env::var(name).ok()) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("sluice: {} error(s) in the config", errors.len());
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Check) = cli.command {
        println!("ok");
        return ExitCode::SUCCESS;
    }
    sluice::logging::init(&config.log);
    sluice::systemd::raise_open_file_limit();
    // One CPU (pinned, or a 1-CPU cgroup quota: a typical sidecar) gets a
    // single-threaded runtime: no work-stealing, no cross-thread wakeups.
    // More CPUs get one worker each.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    // Access lines are written in one batch per turn of the event loop, just
    // before a worker waits for events (and when it stops). A panic aborts
    // the process (release profile): the panicking thread writes its lines
    // first (with one CPU, that is every line held).
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        sluice::access::stop_batching();
        report(info);
    }));
    builder
        .on_thread_park(sluice::access::flush_lines)
        .on_thread_stop(sluice::access::flush_lines);
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        // Handlers first: a signal before they exist would kill the process
        // with no drain (or, for SIGHUP, at all).
        use tokio::signal::unix::{signal, SignalKind};
        let signals = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        );
        let (Ok(term), Ok(int), Ok(hup)) = signals else {
            eprintln!("sluice: cannot install signal handlers");
            return ExitCode::FAILURE;
        };
        let listeners = match bind(&config).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let (reload_tx, reloads) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(reload_on_sighup(cli.config.clone(), hup, reload_tx));
        sluice::run(config, listeners, shutdown_signal(term, int), reloads).await;
        ExitCode::SUCCESS
    });
    // Tasks still open are dropped with the runtime, on this thread when it
    // is the only one: their lines are written at once from here on.
    sluice::access::stop_batching();
    drop(runtime);
    code
}

async fn bind(config: &Config) -> Result<sluice::Listeners, String> {
    let listen = |addr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))
    };
    let data = listen(config.server.listen).await?;
    let admin = match config.server.admin_listen {
        Some(addr) => Some(listen(addr).await?),
        None => None,
    };
    Ok(sluice::Listeners { data, admin })
}

/// Re-reads the config file on each SIGHUP and hands the result to the server.
async fn reload_on_sighup(
    path: PathBuf,
    mut hup: tokio::signal::unix::Signal,
    tx: tokio::sync::mpsc::UnboundedSender<sluice::Reload>,
) {
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading {}", path.display());
        // File reads off the runtime thread (it may be the only one).
        let file = path.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            Config::load(&file, &|name| std::env::var(name).ok())
        })
        .await;
        let Ok(loaded) = loaded else {
            tracing::error!("reload failed while reading {}", path.display());
            continue;
        };
        if tx.send(loaded).is_err() {
            return;
        }
    }
}

/// Resolves on SIGTERM or SIGINT, starting the drain; a second signal
/// during the drain exits at once (an impatient Ctrl-C).
async fn shutdown_signal(
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
) {
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting without waiting for the drain");
        sluice::access::flush_lines();
        std::process::exit(1);
    });
}
