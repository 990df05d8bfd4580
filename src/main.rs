//! The `sluice` binary: parse the command line, load the config, serve.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::Config;

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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let addr = config.server.listen;
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        sluice::run(config, listener, shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

/// Resolves on SIGTERM or SIGINT, starting the drain; a second signal
/// during the drain exits at once (an impatient Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
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
        std::process::exit(1);
    });
}
