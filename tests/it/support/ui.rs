//! A running `falco-nats ui` for the tests (ui.rs, and dashboard.rs for
//! its metrics).

use std::time::Duration;

use falco_nats::ui::{self, UiOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{http_get, metric_value, wait_for};

const WAIT: Duration = Duration::from_secs(20);

/// A running `falco-nats ui`.
pub struct Ui {
    pub addr: std::net::SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<Result<(), ui::UiError>>,
}

impl Ui {
    pub async fn start(url: &str, token: Option<&str>) -> Self {
        Self::start_with(UiOptions {
            nats: falco_nats::nats::NatsOptions::for_server(url),
            subject: "falco.>".into(),
            result_prefix: "falco.response".into(),
            stream: Some("FALCO".into()),
            history: 2000,
            history_age: Duration::from_secs(3600),
            token: token.map(str::to_owned),
            client_buffer: 4096,
        })
        .await
    }

    pub async fn start_with(options: UiOptions) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), options).await
    }

    /// On `addr`: a ui started again where a page knew the last one.
    pub async fn start_on(addr: std::net::SocketAddr, options: UiOptions) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(ui::run(options, Some(listener), stop.clone()));
        wait_for("the ui ready", WAIT, || async {
            http_get(addr, "/readyz").await.0 == 200
        })
        .await;
        Ui { addr, stop, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&http_get(self.addr, "/metrics").await.1, series)
    }

    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
