//! `tailnode coordinator`: the coordination server nodes join.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use tailnode_control::coordinator::{
    AuthKeySource, CoordinatorConfig, CoordinatorServer, TlsFiles, default_state_path,
};
use tokio_util::sync::CancellationToken;

use crate::up::ConfigProblem;

/// Options of `tailnode coordinator`.
#[derive(Debug, Clone, Args)]
pub struct CoordinatorArgs {
    /// TOML file with any of these settings (keys named like the flags);
    /// TAILNODE_* variables and flags override it.
    #[arg(long, value_name = "FILE", env = "TAILNODE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address to listen on (HTTP; websocket endpoint for nodes and /healthz).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "0.0.0.0:8080",
        env = "TAILNODE_LISTEN"
    )]
    pub listen: SocketAddr,

    /// The tailnet's shared auth key that nodes must present.
    #[arg(
        long,
        value_name = "KEY",
        env = "TAILNODE_AUTH_KEY",
        hide_env_values = true
    )]
    pub auth_key: Option<String>,

    /// Read the auth key from this file instead, again on every join (rotate
    /// it without a restart).
    #[arg(long, value_name = "FILE", conflicts_with = "auth_key")]
    pub auth_key_file: Option<PathBuf>,

    /// State file with every node's stable addresses and name (written
    /// atomically). Default: $STATE_DIRECTORY, $XDG_STATE_HOME/tailnode or
    /// ~/.local/state/tailnode, file coordinator.json.
    #[arg(long, value_name = "FILE", env = "TAILNODE_STATE")]
    pub state: Option<PathBuf>,

    /// DNS domain of the tailnet: peers resolve as NAME and NAME.DOMAIN.
    #[arg(long, value_name = "DOMAIN", default_value = tailnode_control::coordinator::DEFAULT_DOMAIN)]
    pub domain: String,

    /// Ping each node this often; two missed intervals and it is announced lost.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// Forget a lost node (drop it from snapshots) after this long.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub lost_expiry: Duration,

    /// TLS certificate chain (PEM); serves wss:// and https:// with --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl CoordinatorArgs {
    /// The server configuration these options describe.
    ///
    /// # Errors
    /// [`ConfigProblem`] for missing or invalid settings.
    pub fn config(&self) -> Result<CoordinatorConfig, ConfigProblem> {
        let auth_key = match (&self.auth_key, &self.auth_key_file) {
            (Some(key), _) if !key.is_empty() => AuthKeySource::Fixed(key.clone()),
            (_, Some(path)) => AuthKeySource::File(path.clone()),
            _ => {
                return Err(ConfigProblem(
                    "an auth key is required: --auth-key KEY, TAILNODE_AUTH_KEY or --auth-key-file FILE"
                        .into(),
                ));
            }
        };
        let state = match &self.state {
            Some(p) => p.clone(),
            None => default_state_path().ok_or_else(|| {
                ConfigProblem("no default state directory (HOME unset): pass --state FILE".into())
            })?,
        };
        if self.ping_interval.is_zero() {
            return Err(ConfigProblem(
                "--ping-interval must be greater than 0".into(),
            ));
        }
        let mut config = CoordinatorConfig::new(auth_key, state);
        config.listen = self.listen;
        config.domain = self.domain.clone();
        config.ping_interval = self.ping_interval;
        config.lost_expiry = self.lost_expiry;
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config.tls = Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            });
        }
        Ok(config)
    }
}

/// Runs the coordinator until `cancel` fires.
///
/// # Errors
/// Configuration problems (exit code 2) and start-up failures (bind, state file, TLS files).
pub async fn run_coordinator(
    args: CoordinatorArgs,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let config = args.config()?;
    let state = config.state_path.clone();
    let server = CoordinatorServer::bind(config)
        .await
        .with_context(|| format!("starting the coordinator (state {})", state.display()))?;
    tracing::info!(listen = %server.local_addr(), state = %state.display(), "coordinator listening");
    server.run(cancel).await?;
    Ok(())
}
