//! The `falco-nats` binary: parses the command line and runs a subcommand.

#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use falco_nats::cli::{Cli, Command};
use falco_nats::telemetry::logging;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    match cli.command {
        Command::Bridge(args) => {
            let listener = match args.listen_address() {
                Some(addr) => Some(
                    TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr}"))?,
                ),
                None => None,
            };
            let options = (*args).into_options()?;
            falco_nats::bridge::run(options, listener, shutdown).await?;
        }
        Command::Tail(args) => {
            falco_nats::tail::run(args, std::io::stdout().lock(), shutdown).await?;
        }
        Command::Simulate(args) => {
            falco_nats::simulate::run(args.into_options()?, shutdown).await?;
        }
    }
    Ok(())
}

/// Cancels `shutdown` on SIGTERM or SIGINT; a second signal exits at once.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: exiting now");
    std::process::exit(130);
}
