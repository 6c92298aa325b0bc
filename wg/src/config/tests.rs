//! Config parser tests: a full example, every error with its line, proptests.

use super::*;
use proptest::prelude::*;

// RFC 7748 §6.1 key pairs, so the public keys are valid X25519 points.
const PRIV_A: &str = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=";
const PUB_A: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
const PUB_B: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";
const PSK: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

fn err(text: &str) -> ConfigError {
    match parse(text) {
        Ok(c) => panic!("expected an error, parsed {c:?}"),
        Err(e) => e,
    }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn keys_are_what_they_claim() {
    let private: PrivateKey = PRIV_A.parse().unwrap();
    assert_eq!(private.public_key().to_base64(), PUB_A);
    assert!(PUB_B.parse::<PublicKey>().unwrap().is_valid_x25519());
}

#[test]
fn full_example() {
    let text = format!(
        "# tailnode example\n\
         [Interface]\n\
         PrivateKey = {PRIV_A}\n\
         Address = 100.64.0.1/32, fd7a:115c:a1e0::1/128\n\
         address=10.0.0.1/24   # repeated, host bits kept\n\
         ListenPort = 51820\n\
         MTU = 1420\n\
         DNS = 100.100.100.100\n\
         PostUp = iptables -A FORWARD -i %i -j ACCEPT\n\
         \n\
         [Peer]\n\
         PublicKey = {PUB_A}\n\
         PresharedKey = {PSK}\n\
         AllowedIPs = 100.64.0.2/32, fd7a:115c:a1e0::2/128\n\
         AllowedIPs = 10.1.2.3/16\n\
         Endpoint = 192.0.2.1:51820\n\
         PersistentKeepalive = 25\n\
         \n\
         [peer]\n\
         publickey={PUB_B}\n\
         allowedips = 100.64.0.3\n\
         ENDPOINT = [fd00::1]:51821\n\
         PersistentKeepalive = off\n\
         [Peer]\n\
         PublicKey = {}\n\
         Endpoint = node-3.example.com:4242\n\
         AllowedIPs =\n",
        PrivateKey::from_bytes([7; 32]).public_key()
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.interface.private_key.to_base64(), PRIV_A);
    assert_eq!(
        c.interface.addresses,
        vec![
            net("100.64.0.1/32"),
            net("fd7a:115c:a1e0::1/128"),
            net("10.0.0.1/24")
        ]
    );
    assert_eq!(c.interface.listen_port, Some(51820));
    assert_eq!(c.interface.mtu, Some(1420));
    assert_eq!(
        c.warnings,
        vec![
            ConfigWarning {
                line: 8,
                key: "DNS".into()
            },
            ConfigWarning {
                line: 9,
                key: "PostUp".into()
            }
        ]
    );
    assert_eq!(
        c.warnings[0].to_string(),
        "line 8: DNS needs a kernel interface and is ignored by tailnode"
    );
    assert_eq!(c.peers.len(), 3);
    let a = &c.peers[0];
    assert_eq!(a.public_key.to_base64(), PUB_A);
    assert_eq!(a.preshared_key.as_ref().unwrap().to_base64(), PSK);
    assert_eq!(
        a.allowed_ips,
        vec![
            net("100.64.0.2/32"),
            net("fd7a:115c:a1e0::2/128"),
            net("10.1.0.0/16")
        ]
    );
    assert_eq!(
        a.endpoint,
        Some(Endpoint::Addr("192.0.2.1:51820".parse().unwrap()))
    );
    assert_eq!(a.persistent_keepalive, Some(25));
    let b = &c.peers[1];
    assert_eq!(b.allowed_ips, vec![net("100.64.0.3/32")]);
    assert_eq!(
        b.endpoint,
        Some(Endpoint::Addr("[fd00::1]:51821".parse().unwrap()))
    );
    assert_eq!(b.persistent_keepalive, None);
    assert_eq!(b.preshared_key, None);
    let h = &c.peers[2];
    assert_eq!(
        h.endpoint,
        Some(Endpoint::Host {
            host: "node-3.example.com".into(),
            port: 4242
        })
    );
    assert_eq!(
        h.endpoint.as_ref().unwrap().to_string(),
        "node-3.example.com:4242"
    );
    assert!(h.allowed_ips.is_empty());

    let engine_peer = a.to_peer_config();
    assert_eq!(
        engine_peer.endpoint,
        Some("192.0.2.1:51820".parse().unwrap())
    );
    assert_eq!(engine_peer.persistent_keepalive, Some(25));
    assert_eq!(
        h.to_peer_config().endpoint,
        None,
        "host names are resolved by the caller"
    );

    // Printing and parsing again gives the same configuration.
    let again = parse(&c.to_wg_quick_string()).unwrap();
    assert_eq!(again.interface, c.interface);
    assert_eq!(again.peers, c.peers);
}

#[test]
fn crlf_bom_and_minimal_file() {
    let text = format!("\u{feff}[Interface]\r\nPrivateKey={PRIV_A}\r\n");
    let c = parse(&text).unwrap();
    assert!(c.peers.is_empty() && c.interface.addresses.is_empty());
    assert_eq!(c.interface.mtu, None);
}

/// Every error kind, with the line it must be reported on.
#[test]
fn errors_carry_their_line() {
    let iface = format!("[Interface]\nPrivateKey = {PRIV_A}\n");
    let cases: Vec<(String, usize, &str)> = vec![
        (
            format!("{iface}[Interfaces]\n"),
            3,
            "line 3: unknown section [Interfaces]",
        ),
        (
            format!("{iface}[Peer\n"),
            3,
            "line 3: malformed section header",
        ),
        (
            format!("{iface}\n[Interface]\n"),
            4,
            "line 4: duplicate [Interface] section",
        ),
        (
            format!("# c\nListenPort = 1\n{iface}"),
            2,
            "line 2: ListenPort is outside of any section",
        ),
        (
            format!("{iface}Foo = bar\n"),
            3,
            "line 3: unknown key Foo in [Interface]",
        ),
        (
            format!("{iface}[Peer]\nPublicKey = {PUB_A}\nAddress = 10.0.0.1\n"),
            5,
            "line 5: unknown key Address in [Peer]",
        ),
        (
            format!("{iface}ListenPort = 1\nlistenport = 2\n"),
            4,
            "line 4: duplicate listenport",
        ),
        (format!("{iface}MTU\n"), 3, "line 3: expected `key = value`"),
        (
            "[Interface]\nPrivateKey = not-base64!\n".to_owned(),
            2,
            "line 2: invalid PrivateKey: key is not valid base64",
        ),
        (
            format!("{iface}[Peer]\n\nPublicKey = AAAA\n"),
            5,
            "line 5: invalid PublicKey: key must be 32 bytes (44 base64 characters), got 3 bytes",
        ),
        (
            format!("{iface}[Peer]\nPublicKey = AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"),
            4,
            "line 4: invalid PublicKey: not a usable X25519 key",
        ),
        (
            format!("{iface}[Peer]\nPublicKey = {PUB_A}\nPresharedKey = xyz\n"),
            5,
            "line 5: invalid PresharedKey: key is not valid base64",
        ),
        (
            format!("{iface}Address = 10.0.0.1/33\n"),
            3,
            "line 3: invalid Address entry \"10.0.0.1/33\": expected an IP address or CIDR prefix",
        ),
        (
            format!("{iface}[Peer]\nPublicKey = {PUB_A}\nAllowedIPs = 10.0.0.0/8,, 10.1.0.0/16\n"),
            5,
            "line 5: invalid AllowedIPs entry \"\": expected an IP address or CIDR prefix",
        ),
        (
            format!("{iface}[Peer]\nPublicKey = {PUB_A}\nAllowedIPs = fd00::/129\n"),
            5,
            "line 5: invalid AllowedIPs entry \"fd00::/129\": expected an IP address or CIDR prefix",
        ),
        (
            format!("{iface}ListenPort = 65536\n"),
            3,
            "line 3: invalid ListenPort \"65536\": expected a number 0..=65535",
        ),
        (
            format!("{iface}MTU = 575\n"),
            3,
            "line 3: invalid MTU \"575\": expected a number 576..=65535",
        ),
        (
            format!("{iface}MTU = big\n"),
            3,
            "line 3: invalid MTU \"big\": expected a number 576..=65535",
        ),
        (
            format!("{iface}MTU = 1200\nAddress = 10.0.0.1, fd00::1\n"),
            3,
            "line 3: MTU 1200 is below 1280, the minimum for IPv6 (an IPv6 Address is configured)",
        ),
        (
            format!("{iface}[Peer]\nPublicKey = {PUB_A}\nPersistentKeepalive = sometimes\n"),
            5,
            "line 5: invalid PersistentKeepalive \"sometimes\": expected off or a number 0..=65535",
        ),
        (
            format!("{iface}[Peer]\nPublicKey = {PUB_A}\nEndpoint = 192.0.2.1\n"),
            5,
            "line 5: invalid Endpoint \"192.0.2.1\": missing :port",
        ),
        (
            format!("{iface}[Peer]\nPublicKey = {PUB_A}\nEndpoint = host.example:0\n"),
            5,
            "line 5: invalid Endpoint \"host.example:0\": port must be a number 1..=65535",
        ),
        (
            format!("{iface}[Peer]\nPublicKey = {PUB_A}\nEndpoint = fd00::1:51820\n"),
            5,
            "line 5: invalid Endpoint \"fd00::1:51820\": IPv6 addresses must be written as [address]:port",
        ),
        (
            format!("{iface}[Peer]\nPublicKey = {PUB_A}\nEndpoint = [fd00::1]\n"),
            5,
            "line 5: invalid Endpoint \"[fd00::1]\": missing :port",
        ),
        (
            format!("{iface}[Peer]\nPublicKey = {PUB_A}\nEndpoint = bad host:1\n"),
            5,
            "line 5: invalid Endpoint \"bad host:1\": not a valid host name or IP address",
        ),
        ("# nothing\n".to_owned(), 0, "missing [Interface] section"),
        (
            "\n[Interface]\nListenPort = 1\n".to_owned(),
            2,
            "line 2: [Interface] has no PrivateKey",
        ),
        (
            format!("{iface}[Peer]\nPublicKey = {PUB_A}\n\n[Peer]\nAllowedIPs = 10.0.0.1\n"),
            6,
            "line 6: [Peer] has no PublicKey",
        ),
        (
            format!("{iface}[Peer]\nPublicKey = {PUB_A}\n[Peer]\nPublicKey = {PUB_A}\n"),
            6,
            "line 6: duplicate peer: PublicKey hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo= already appears in an earlier [Peer]",
        ),
    ];
    for (text, line, message) in cases {
        let e = err(&text);
        assert_eq!(e.line, line, "{text:?} -> {e}");
        assert_eq!(e.to_string(), message, "{text:?}");
    }
}

#[test]
fn ipv4_only_config_allows_small_mtu_and_keepalive_zero_is_off() {
    let text = format!(
        "[Interface]\nPrivateKey = {PRIV_A}\nAddress = 10.0.0.1\nMTU = 576\n\
         [Peer]\nPublicKey = {PUB_B}\nPersistentKeepalive = 0\n"
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.interface.mtu, Some(576));
    assert_eq!(c.peers[0].persistent_keepalive, None);
}

fn arb_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<u32>(), 0u8..=32)
            .prop_map(|(a, l)| { IpNet::V4(ipnet::Ipv4Net::new(a.into(), l).unwrap_or_default()) }),
        (any::<u128>(), 0u8..=128)
            .prop_map(|(a, l)| { IpNet::V6(ipnet::Ipv6Net::new(a.into(), l).unwrap_or_default()) }),
    ]
}

