//! `tailnode up`: the flags, their conversion to a [`Config`], and running the node until a
//! signal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tailnode::api::ApiAddr;
use tailnode::expose::ExposeSpec;
use tailnode::forward::ForwardSpec;
use tailnode::{Config, ConfigError, ListenAddr, StartError, Tailnode};
use tailnode_control::controller::CoordinatorUrl;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Options of `tailnode up`.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// TOML file with any of these settings (keys named like the flags, e.g.
    /// `socks5_direct = true`, `forward = ["tcp:..."]`); TAILNODE_* variables
    /// and flags override it.
    #[arg(long, value_name = "FILE", env = "TAILNODE_CONFIG")]
    pub config: Option<PathBuf>,

    /// WireGuard / wg-quick configuration file with static peers: [Interface]
    /// PrivateKey, Address, ListenPort, MTU; [Peer] PublicKey, PresharedKey,
    /// AllowedIPs, Endpoint, PersistentKeepalive.
    #[arg(
        long,
        value_name = "FILE",
        env = "TAILNODE_WG_CONFIG",
        required_unless_present = "coordinator"
    )]
    pub wg_config: Option<PathBuf>,

    /// Coordination server to join: ws://HOST:PORT, wss://HOST:PORT (or the
    /// http:// / https:// spellings). A URL without a path reaches the
    /// coordinator's node endpoint.
    #[arg(long, value_name = "URL", env = "TAILNODE_COORDINATOR")]
    pub coordinator: Option<CoordinatorUrl>,

    /// Name to ask the coordinator for (made DNS-safe and unique by it).
    /// Default: the host name.
    #[arg(long, value_name = "NAME", env = "TAILNODE_NAME")]
    pub name: Option<String>,

    /// The tailnet's auth key (needed with --coordinator).
    #[arg(
        long,
        value_name = "KEY",
        env = "TAILNODE_AUTH_KEY",
        hide_env_values = true
    )]
    pub auth_key: Option<String>,

    /// Private key file of the node, created (mode 0600) when missing; keeps
    /// the node's identity and addresses across restarts. Default:
    /// $STATE_DIRECTORY, $XDG_STATE_HOME/tailnode or ~/.local/state/tailnode,
    /// file node.key. Not used with --wg-config, whose PrivateKey wins.
    #[arg(long, value_name = "FILE", env = "TAILNODE_KEY_FILE")]
    pub key_file: Option<PathBuf>,

    /// Extra CA certificate (PEM) to trust for a wss:// coordinator.
    #[arg(long, value_name = "FILE", env = "TAILNODE_COORDINATOR_CA")]
    pub coordinator_ca: Option<PathBuf>,

    /// Time allowed for one dial of the coordinator: TCP connect, TLS, the
    /// websocket upgrade and the hello/welcome exchange.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration, env = "TAILNODE_DIAL_TIMEOUT")]
    pub dial_timeout: Duration,

    /// Cap of the exponential, jittered backoff between coordinator dials.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration, env = "TAILNODE_RETRY_MAX_BACKOFF")]
    pub retry_max_backoff: Duration,

    /// Ping the coordinator this often; no answer within two intervals and
    /// the session is dropped and redialled.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration, env = "TAILNODE_PING_INTERVAL")]
    pub ping_interval: Duration,

    /// A peer announced lost (or every peer, while our own coordinator
    /// session is down) is removed after this long without a WireGuard
    /// handshake.
    #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = humantime::parse_duration, env = "TAILNODE_LOST_PEER_TIMEOUT")]
    pub lost_peer_timeout: Duration,

    /// UDP endpoint to advertise to peers instead of the discovered interface
    /// addresses (repeatable; e.g. a port forwarded on a NAT). In the
    /// environment: comma separated.
    #[arg(
        long = "endpoint",
        value_name = "ADDR",
        env = "TAILNODE_ENDPOINT",
        value_delimiter = ','
    )]
    pub endpoints: Vec<SocketAddr>,

    /// SOCKS5 listen address, or `off`.
    #[arg(
        long,
        value_name = "ADDR|off",
        default_value = "127.0.0.1:1080",
        env = "TAILNODE_SOCKS5"
    )]
    pub socks5: ListenAddr,

    /// Connect SOCKS5 destinations outside the tailnet from the host network
    /// instead of refusing them.
    #[arg(long, env = "TAILNODE_SOCKS5_DIRECT")]
    pub socks5_direct: bool,

    /// Username SOCKS5 clients must present (RFC 1929); needs --socks5-pass.
    #[arg(long, value_name = "USER", env = "TAILNODE_SOCKS5_USER")]
    pub socks5_user: Option<String>,

    /// Password SOCKS5 clients must present; needs --socks5-user. Prefer the
    /// environment variable: command lines are visible to other users.
    #[arg(
        long,
        value_name = "PASS",
        env = "TAILNODE_SOCKS5_PASS",
        hide_env_values = true
    )]
    pub socks5_pass: Option<String>,

    /// Allow SOCKS5 on a non-loopback address without credentials: anyone
    /// who can reach that address can then use the tailnet (and, with
    /// --socks5-direct, the host's network) through it.
    #[arg(long, env = "TAILNODE_SOCKS5_INSECURE_PUBLIC")]
    pub socks5_insecure_public: bool,

    /// Port forward, repeatable: tcp:LOCAL_ADDR:PORT=TAILNET_ADDR:PORT or
    /// udp:LOCAL_ADDR:PORT=TAILNET_ADDR:PORT (LOCAL_ADDR:PORT may be a bare
    /// port, meaning 127.0.0.1). In the environment: comma separated.
    #[arg(
        long,
        value_name = "SPEC",
        env = "TAILNODE_FORWARD",
        value_delimiter = ','
    )]
    pub forward: Vec<ForwardSpec>,

    /// UDP forward flows and SOCKS5 UDP associations with no datagram either
    /// way for this long are closed (e.g. 30s, 5m).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration, env = "TAILNODE_UDP_IDLE_TIMEOUT")]
    pub udp_idle_timeout: Duration,

    /// Expose a local TCP service to the tailnet, repeatable: PORT (to
    /// 127.0.0.1:PORT) or PORT=HOST:PORT. In the environment: comma separated.
    #[arg(
        long,
        value_name = "SPEC",
        env = "TAILNODE_EXPOSE",
        value_delimiter = ','
    )]
    pub expose: Vec<ExposeSpec>,

    /// Time allowed to establish a connection (tailnet or direct), e.g. 15s.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = humantime::parse_duration, env = "TAILNODE_CONNECT_TIMEOUT")]
    pub connect_timeout: Duration,

    /// HTTP proxy listen address (CONNECT tunnels and absolute-URI
    /// requests; usable as HTTP_PROXY/HTTPS_PROXY), or `off`. Uses the same
    /// credentials as SOCKS5 (Basic proxy authentication).
    #[arg(
        long,
        value_name = "ADDR|off",
        default_value = "off",
        env = "TAILNODE_HTTP_PROXY"
    )]
    pub http_proxy: ListenAddr,

    /// WireGuard UDP port, overriding ListenPort (0 picks one).
    #[arg(long, value_name = "PORT", env = "TAILNODE_LISTEN_PORT")]
    pub listen_port: Option<u16>,

    /// Local API for `tailnode status`: 127.0.0.1:PORT, [::1]:PORT,
    /// unix:/path, or off. Never reachable from the tailnet.
    #[arg(long, value_name = "ADDR|unix:PATH|off", env = "TAILNODE_API")]
    pub api: Option<ApiAddr>,

    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9100).
    /// Off by default.
    #[arg(long, value_name = "ADDR", env = "TAILNODE_METRICS")]
    pub metrics: Option<SocketAddr>,
}

