//! The `falco-nats` binary: parses the command line and runs a subcommand.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use falco_nats::cli::{Cli, Command};
use falco_nats::telemetry::logging;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The static musl build (the image) allocates with mimalloc: musl's own
/// allocator takes one lock for every thread and costs 6 to 16 % more
/// instructions per alert (docs/BENCHMARKS.md, "The image").
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format.into());
    let mut builder = if cli.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if cli.threads > 1 {
            b.worker_threads(cli.threads);
        }
        b
    };
    let result = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| {
            let result = runtime.block_on(run(cli));
            // A blocking read of a terminal or file on standard input
            // cannot be interrupted: do not wait for it.
            runtime.shutdown_timeout(std::time::Duration::from_millis(100));
            result
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain of causes, each once, without a backtrace:
            // these are errors of input and environment, not of the program.
            eprintln!("error: {}", falco_nats::telemetry::logging::chain(&*e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    match cli.command {
        Command::Bridge(args) => {
            let listener = bind(args.listen_address()).await?;
            let options = (*args).into_options()?;
            falco_nats::bridge::run(options, listener, shutdown).await?;
        }
        Command::Respond(args) => {
            if let Some(path) = &args.check {
                let policy = falco_nats::respond::policy::Policy::load(path)?;
                println!("{}", policy.summary(&path.display().to_string()));
                return Ok(());
            }
            let listener = bind(args.listen_address()).await?;
            let options = (*args).into_options()?;
            falco_nats::respond::run(options, listener, shutdown).await?;
        }
        Command::Tail(args) => {
            let listener = bind(args.listen_address()).await?;
            let out = std::io::stdout().lock();
            falco_nats::tail::run((*args).into(), out, listener, shutdown).await?;
        }
        Command::Keygen(args) => {
            let public = match (&args.out, &args.public) {
                (Some(out), _) => falco_nats::signing::write_new_seed(out)?,
                (None, Some(seed)) => falco_nats::signing::Signer::from_file(seed)?
                    .public_key()
                    .to_owned(),
                (None, None) => unreachable!("clap requires --out or --public"),
            };
            println!("{public}");
        }
        Command::Ui(args) => {
            let listener = bind(args.listen_address()).await?;
            let options = (*args).into_options()?;
            falco_nats::ui::run(options, listener, shutdown).await?;
        }
        Command::Pause(args) => return kill_switch(args, true).await,
        Command::Resume(args) => return kill_switch(args, false).await,
        Command::Sources(args) => {
            let listener = bind(args.listen_address()).await?;
            falco_nats::sources::run((*args).into(), listener, shutdown).await?;
        }
        Command::Simulate(args) => {
            falco_nats::simulate::run(args.into_options()?, shutdown).await?;
        }
    }
    Ok(())
}

/// Binds the probe listener, unless disabled.
async fn bind(address: Option<&str>) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = address else { return Ok(None) };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    Ok(Some(listener))
}

/// `pause` (`--status`) and `resume`; the status exits 3 while paused,
/// like `systemctl is-active`, so scripts can test it.
async fn kill_switch(args: falco_nats::cli::PauseArgs, pause: bool) -> anyhow::Result<()> {
    use falco_nats::respond::kill_switch::{self, KillSwitchCommand};
    let status = args.status;
    let command = if status {
        KillSwitchCommand::Status
    } else {
        KillSwitchCommand::Set {
            paused: pause,
            reason: args.reason,
        }
    };
    let options = args.kv.options()?;
    let answer = kill_switch::run(&args.nats.into(), &options, command).await?;
    println!("{}", answer.line);
    if status && answer.paused {
        std::process::exit(3);
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
