//! Network namespaces for tests, and a foreign WireGuard peer (wireguard-go
//! on a TUN device) inside one.
//!
//! Layout for slot `N` (1..=200; every test uses its own slot):
//!
//! ```text
//!  root namespace                       namespace tn<pid>-N
//!  veth tnh<id>  198.18.N.1/30  <====>  veth tnp<id> 198.18.N.2/30
//!  tailnode (UDP on all addresses)      wireguard-go tnwg<id>, UDP :51820
//!  tailnet 100.64.N.1, fd7a:115c:a1e0:N::1   tailnet 100.64.N.2/24, fd7a:115c:a1e0:N::2/64
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tailnode_wg::{PrivateKey, PublicKey};

use crate::process::{Proc, TempDir, WgPeer, wg_quick};

/// Panics with a clear message unless the test can create namespaces.
pub fn require_root() {
    let uid = Command::new("id").arg("-u").output().expect("run id -u");
    let uid = String::from_utf8_lossy(&uid.stdout).trim().to_string();
    assert_eq!(
        uid, "0",
        "this test creates network namespaces and needs root (CI runs as root; run scripts/test.sh)"
    );
    for tool in ["ip", "wg", "wireguard-go", "ping"] {
        assert!(
            which(tool),
            "{tool} not found: run scripts/test.sh, which installs the test dependencies"
        );
    }
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs a command, panicking with its output if it fails.
pub fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command and returns its output whatever the status.
pub fn run_unchecked(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        let _ = run_unchecked(&["ip", "netns", "del", name]);
        run(&["ip", "netns", "add", name]);
        run(&["ip", "-n", name, "link", "set", "lo", "up"]);
        Self {
            name: name.to_string(),
        }
    }

    /// `ip netns exec NAME args...`, checked.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// `ip netns exec NAME args...`, unchecked.
    pub fn exec_unchecked(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run_unchecked(&full)
    }

    /// Starts a long-running process inside the namespace.
    pub fn spawn(&self, name: &str, program: &Path, args: &[String], log: &Path) -> Proc {
        let mut full = vec![
            "netns".to_string(),
            "exec".to_string(),
            self.name.clone(),
            program.display().to_string(),
        ];
        full.extend_from_slice(args);
        Proc::spawn(name, Path::new("ip"), &full, &[], log.to_path_buf())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run_unchecked(&["ip", "netns", "del", &self.name]);
    }
}

/// A veth pair with one end moved into a namespace; deleted on drop.
pub struct Veth {
    host_if: String,
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = run_unchecked(&["ip", "link", "del", &self.host_if]);
    }
}

/// Addresses of a test slot (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Slot(pub u8);

impl Slot {
    pub fn host_underlay(&self) -> IpAddr {
        format!("198.18.{}.1", self.0).parse().unwrap()
    }
    pub fn ns_underlay(&self) -> IpAddr {
        format!("198.18.{}.2", self.0).parse().unwrap()
    }
    pub fn node_v4(&self) -> String {
        format!("100.64.{}.1", self.0)
    }
    pub fn node_v6(&self) -> String {
        format!("fd7a:115c:a1e0:{}::1", self.0)
    }
    pub fn peer_v4(&self) -> String {
        format!("100.64.{}.2", self.0)
    }
    pub fn peer_v6(&self) -> String {
        format!("fd7a:115c:a1e0:{}::2", self.0)
    }
    fn id(&self) -> String {
        format!("{}{}", std::process::id() % 100_000, self.0)
    }
}

/// A namespace linked to the root namespace by a veth pair (see the module
/// docs for the addresses of a slot).
pub struct LinkedNetns {
    pub slot: Slot,
    // Field order matters: the veth goes before the namespace.
    _veth: Veth,
    pub netns: Netns,
}

impl LinkedNetns {
    pub fn new(slot: Slot) -> Self {
        require_root();
        let id = slot.id();
        let netns = Netns::new(&format!("tn{id}"));
        let host_if = format!("tnh{id}");
        let ns_if = format!("tnp{id}");
        let _ = run_unchecked(&["ip", "link", "del", &host_if]);
        run(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        let veth = Veth {
            host_if: host_if.clone(),
        };
        run(&["ip", "link", "set", &ns_if, "netns", &netns.name]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", slot.host_underlay()),
            "dev",
            &host_if,
        ]);
        run(&["ip", "link", "set", &host_if, "up"]);
        netns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", slot.ns_underlay()),
            "dev",
            &ns_if,
        ]);
        netns.exec(&["ip", "link", "set", &ns_if, "up"]);
        Self {
            slot,
            _veth: veth,
            netns,
        }
    }

    /// Drops `per_mille` of the UDP datagrams entering and leaving the
    /// namespace, at random, with an nftables rule (this kernel has no
    /// `netem`); replaces the loss set before, and 0 removes it.
    pub fn udp_loss(&self, per_mille: u32) {
        let _ = self
            .netns
            .exec_unchecked(&["nft", "delete", "table", "inet", "tailnode_loss"]);
        if per_mille == 0 {
            return;
        }
        self.netns
            .exec(&["nft", "add", "table", "inet", "tailnode_loss"]);
        for (chain, hook) in [("in", "input"), ("out", "output")] {
            self.netns.exec(&[
                "nft",
                "add",
                "chain",
                "inet",
                "tailnode_loss",
                chain,
                &format!("{{ type filter hook {hook} priority 0; }}"),
            ]);
            self.netns.exec(&[
                "nft",
                "add",
                "rule",
                "inet",
                "tailnode_loss",
                chain,
                "meta",
                "l4proto",
                "udp",
                "numgen",
                "random",
                "mod",
                "1000",
                "lt",
                &per_mille.to_string(),
                "counter",
                "drop",
            ]);
        }
    }

    /// How many datagrams the [`udp_loss`](Self::udp_loss) rules dropped.
    pub fn udp_dropped(&self) -> u64 {
        let out = self
            .netns
            .exec_unchecked(&["nft", "list", "table", "inet", "tailnode_loss"]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "packets")
            .filter_map(|w| w[1].parse::<u64>().ok())
            .sum()
    }
}