impl UpArgs {
    /// The node's configuration: every flag is a field of [`Config`], with the same name.
    pub fn into_config(self) -> Config {
        if self.wg_config.is_some() && self.key_file.is_some() {
            warn!("--key-file is ignored: the wg-quick file's PrivateKey is the node's key");
        }
        Config {
            wg_config: self.wg_config,
            key_file: self.key_file,
            listen_port: self.listen_port,
            coordinator: self.coordinator,
            name: self.name,
            auth_key: self.auth_key,
            coordinator_ca: self.coordinator_ca,
            dial_timeout: self.dial_timeout,
            retry_max_backoff: self.retry_max_backoff,
            ping_interval: self.ping_interval,
            lost_peer_timeout: self.lost_peer_timeout,
            endpoints: self.endpoints,
            socks5: self.socks5,
            socks5_direct: self.socks5_direct,
            socks5_user: self.socks5_user,
            socks5_pass: self.socks5_pass,
            socks5_insecure_public: self.socks5_insecure_public,
            http_proxy: self.http_proxy,
            forward: self.forward,
            expose: self.expose,
            udp_idle_timeout: self.udp_idle_timeout,
            connect_timeout: self.connect_timeout,
            api: self.api,
            metrics: self.metrics,
            ..Config::default()
        }
    }
}

