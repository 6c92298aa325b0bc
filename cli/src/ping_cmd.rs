//! `tailnode ping PEER`: asks the running node (through its local API) to ping a peer and
//! prints the replies and the summary like ping(8).

use std::fmt;
use std::io::Write;
use std::time::Duration;

use clap::Args;
use tailnode::api::{self, ApiAddr};
use tailnode::ping::{DEFAULT_COUNT, DEFAULT_SIZE, PingEvent, PingParams};

/// Options of `tailnode ping`.
#[derive(Debug, Clone, Args)]
pub struct PingArgs {
    /// Peer name (as in `tailnode status`) or tailnet IP address.
    #[arg(value_name = "PEER")]
    pub target: String,

    /// Probes to send; 0 pings until interrupted (Ctrl-C).
    #[arg(short = 'c', long, value_name = "N", default_value_t = DEFAULT_COUNT)]
    pub count: u32,

    /// Time between probes: seconds (`0.2`) or a duration (`200ms`).
    #[arg(short = 'i', long, value_name = "INTERVAL", default_value = "1", value_parser = parse_seconds)]
    pub interval: Duration,

    /// Time to wait for each reply: seconds (`2`) or a duration (`500ms`).
    #[arg(short = 'W', long, value_name = "TIMEOUT", default_value = "2", value_parser = parse_seconds)]
    pub timeout: Duration,

    /// Echo payload bytes.
    #[arg(short = 's', long, value_name = "BYTES", default_value_t = DEFAULT_SIZE)]
    pub size: usize,

    /// The node's API address (as given to `tailnode up --api`).
    #[arg(long, value_name = "ADDR|unix:PATH", env = "TAILNODE_API")]
    pub api: Option<ApiAddr>,
}

/// Parses `0.2` (seconds, as ping(8)) or a humantime duration (`200ms`, `2s`).
fn parse_seconds(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

/// Tallies of a ping run, as the client saw them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PingSummary {
    /// The target as given.
    pub target: String,
    /// Probes sent (answered or lost).
    pub transmitted: u32,
    /// Probes answered.
    pub received: u32,
    /// Round-trip times of the answered probes, in milliseconds.
    pub rtts_ms: Vec<f64>,
}

impl PingSummary {
    /// Folds one event in; returns the line to print for it (to stdout, or stderr for errors).
    pub fn handle_event(&mut self, event: &PingEvent) -> Option<(bool, String)> {
        match event {
            PingEvent::Start {
                target,
                address,
                size,
                ..
            } => Some((
                false,
                format!("PING {target} ({address}): {size} data bytes"),
            )),
            PingEvent::Reply {
                seq,
                from,
                bytes,
                time_ms,
            } => {
                self.transmitted += 1;
                self.received += 1;
                self.rtts_ms.push(*time_ms);
                Some((
                    false,
                    format!("{bytes} bytes from {from}: icmp_seq={seq} time={time_ms:.3} ms"),
                ))
            }
            PingEvent::Timeout { seq } => {
                self.transmitted += 1;
                Some((false, format!("no reply: icmp_seq={seq}")))
            }
            PingEvent::Error { message } => Some((true, format!("tailnode ping: {message}"))),
            PingEvent::Done { .. } => None,
        }
    }

    /// Exit status: 0 when every probe was answered (and there was at least one), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.transmitted == 0 || self.received < self.transmitted)
    }
}

impl fmt::Display for PingSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "--- {} ping statistics ---", self.target)?;
        let loss = if self.transmitted == 0 {
            0.0
        } else {
            100.0 * f64::from(self.transmitted - self.received.min(self.transmitted))
                / f64::from(self.transmitted)
        };
        let loss = format!("{:.1}", loss);
        let loss = loss.strip_suffix(".0").unwrap_or(&loss);
        writeln!(
            f,
            "{} packets transmitted, {} received, {loss}% packet loss",
            self.transmitted, self.received
        )?;
        if !self.rtts_ms.is_empty() {
            let min = self.rtts_ms.iter().copied().fold(f64::INFINITY, f64::min);
            let max = self.rtts_ms.iter().copied().fold(0.0, f64::max);
            let avg = self.rtts_ms.iter().sum::<f64>() / self.rtts_ms.len() as f64;
            writeln!(f, "rtt min/avg/max = {min:.3}/{avg:.3}/{max:.3} ms")?;
        }
        Ok(())
    }
}

