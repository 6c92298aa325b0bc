//! The data-plane benchmark, side by side with the anchors in one run:
//! `cargo bench -p tailnode-benches --bench tunnel` runs `benches/run.sh`
//! (tailnode -> tailnode on loopback, tailnode -> wireguard-go, wireguard-go
//! <-> wireguard-go, onetun -> wireguard-go; single-stream TCP both ways with
//! iperf3, 64-byte request/response round trips, ping, CPU and peak RSS) and
//! prints its table. Needs root (network namespaces). Environment: RUNS,
//! DURATION, SKIP_ONETUN=1, ANC_WORK (see ../shared/anchors/README.md).

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    // `cargo bench` passes harness flags such as `--bench`; they do not apply.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/run.sh");
    match Command::new("bash").arg(script).status() {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("{script} failed: {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cannot run {script}: {e}");
            ExitCode::FAILURE
        }
    }
}