/// A problem with the user's configuration (exit code 2), as opposed to a failure while
/// running (exit code 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigProblem(pub String);

/// Names a [`Config`] setting as the flag that sets it (`dial_timeout` → `--dial-timeout`).
pub fn flag_name(setting: &str) -> String {
    format!("--{}", setting.replace('_', "-"))
}

/// A start error in the terms of the command line.
fn describe(error: &StartError) -> String {
    match error {
        StartError::Config(e) => config_message(e),
        other => other.to_string(),
    }
}

/// A configuration error with flags (and their variables) as the settings' names.
pub fn config_message(error: &ConfigError) -> String {
    match error {
        ConfigError::MissingAuthKey => {
            "--coordinator needs an auth key: --auth-key KEY or TAILNODE_AUTH_KEY".into()
        }
        other => other.message(flag_name),
    }
}

/// Runs a node from `args` until `cancel` fires.
///
/// # Errors
/// [`ConfigProblem`] (wrapped) for the user's mistakes, other errors when the node cannot start.
pub async fn run_up(args: UpArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let node = match Tailnode::start(args.into_config(), cancel.clone()).await {
        Ok(node) => node,
        Err(e) if e.is_config_problem() => return Err(ConfigProblem(describe(&e)).into()),
        Err(e) => return Err(anyhow::anyhow!(describe(&e))),
    };
    cancel.cancelled().await;
    node.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cmd {
        #[command(flatten)]
        up: UpArgs,
    }

    fn config(argv: &[&str]) -> Config {
        let mut full = vec!["up"];
        full.extend_from_slice(argv);
        Cmd::try_parse_from(full).expect("parses").up.into_config()
    }

    #[test]
    fn defaults_are_the_library_defaults() {
        let from_flags = config(&["--wg-config", "wg0.conf"]);
        let expected = Config {
            wg_config: Some("wg0.conf".into()),
            ..Config::default()
        };
        assert_eq!(from_flags, expected);
    }

    #[test]
    fn every_flag_lands_in_its_setting() {
        let c = config(&[
            "--coordinator",
            "ws://127.0.0.1:1",
            "--auth-key",
            "k",
            "--name",
            "db",
            "--dial-timeout",
            "3s",
            "--lost-peer-timeout",
            "2m",
            "--socks5",
            "off",
            "--http-proxy",
            "127.0.0.1:3128",
            "--forward",
            "tcp:8080=100.64.0.2:80",
            "--expose",
            "22",
            "--endpoint",
            "198.18.0.1:41641",
            "--metrics",
            "127.0.0.1:9100",
        ]);
        assert_eq!(c.name.as_deref(), Some("db"));
        assert_eq!(c.dial_timeout, Duration::from_secs(3));
        assert_eq!(c.lost_peer_timeout, Duration::from_secs(120));
        assert_eq!(c.socks5, ListenAddr::Off);
        assert_eq!(c.http_proxy, "127.0.0.1:3128".parse().expect("addr"));
        assert_eq!(c.forward.len(), 1);
        assert_eq!(c.expose.len(), 1);
        assert_eq!(c.endpoints, vec!["198.18.0.1:41641".parse().expect("addr")]);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn errors_name_the_flags() {
        let c = config(&[
            "--coordinator",
            "ws://127.0.0.1:1",
            "--connect-timeout",
            "0s",
        ]);
        let message = config_message(&c.validate().expect_err("zero"));
        assert_eq!(message, "--connect-timeout must be greater than 0");
        let c = config(&["--coordinator", "ws://127.0.0.1:1"]);
        let message = config_message(&c.validate().expect_err("no key"));
        assert!(message.contains("--auth-key"), "{message}");
        let c = config(&["--wg-config", "x", "--socks5", "0.0.0.0:1080"]);
        let message = config_message(&c.validate().expect_err("public"));
        assert!(message.contains("--socks5-insecure-public"), "{message}");
        let c = config(&["--wg-config", "x", "--socks5-user", "alice"]);
        let message = config_message(&c.validate().expect_err("half"));
        assert!(message.contains("--socks5-pass"), "{message}");
    }
}