fn arb_endpoint() -> impl Strategy<Value = Endpoint> {
    prop_oneof![
        (any::<u32>(), 1u16..).prop_map(|(a, p)| Endpoint::Addr(SocketAddr::new(
            std::net::Ipv4Addr::from(a).into(),
            p
        ))),
        (any::<u128>(), 1u16..).prop_map(|(a, p)| Endpoint::Addr(SocketAddr::new(
            std::net::Ipv6Addr::from(a).into(),
            p
        ))),
        ("[a-z][a-z0-9-]{0,10}(\\.[a-z][a-z0-9-]{0,10}){0,3}", 1u16..)
            .prop_map(|(host, port)| Endpoint::Host { host, port }),
    ]
}

fn arb_peer() -> impl Strategy<Value = PeerSection> {
    (
        any::<[u8; 32]>(),
        proptest::option::of(any::<[u8; 32]>()),
        proptest::collection::vec(arb_net(), 0..5),
        proptest::option::of(arb_endpoint()),
        proptest::option::of(1u16..),
    )
        .prop_map(|(seed, psk, nets, endpoint, keepalive)| PeerSection {
            public_key: PrivateKey::from_bytes(seed).public_key(),
            preshared_key: psk.map(PresharedKey::from_bytes),
            allowed_ips: nets.into_iter().map(|n| n.trunc()).collect(),
            endpoint,
            persistent_keepalive: keepalive,
        })
}

