//! A pod that forges a permitted peer's source address (a raw socket: NET_RAW
//! is in the default capability set) must not be judged as that peer. Two
//! nodes with the real control plane, agents and kernel programs; the
//! attacker sits next to the peer it impersonates and sends raw UDP and a TCP
//! SYN to a server on its own node (redirected past the stack, where
//! rp_filter never looks) and on the other node. Every forged packet is
//! dropped at the attacker's interface with reason `source-spoofed`, counted
//! in `/metrics`, shown by `observe` as forged by the attacker (not blamed on
//! the peer) and explained by `explain --via`; the real peer keeps working.
//! Needs root; fails without it.

use std::net::{IpAddr, UdpSocket};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use keyway_tests::netns::{
    Cluster, Fam, Forged, Pod, attached, connect, echo_round_trip, in_netns, labelled_workload, send_forged,
    tcp_echo,
};
use keyway_tests::{dual_stack, wait_until};

dual_stack!(a_forged_source_is_dropped_counted_and_blamed_on_the_forger_while_the_real_peer_passes);

/// The servers (app: api) take TCP 8080 from frontend with mutual auth and
/// UDP 5353 from frontend without; nobody else.
const POLICY: &str = "apiVersion: keyway.dev/v1alpha1
kind: KeywayNetworkPolicy
metadata: { name: api-in, namespace: default }
spec:
  endpointSelector: { matchLabels: { app: api } }
  ingress:
    - authentication: { mode: required }
      fromEndpoints: [{ matchLabels: { app: frontend } }]
      toPorts: [{ ports: [{ port: \"8080\", protocol: TCP }] }]
    - fromEndpoints: [{ matchLabels: { app: frontend } }]
      toPorts: [{ ports: [{ port: \"5353\", protocol: UDP }] }]
";

const SPOOFED: &str = r#"keyway_datapath_drops_total{reason="source-spoofed"}"#;

/// A UDP server in `pod` that reports every datagram's payload and sender.
fn udp_listener(fam: Fam, pod: &Pod, port: u16) -> mpsc::Receiver<(Vec<u8>, std::net::SocketAddr)> {
    let ip = fam.of(pod);
    let sock = in_netns(&pod.netns, move || UdpSocket::bind((ip, port)).expect("bind udp"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if tx.send((buf[..n].to_vec(), from)).is_err() {
                return;
            }
        }
    });
    rx
}

fn udp_send(from: &Pod, to: IpAddr, port: u16, payload: &'static [u8]) {
    let ip = if to.is_ipv6() { Fam::V6 } else { Fam::V4 }.of(from);
    let sock = in_netns(&from.netns, move || UdpSocket::bind((ip, 0)).expect("udp bind"));
    sock.send_to(payload, (to, port)).expect("udp send");
}

/// Waits for `payload` on `rx`; everything received meanwhile is returned.
fn received_until(rx: &mpsc::Receiver<(Vec<u8>, std::net::SocketAddr)>, payload: &[u8]) -> Vec<Vec<u8>> {
    let mut seen = Vec::new();
    loop {
        let (p, _) = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("no datagram {:?}; got {seen:?}", String::from_utf8_lossy(payload)));
        let done = p == payload;
        seen.push(p);
        if done {
            return seen;
        }
    }
}

fn a_forged_source_is_dropped_counted_and_blamed_on_the_forger_while_the_real_peer_passes(fam: Fam) {
    let mut cluster = Cluster::new(&["node-a", "node-b"]);
    let frontend = cluster.add_pod("node-a", "fe", 10);
    let intruder = cluster.add_pod("node-a", "in", 20);
    let cache = cluster.add_pod("node-a", "ca", 30);
    let api = cluster.add_pod("node-b", "api", 10);
    let (na, nb) = (cluster.node("node-a").clone(), cluster.node("node-b").clone());
    let deployment = cluster.deploy(
        &[],
        &[
            labelled_workload("frontend", "frontend", "frontend", "node-a", frontend.ip),
            labelled_workload("intruder", "intruder", "intruder", "node-a", intruder.ip),
            labelled_workload("cache", "cache", "api", "node-a", cache.ip),
            labelled_workload("api", "api", "api", "node-b", api.ip),
            POLICY.to_string(),
        ],
    );
    let (agent_a, agent_b) = (&deployment.agents[0], &deployment.agents[1]);
    for server in [&cache, &api] {
        tcp_echo(&server.netns, fam.of(server), 8080);
    }
    let udp_cache = udp_listener(fam, &cache, 5353);
    let udp_api = udp_listener(fam, &api, 5353);
    wait_until(
        Duration::from_secs(30),
        "the agents to attach to every pod",
        || {
            attached(&na, &frontend)
                && attached(&na, &intruder)
                && attached(&na, &cache)
                && attached(&nb, &api)
        },
    );
    let frontend_authenticated = |agent: &keyway_tests::netns::AgentProcess| {
        agent.auth_list().iter().any(|e| {
            e["remote_spiffe_id"]
                .as_str()
                .is_some_and(|s| s.ends_with("/sa/frontend"))
        })
    };
    wait_until(
        Duration::from_secs(30),
        "frontend to be pre-authenticated with both servers",
        || frontend_authenticated(agent_a) && frontend_authenticated(agent_b),
    );

    // The real peer passes, on both nodes, TCP (authenticated) and UDP.
    for server in [&cache, &api] {
        let mut s = connect(&frontend.netns, fam.of(server), 8080, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("frontend -> {}:8080: {e}", server.name));
        assert!(echo_round_trip(&mut s, b"real"));
    }
    udp_send(&frontend, fam.of(&cache), 5353, b"real-1");
    udp_send(&frontend, fam.of(&api), 5353, b"real-1");
    received_until(&udp_cache, b"real-1");
    received_until(&udp_api, b"real-1");
    let series = |text: &str| keyway_tests::http::value(text, SPOOFED).unwrap_or(0.0);
    let before = series(&agent_a.scrape());

    // The attack: intruder's packets claim frontend's address.
    for server in [&cache, &api] {
        send_forged(
            &intruder.netns,
            fam.of(&frontend),
            fam.of(server),
            Forged::Udp {
                src_port: 40000,
                dst_port: 5353,
                payload: b"forged",
            },
        );
        send_forged(
            &intruder.netns,
            fam.of(&frontend),
            fam.of(server),
            Forged::TcpSyn {
                src_port: 40001,
                dst_port: 8080,
            },
        );
    }
    wait_until(
        Duration::from_secs(10),
        "four source-spoofed drops on node-a",
        || series(&agent_a.scrape()) >= before + 4.0,
    );
    // Nothing forged arrived: the next real datagram is the first one after.
    udp_send(&frontend, fam.of(&cache), 5353, b"real-2");
    udp_send(&frontend, fam.of(&api), 5353, b"real-2");
    assert_eq!(received_until(&udp_cache, b"real-2"), vec![b"real-2".to_vec()]);
    assert_eq!(received_until(&udp_api, b"real-2"), vec![b"real-2".to_vec()]);
    // The real peer still passes after the attack.
    for server in [&cache, &api] {
        let mut s = connect(&frontend.netns, fam.of(server), 8080, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("frontend -> {}:8080 after the attack: {e}", server.name));
        assert!(echo_round_trip(&mut s, b"still real"));
    }

    // observe names the forger and its interface, and does not blame frontend.
    let records = agent_a.observe(&["--drop-reason", "source-spoofed"]);
    assert!(records.len() >= 4, "{records:#?}");
    for r in &records {
        assert_eq!(r["direction"], "egress", "{r:#}");
        assert_eq!(r["source"]["ip"], fam.of(&frontend).to_string(), "{r:#}");
        assert_eq!(
            r["source"]["pod"], "",
            "the forged address's owner is not blamed: {r:#}"
        );
        assert_eq!(r["source"]["identity"], 0, "{r:#}");
        assert_eq!(r["sender"]["pod"], "intruder", "{r:#}");
        assert_eq!(r["interface"], intruder.host_if.as_str(), "{r:#}");
    }
    let by_pod = agent_a.observe(&["--pod", "intruder", "--drop-reason", "source-spoofed"]);
    assert_eq!(by_pod.len(), records.len(), "--pod finds the forger's drops");
    // No flow record says frontend's forged packets reached anything.
    let forwarded_forged = agent_b
        .observe(&["--port", "5353"])
        .into_iter()
        .filter(|r| r["source"]["port"] == 40000)
        .count();
    assert_eq!(forwarded_forged, 0, "node-b never saw the forged datagram");

    // explain: what the intruder's interface does with frontend's address.
    // By name (IPv4, a pod's first address) or by IPv6 address.
    let (from, to) = match fam {
        Fam::V4 => ("default/frontend".to_string(), "default/cache".to_string()),
        Fam::V6 => (fam.of(&frontend).to_string(), fam.of(&cache).to_string()),
    };
    let out = Command::new(keyway_tests::bin("node-agent"))
        .args(["explain", "--from", &from, "--to", &to, "--port", "8080"])
        .args(["--via", &intruder.host_if, "-o", "json"])
        .arg("--admin-socket")
        .arg(&agent_a.admin_socket)
        .output()
        .expect("node-agent explain");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(r["verdict"], "DROPPED", "{r:#}");
    assert_eq!(r["drop_reason"], "source-spoofed", "{r:#}");
    let hint = r["hooks"][0]["to_allow"][0].as_str().unwrap_or_default();
    assert!(
        hint.contains("not an address of the pod behind") && hint.contains("default/intruder"),
        "{r:#}"
    );
    // Without --via, frontend's own traffic explains as forwarded.
    let out = Command::new(keyway_tests::bin("node-agent"))
        .args([
            "explain", "--from", &from, "--to", &to, "--port", "8080", "-o", "json",
        ])
        .arg("--admin-socket")
        .arg(&agent_a.admin_socket)
        .output()
        .expect("node-agent explain");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(r["verdict"], "FORWARDED", "{r:#}");
    let _ = (&deployment, &cluster);
}