/// Runs `tailnode ping`: asks the node at `api` to ping, prints each event to `out` (errors to
/// `err`) and the summary at the end (or on Ctrl-C when `interrupt` completes). Returns the
/// summary; its [`exit_code`](PingSummary::exit_code) is the command's status.
///
/// # Errors
/// A message (exit status 2) when the parameters are bad, the API cannot be reached or refuses
/// the ping (unknown name, outside the tailnet).
pub async fn run_ping_command(
    args: &PingArgs,
    api: &ApiAddr,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<PingSummary, String> {
    let params = PingParams {
        target: args.target.clone(),
        count: args.count,
        interval: args.interval,
        timeout: args.timeout,
        size: args.size,
    };
    let mut events = api::ping(api, &params).await.map_err(|e| e.to_string())?;
    let mut summary = PingSummary {
        target: args.target.clone(),
        ..PingSummary::default()
    };
    let mut finished = false;
    tokio::pin!(interrupt);
    loop {
        let next = tokio::select! {
            next = events.next_event() => next,
            () = &mut interrupt => break,
        };
        let event = match next {
            None => break,
            Some(Ok(event)) => event,
            Some(Err(e @ tailnode::api::client::PingStreamError::BadLine(_))) => {
                let _ = writeln!(err, "tailnode ping: {e}");
                continue;
            }
            Some(Err(e)) => {
                let _ = writeln!(err, "tailnode ping: {e}");
                break;
            }
        };
        if matches!(event, PingEvent::Done { .. }) {
            finished = true;
        }
        if let Some((to_err, text)) = summary.handle_event(&event) {
            let sink: &mut dyn Write = if to_err { &mut *err } else { &mut *out };
            let _ = writeln!(sink, "{text}");
            let _ = sink.flush();
        }
    }
    if !finished && args.count != 0 {
        let _ = writeln!(err, "tailnode ping: the node ended the ping early");
    }
    let _ = write!(out, "\n{summary}");
    let _ = out.flush();
    Ok(summary)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn summary_counts_and_renders_like_ping() {
        let mut s = PingSummary {
            target: "b".into(),
            ..PingSummary::default()
        };
        assert_eq!(s.exit_code(), 1, "nothing sent is not success");
        let start = PingEvent::Start {
            target: "b".into(),
            address: "100.64.0.2".parse().unwrap(),
            size: 56,
            count: 3,
        };
        assert_eq!(
            s.handle_event(&start).unwrap().1,
            "PING b (100.64.0.2): 56 data bytes"
        );
        for (seq, t) in [(1, 1.5), (3, 0.5)] {
            let reply = PingEvent::Reply {
                seq,
                from: "100.64.0.2".parse().unwrap(),
                bytes: 64,
                time_ms: t,
            };
            let (to_err, text) = s.handle_event(&reply).unwrap();
            assert!(!to_err);
            assert!(text.starts_with(&format!("64 bytes from 100.64.0.2: icmp_seq={seq} time=")));
        }
        assert_eq!(s.exit_code(), 0);
        let (_, text) = s.handle_event(&PingEvent::Timeout { seq: 2 }).unwrap();
        assert_eq!(text, "no reply: icmp_seq=2");
        assert_eq!(s.exit_code(), 1);
        let shown = s.to_string();
        assert!(
            shown.contains("3 packets transmitted, 2 received, 33.3% packet loss"),
            "{shown}"
        );
        assert!(
            shown.contains("rtt min/avg/max = 0.500/1.000/1.500 ms"),
            "{shown}"
        );
    }

    #[test]
    fn seconds_or_durations() {
        assert_eq!(parse_seconds("0.2").unwrap(), 200 * MS);
        assert_eq!(parse_seconds("2").unwrap(), 2000 * MS);
        assert_eq!(parse_seconds("150ms").unwrap(), 150 * MS);
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
    }
}
