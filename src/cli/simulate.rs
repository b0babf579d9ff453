//! `falco-nats simulate`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::input::fifo::DEFAULT_FIFO;
use crate::input::grpc::{socket_path, DEFAULT_SOCKET};
use crate::input::InputError;
use crate::simulate::alerts::FalcoRelease;
use crate::simulate::{SimulateOptions, SimulateOutput};

/// Where the simulated Falco sends alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SimulateKind {
    /// Serve Falco's gRPC outputs API on a Unix socket
    Grpc,
    /// Write JSON lines into a FIFO, like Falco's file_output
    Fifo,
    /// Post each alert to --url, like Falco's http_output
    Http,
}

#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// How the simulated Falco delivers alerts
    #[arg(
        long,
        env = "FALCO_NATS_SIMULATE_OUTPUT",
        value_enum,
        default_value = "grpc"
    )]
    pub output: SimulateKind,
    /// Unix socket to serve the gRPC API on
    #[arg(long, env = "FALCO_NATS_GRPC_SOCKET", default_value = DEFAULT_SOCKET)]
    pub grpc_socket: String,
    /// FIFO to write to (created if missing)
    #[arg(short = 'f', long, env = "FALCO_NATS_FIFO", default_value = DEFAULT_FIFO)]
    pub fifo: PathBuf,
    /// Where to post alerts with --output http (Falco's http_output.url)
    #[arg(
        long,
        env = "FALCO_NATS_SIMULATE_URL",
        default_value = "http://127.0.0.1:2810/"
    )]
    pub url: hyper::Uri,
    /// Alerts per second (0: as fast as possible)
    #[arg(long, env = "FALCO_NATS_SIMULATE_RATE", default_value_t = 10.0)]
    pub rate: f64,
    /// Alerts in all (0: no end)
    #[arg(long, env = "FALCO_NATS_SIMULATE_COUNT", default_value_t = 0)]
    pub count: u64,
    /// Falco's json_output: gRPC `output` carries the JSON line
    #[arg(long, env = "FALCO_NATS_SIMULATE_JSON_OUTPUT", action = clap::ArgAction::Set, default_value_t = false)]
    pub json_output: bool,
    /// Hostname in the alerts
    #[arg(
        long,
        env = "FALCO_NATS_SIMULATE_HOSTNAME",
        default_value = "falco-simulated"
    )]
    pub hostname: String,
    /// Also serve a Kubernetes API stand-in holding the simulated pods on this address
    #[arg(
        long,
        env = "FALCO_NATS_SIMULATE_KUBE_API",
        requires = "kubeconfig_out"
    )]
    pub kube_api: Option<String>,
    /// Where to write a kubeconfig for the stand-in (for `respond --kubeconfig`)
    #[arg(
        long,
        env = "FALCO_NATS_SIMULATE_KUBECONFIG_OUT",
        requires = "kube_api"
    )]
    pub kubeconfig_out: Option<PathBuf>,
    /// End every command line and file name with what a hostile container
    /// writes (terminal escapes, CR LF, DEL, C1, invalid UTF-8), as this Falco
    /// release puts it in an alert: 0.44 or 0.45
    #[arg(long, env = "FALCO_NATS_SIMULATE_HOSTILE_STRINGS", value_name = "FALCO_RELEASE", value_parser = parse_falco_release)]
    pub hostile_strings: Option<FalcoRelease>,
}

/// `0.44` or `0.45`: the Falco releases whose rendering of untrusted
/// strings the simulator knows.
fn parse_falco_release(text: &str) -> Result<FalcoRelease, String> {
    match text {
        "0.44" => Ok(FalcoRelease::V044),
        "0.45" => Ok(FalcoRelease::V045),
        other => Err(format!(
            "{other:?}: the simulator knows Falco 0.44 and 0.45"
        )),
    }
}

impl SimulateArgs {
    pub fn into_options(self) -> Result<SimulateOptions, InputError> {
        let output = match self.output {
            SimulateKind::Grpc => SimulateOutput::Grpc {
                socket: socket_path(&self.grpc_socket)?,
            },
            SimulateKind::Fifo => SimulateOutput::Fifo { path: self.fifo },
            SimulateKind::Http => SimulateOutput::Http { url: self.url },
        };
        Ok(SimulateOptions {
            output,
            rate: self.rate.max(0.0),
            count: self.count,
            json_output: self.json_output,
            hostile_strings: self.hostile_strings,
            hostname: self.hostname,
            kube_api: self.kube_api.zip(self.kubeconfig_out),
        })
    }
}