fn arb_config() -> impl Strategy<Value = WgQuickConfig> {
    (
        any::<[u8; 32]>(),
        proptest::collection::vec(arb_net(), 0..4),
        proptest::option::of(any::<u16>()),
        proptest::option::of(1280u16..),
        proptest::collection::vec(arb_peer(), 0..4),
    )
        .prop_map(|(key, addresses, listen_port, mtu, mut peers)| {
            let mut seen = HashSet::new();
            peers.retain(|p| seen.insert(p.public_key));
            WgQuickConfig {
                interface: InterfaceSection {
                    private_key: PrivateKey::from_bytes(key),
                    addresses,
                    listen_port,
                    mtu,
                },
                peers,
                warnings: Vec::new(),
            }
        })
}

proptest! {
    /// Any text gives a config or an error with a line inside the file; never a panic.
    #[test]
    fn never_panics_on_arbitrary_text(text in "\\PC*(\n\\PC*){0,8}") {
        let lines = text.lines().count();
        if let Err(e) = parse(&text) {
            prop_assert!(e.line <= lines);
            prop_assert!(!e.to_string().is_empty());
        }
    }

    /// Lines built from the format's own vocabulary, shuffled: never a panic.
    #[test]
    fn never_panics_on_plausible_lines(
        lines in proptest::collection::vec(
            prop_oneof![
                Just("[Interface]".to_owned()),
                Just("[Peer]".to_owned()),
                Just(format!("PrivateKey = {PRIV_A}")),
                Just(format!("PublicKey = {PUB_A}")),
                Just(format!("PublicKey = {PUB_B}")),
                "(Address|AllowedIPs|Endpoint|MTU|ListenPort|PersistentKeepalive|DNS) ?= ?[0-9a-f:./\\[\\], ]{0,30}",
                "[ -~]{0,40}",
            ],
            0..20,
        )
    ) {
        let _ = parse(&lines.join("\n"));
    }

    /// Printing a valid config and parsing it back gives the same config.
    #[test]
    fn round_trip(config in arb_config()) {
        let text = config.to_wg_quick_string();
        let parsed = parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(parsed, config);
    }
}