/// wireguard-go on a TUN device in its own namespace, peered with one node.
pub struct WireguardGo {
    // Dropped first: wireguard-go stops before its namespace goes.
    _proc: Proc,
    pub slot: Slot,
    link: LinkedNetns,
    pub iface: String,
    pub public_key: PublicKey,
    pub listen_port: u16,
}

impl WireguardGo {
    /// Sets up the namespace, the veth link and wireguard-go, with `node` as
    /// its only peer (reachable at `node_endpoint`, if given).
    pub fn start(
        slot: Slot,
        dir: &TempDir,
        node: PublicKey,
        node_endpoint: Option<SocketAddr>,
    ) -> Self {
        let link = LinkedNetns::new(slot);
        let id = slot.id();
        let netns = &link.netns;
        let iface = format!("tnwg{id}");
        let sock = format!("/var/run/wireguard/{iface}.sock");
        let _ = std::fs::remove_file(&sock);
        let proc = netns.spawn(
            "wireguard-go",
            Path::new("wireguard-go"),
            &["-f".to_string(), iface.clone()],
            &dir.path().join(format!("wireguard-go-{id}.log")),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Path::new(&sock).exists() {
            assert!(
                Instant::now() < deadline,
                "wireguard-go did not create {sock}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let key = PrivateKey::generate();
        let key_file = dir.write(&format!("wggo-{id}.key"), &key.to_base64());
        let listen_port = 51820u16;
        let allowed = format!("{}/32,{}/128", slot.node_v4(), slot.node_v6());
        let mut wg_args = vec![
            "wg".to_string(),
            "set".to_string(),
            iface.clone(),
            "private-key".to_string(),
            key_file.display().to_string(),
            "listen-port".to_string(),
            listen_port.to_string(),
            "peer".to_string(),
            node.to_base64(),
            "allowed-ips".to_string(),
            allowed,
        ];
        if let Some(ep) = node_endpoint {
            wg_args.push("endpoint".to_string());
            wg_args.push(ep.to_string());
        }
        let refs: Vec<&str> = wg_args.iter().map(String::as_str).collect();
        netns.exec(&refs);
        netns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", slot.peer_v4()),
            "dev",
            &iface,
        ]);
        netns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/64", slot.peer_v6()),
            "dev",
            &iface,
        ]);
        netns.exec(&["ip", "link", "set", "mtu", "1420", "up", "dev", &iface]);
        Self {
            slot,
            link,
            iface,
            public_key: key.public_key(),
            listen_port,
            _proc: proc,
        }
    }

    /// The namespace wireguard-go runs in.
    pub fn netns(&self) -> &Netns {
        &self.link.netns
    }

    /// The link between the root namespace and wireguard-go's.
    pub fn link(&self) -> &LinkedNetns {
        &self.link
    }

    /// The wg-quick file of the node this wireguard-go was started for: `key`, the slot's node
    /// addresses, UDP `listen_port`, and this wireguard-go as its one peer.
    pub fn node_config(
        &self,
        key: &PrivateKey,
        listen_port: u16,
        persistent_keepalive: Option<u16>,
    ) -> String {
        let slot = self.slot;
        wg_quick(
            key,
            &[
                &format!("{}/32", slot.node_v4()),
                &format!("{}/128", slot.node_v6()),
            ],
            listen_port,
            &[WgPeer {
                public_key: self.public_key,
                allowed_ips: vec![
                    format!("{}/32", slot.peer_v4()),
                    format!("{}/128", slot.peer_v6()),
                ],
                endpoint: Some(self.endpoint().to_string()),
                persistent_keepalive,
            }],
        )
    }

    /// Starts `tailnode-testkit serve` on `port` (all addresses) inside the namespace.
    pub fn serve_transfers(&self, dir: &TempDir, port: u16) -> Proc {
        self.netns().spawn(
            "ns-server",
            &crate::testkit_bin(),
            &["serve".into(), format!("[::]:{port}")],
            &dir.path().join("ns-server.log"),
        )
    }

    /// The UDP endpoint our node should use.
    pub fn endpoint(&self) -> SocketAddr {
        SocketAddr::new(self.slot.ns_underlay(), self.listen_port)
    }

    /// `wg show IFACE dump` output, for diagnostics.
    pub fn dump(&self) -> String {
        let out = self
            .netns()
            .exec_unchecked(&["wg", "show", &self.iface, "dump"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
