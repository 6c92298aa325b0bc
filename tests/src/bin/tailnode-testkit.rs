//! Test helper usable inside network namespaces:
//!
//! - `tailnode-testkit serve ADDR` — transfer server (see `transfer`), exits after 30 minutes;
//! - `tailnode-testkit client ADDR UPLOAD DOWNLOAD SEED` — one checked transfer, exit 0 on success.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tailnode_tests::transfer;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match args
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["serve", addr] => {
                let addr: SocketAddr = addr.parse()?;
                let (local, server) = transfer::start_server(addr).await;
                println!("listening {local}");
                let _ = tokio::time::timeout(Duration::from_secs(1800), server).await;
                Ok(())
            }
            ["client", addr, up, down, seed] => {
                let addr: SocketAddr = addr.parse()?;
                let stream = tokio::time::timeout(
                    Duration::from_secs(20),
                    tokio::net::TcpStream::connect(addr),
                )
                .await??;
                let report = tokio::time::timeout(
                    Duration::from_secs(120),
                    transfer::run_client(stream, up.parse()?, down.parse()?, seed.parse()?),
                )
                .await??;
                println!(
                    "ok uploaded={} downloaded={}",
                    report.uploaded, report.downloaded
                );
                Ok(())
            }
            _ => Err(anyhow::anyhow!(
                "usage: tailnode-testkit serve ADDR | client ADDR UPLOAD DOWNLOAD SEED"
            )),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tailnode-testkit: {e:#}");
            ExitCode::from(1)
        }
    }
}
