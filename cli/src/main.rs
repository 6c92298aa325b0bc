//! The `tailnode` command.

use std::io::Read as _;
use std::net::SocketAddr;
use std::process::ExitCode;

mod config_file;
mod coordinator_cmd;
mod demo;
mod ping_cmd;
mod status_cmd;
mod up;

use clap::{CommandFactory as _, Parser, Subcommand};
use coordinator_cmd::{CoordinatorArgs, run_coordinator};
use ping_cmd::{PingArgs, run_ping_command};
use tailnode::api::{ApiAddr, default_api, fetch_status};
use tailnode_wg::PrivateKey;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use up::{ConfigProblem, UpArgs, run_up};

/// A userspace tailnet node: WireGuard without TUN or privileges, reached
/// through SOCKS5 and port forwards.
#[derive(Debug, Parser)]
#[command(name = "tailnode", version, about, long_about = None)]
struct Cli {
    /// Log output: `human` (default) or `json` (one object per line). The
    /// filter comes from RUST_LOG (e.g. `info`, `tailnode=debug`).
    #[arg(
        long,
        global = true,
        value_name = "FORMAT",
        default_value = "human",
        env = "TAILNODE_LOG_FORMAT"
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// Readable lines.
    Human,
    /// JSON lines.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a new base64 private key (like `wg genkey`).
    Keygen,
    /// Read a private key on stdin and print its public key (like `wg pubkey`).
    Pubkey,
    /// Join the tailnet (a coordinator and/or a wg-quick file) and serve the proxies.
    Up(Box<UpArgs>),
    /// Run the coordination server that nodes join.
    Coordinator(CoordinatorArgs),
    /// Show a running node's state (through its local API).
    Status {
        /// Print the JSON document instead of a summary.
        #[arg(long)]
        json: bool,
        /// The node's API address (as given to `tailnode up --api`).
        #[arg(long, value_name = "ADDR|unix:PATH", env = "TAILNODE_API")]
        api: Option<ApiAddr>,
    },
    /// Ping a tailnet peer (ICMP echo from the running node, through its API).
    /// Exit status: 0 all answered, 1 some or all lost, 2 could not ping.
    Ping(PingArgs),
    /// Two nodes in one process, an HTTP service exposed on one, SOCKS5 on the other.
    Demo {
        /// SOCKS5 listen address of the first node.
        #[arg(long, default_value = "127.0.0.1:1080")]
        socks5: SocketAddr,
    },
}

fn main() -> ExitCode {
    let argv = match config_file::expand(std::env::args_os().collect(), &Cli::command()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("tailnode: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
    match cli.command {
        Command::Keygen => {
            println!("{}", PrivateKey::generate().to_base64());
            ExitCode::SUCCESS
        }
        Command::Pubkey => pubkey(),
        Command::Up(args) => run_async(cli.log_format, |cancel| run_up(*args, cancel)),
        Command::Coordinator(args) => {
            run_async(cli.log_format, |cancel| run_coordinator(args, cancel))
        }
        Command::Status { json, api } => status(json, api),
        Command::Ping(args) => ping(&args),
        Command::Demo { socks5 } => {
            run_async(cli.log_format, |cancel| demo::run_demo(socks5, cancel))
        }
    }
}

fn pubkey() -> ExitCode {
    let mut text = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut text) {
        eprintln!("tailnode pubkey: cannot read stdin: {e}");
        return ExitCode::from(1);
    }
    match text.trim().parse::<PrivateKey>() {
        Ok(key) => {
            println!("{}", key.public_key());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tailnode pubkey: invalid private key: {e}");
            ExitCode::from(1)
        }
    }
}

fn status(json: bool, api: Option<ApiAddr>) -> ExitCode {
    let Some(api) = api.or_else(default_api) else {
        eprintln!("tailnode status: no API address: pass --api");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tailnode status: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(fetch_status(&api)) {
        Ok(status) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                );
            } else {
                print!("{}", status_cmd::render(&status));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tailnode status: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn ping(args: &PingArgs) -> ExitCode {
    let Some(api) = args.api.clone().or_else(default_api) else {
        eprintln!("tailnode ping: no API address: pass --api");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tailnode ping: {e}");
            return ExitCode::from(2);
        }
    };
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let interrupt = async {
        // Without a signal handler, never interrupt: the count ends the run.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    match runtime.block_on(run_ping_command(args, &api, &mut out, &mut err, interrupt)) {
        Ok(summary) => ExitCode::from(summary.exit_code()),
        Err(e) => {
            eprintln!("tailnode ping: {e}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Runs `f` on a multi-threaded runtime with SIGINT/SIGTERM wired to its
/// cancellation token; maps configuration problems to exit code 2.
fn run_async<F, Fut>(log_format: LogFormat, f: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    init_logging(log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tailnode: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let cancel = CancellationToken::new();
    let result = runtime.block_on(async {
        let signals = cancel.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received, stopping");
            signals.cancel();
        });
        f(cancel).await
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tailnode: {e:#}");
            if e.downcast_ref::<ConfigProblem>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
