//! `tailnode status`: the running node's state, fetched through its local API, as a summary or
//! as the JSON document.

use tailnode::status::Status;

/// A human summary of a status document (`tailnode status`).
pub fn render(status: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let n = &status.node;
    let addrs: Vec<String> = n.addresses.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        out,
        "{}  {}  udp {}  key {}",
        n.name.as_deref().unwrap_or("(unnamed)"),
        addrs.join(" "),
        n.udp_port,
        n.public_key
    );
    let c = &n.control;
    match c.state.as_str() {
        "disabled" => {
            let _ = writeln!(out, "control: none (static peers only)");
        }
        state => {
            let mut line = format!(
                "control: {state} {}",
                c.coordinator.as_deref().unwrap_or("")
            );
            if let Some(s) = c.state_seconds {
                let _ = write!(line, " for {s:.0}s");
            }
            if c.attempts > 0 {
                let _ = write!(line, ", {} failed attempts", c.attempts);
            }
            if let Some(e) = &c.last_error {
                let _ = write!(
                    line,
                    ", last error {:.0}s ago: {} ({})",
                    e.seconds_ago, e.message, e.kind
                );
            }
            let _ = writeln!(out, "{line}");
        }
    }
    for p in &status.peers {
        let handshake = p
            .last_handshake_seconds_ago
            .map_or_else(|| "never".to_string(), |s| format!("{s:.0}s ago"));
        let endpoint = p
            .endpoint
            .map_or_else(|| "-".to_string(), |e| e.to_string());
        let _ = writeln!(
            out,
            "  {:<16} {:<8} {:<11} {:<40} handshake {:<9} rx {} tx {}  {}",
            p.name.as_deref().unwrap_or("-"),
            p.state,
            p.source,
            p.allowed_ips.join(","),
            handshake,
            p.rx_bytes,
            p.tx_bytes,
            endpoint
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_the_node_and_its_control_state() {
        let status: Status = serde_json::from_value(serde_json::json!({
            "version": 1,
            "node": {
                "name": "laptop",
                "public_key": "k",
                "addresses": ["100.64.0.1"],
                "udp_port": 41641,
                "endpoints": [],
                "control": {
                    "state": "disabled",
                    "attempts": 0,
                    "sessions_started": 0,
                    "dials": 0,
                    "dial_failures": {},
                },
            },
            "peers": [],
        }))
        .expect("a status document");
        let shown = render(&status);
        assert!(
            shown.starts_with("laptop  100.64.0.1  udp 41641  key k"),
            "{shown}"
        );
        assert!(
            shown.contains("control: none (static peers only)"),
            "{shown}"
        );
    }
}
