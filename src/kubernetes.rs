//! The Kubernetes client, as the responder and `sources` make it: from
//! `--kubeconfig`, or else the usual discovery (the `KUBECONFIG` variable,
//! `~/.kube/config`, then in-cluster), with time limits on the transport.

use std::path::Path;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Why the Kubernetes client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read kubeconfig {path:?}")]
    ReadKubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot configure the Kubernetes client from {path:?}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot find a Kubernetes configuration (KUBECONFIG, ~/.kube/config, or in-cluster)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot create the Kubernetes client")]
    Client(#[from] kube::Error),
}

/// A client from `kubeconfig`, or else the usual discovery. The
/// transport's limits are a little later than `timeout`, the one each call
/// has, which is then the one that says what happened.
pub async fn client(kubeconfig: Option<&Path>, timeout: Duration) -> Result<Client, ClusterError> {
    let mut config = config(kubeconfig).await?;
    let transport = timeout + Duration::from_secs(1);
    config.connect_timeout = Some(transport);
    config.read_timeout = Some(transport);
    config.write_timeout = Some(transport);
    Ok(Client::try_from(config)?)
}

/// A client for watches: a watch is quiet for minutes, so no read limit
/// (the server ends it after the `timeoutSeconds` it is given).
pub async fn watch_client(
    kubeconfig: Option<&Path>,
    timeout: Duration,
) -> Result<Client, ClusterError> {
    let mut config = config(kubeconfig).await?;
    config.connect_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    config.read_timeout = None;
    Ok(Client::try_from(config)?)
}

async fn config(kubeconfig: Option<&Path>) -> Result<Config, ClusterError> {
    Ok(match kubeconfig {
        Some(path) => {
            let kc =
                Kubeconfig::read_from(path).map_err(|source| ClusterError::ReadKubeconfig {
                    path: path.display().to_string(),
                    source,
                })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| ClusterError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                })?
        }
        None => Config::infer().await.map_err(ClusterError::Infer)?,
    })
}
