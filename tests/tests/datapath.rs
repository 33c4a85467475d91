//! The datapath in the real kernel: the real TC programs attached to veths
//! in network namespaces this test makes, real TCP/UDP/ICMP between them,
//! and the node agent's datapath module driving the maps. Needs root (CI is
//! root); fails, never skips, without it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyway_common::{AuthKey, auth_type, drop_reason, maps};
use keyway_tests::dual_stack;
use keyway_tests::netns::{
    Fam, Topology, connect, echo_round_trip, echo_types, enter_netns, icmp_arrives, icmp_error, icmp_socket,
    in_netns, ping, pmtu_socket, send_icmp, send_icmp_error, sysctl, tcp_echo, unreachable, v6_of,
};
use keyway_tests::wait_until;
use node_agent::datapath::endpoints::Withheld;
use node_agent::datapath::{
    self, AuthMap, DatapathConfig, DatapathStatus, Flow, FlowKind, MissingAuth, PinnedAuthMap,
};
use node_agent::state::NodeState;
use proto::keyway as pb;
use tokio::sync::{broadcast, mpsc, watch};

const NODE: &str = "node-1";
const NODE_ID: u32 = 1;
const REMOTE_NODE_ID: u32 = 2;
const A: u32 = 300;
const B: u32 = 301;
const R: u32 = 302;
const IP_A: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const IP_B: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const IP_R: Ipv4Addr = Ipv4Addr::new(10, 201, 9, 1);
const INGRESS: u32 = 0;
const EGRESS: u32 = 1;
const TCP: u32 = 6;
const UDP: u32 = 17;

// ---- address families ----

/// Both addresses of the dual-stack pod whose IPv4 address is `v4`.
fn both(v4: Ipv4Addr) -> Vec<IpAddr> {
    vec![IpAddr::V4(v4), IpAddr::V6(v6_of(v4))]
}

dual_stack!(
    allowed_tcp_udp_and_icmp_pass_and_local_pods_are_reached_by_redirect,
    a_flow_no_rule_allows_is_dropped_and_reported_policy_denied,
    every_policy_shape_a_subject_has_is_looked_up,
    auth_required_drops_and_signals_once_until_authenticated_and_again_after_expiry,
    traffic_to_a_remote_peer_goes_through_the_stack_under_egress_policy,
    restarting_the_loader_keeps_established_flows_and_the_tables,
    removing_a_workload_detaches_its_interface_and_clears_its_endpoint,
    a_pod_interface_made_after_the_agent_started_is_covered_on_the_netlink_event,
    an_unplaced_address_is_retried_without_any_event,
    an_icmp_error_about_a_flow_the_pod_sent_reaches_it_and_nothing_else_does,
    a_reply_stays_a_reply_when_the_policy_that_also_allowed_it_goes,
    a_pod_whose_identity_changes_is_judged_as_its_new_identity,
    a_dropped_packet_does_not_keep_the_replies_of_a_later_flow_out,
    only_the_echo_replies_to_a_pods_echo_request_come_back_as_its_replies,
    a_pair_still_unauthenticated_is_signalled_again_once_the_interval_has_passed,
    a_pod_whose_address_moves_can_no_longer_send_from_the_old_one,
);

// ---- the datapath, running on a thread inside the node namespace ----

struct Running {
    state: watch::Sender<Arc<NodeState>>,
    status: watch::Receiver<DatapathStatus>,
    flows: broadcast::Sender<Flow>,
    signals: mpsc::Receiver<MissingAuth>,
    auth: Arc<PinnedAuthMap>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn start(topo: &Topology, cfg: impl FnOnce(&mut DatapathConfig), state: NodeState) -> Running {
    let mut config = DatapathConfig::new(&topo.pin_dir, NODE);
    // Endpoints come from rtnetlink events; the resync never runs within a
    // test, nor the retry of unplaced addresses.
    config.resync_interval = Duration::from_secs(3600);
    config.unresolved_retry = None;
    cfg(&mut config);
    let (state_tx, state_rx) = watch::channel(Arc::new(state));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let ns = format!("/run/netns/{}", topo.node);
    let thread = std::thread::spawn(move || {
        enter_netns(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let handles = datapath::start(config, state_rx, stop_rx.clone());
            let ok = handles.is_ok();
            ready_tx.send(handles).expect("test waits");
            if ok {
                let mut stop = stop_rx;
                let _ = stop.wait_for(|s| *s).await;
            }
        });
    });
    let handles = ready_rx
        .recv()
        .expect("datapath thread")
        .expect("datapath starts");
    Running {
        state: state_tx,
        status: handles.status,
        flows: handles.flows,
        signals: handles.signals,
        auth: handles.auth,
        stop: stop_tx,
        thread: Some(thread),
    }
}

impl Running {
    /// Publishes `state` and waits until its tables are in the kernel and
    /// every pod interface has the programs attached.
    fn apply(&self, mut state: NodeState, topo: &Topology) {
        let revision = self.state.borrow().revision + 1;
        state.revision = revision;
        self.state.send_replace(Arc::new(state));
        self.wait_applied(revision, topo);
    }

    fn wait_applied(&self, revision: u64, topo: &Topology) {
        let ifaces: Vec<String> = topo.pods.iter().map(|p| p.host_if.clone()).collect();
        let start = Instant::now();
        loop {
            {
                let s = self.status.borrow();
                if s.revision >= revision && ifaces.iter().all(|i| s.attached.contains(i)) {
                    return;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "the datapath did not apply revision {revision} to {ifaces:?}: {s:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(t) = self.thread.take() {
            t.join().expect("datapath thread");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- node state as the control plane would send it ----

/// Pins `ip` to `mac` in `ns`'s neighbour table (eth0), so no ARP is needed
/// (or, pointed at the wrong MAC, as a poisoned cache would leave it).
fn static_neighbour(ns: &str, ip: Ipv4Addr, mac: &str) {
    keyway_tests::netns::run(
        "ip",
        &[
            "-n",
            ns,
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    );
}

/// A local dual-stack workload and its ipcache entries (both addresses,
/// one identity).
fn add_workload(state: &mut NodeState, name: &str, identity: u32, ip: Ipv4Addr) {
    state
        .workloads
        .insert(("default".into(), name.into()), workload(name, identity, ip));
    for fam in [Fam::V4, Fam::V6] {
        let len = if fam == Fam::V4 { 32 } else { 128 };
        let cidr = format!("{}/{len}", fam.ip(ip));
        state.ipcache.insert(
            cidr.clone(),
            pb::IpcacheEntry {
                cidr,
                identity,
                node_id: NODE_ID,
                ..Default::default()
            },
        );
    }
}

/// Names, in pod `name`'s record, the namespace it lives in (a `netns:` or
/// `k8s:pod-uid:` selector), as placement behind a bridge requires.
fn home(state: &mut NodeState, name: &str, selector: String) {
    state
        .workloads
        .get_mut(&("default".to_string(), name.to_string()))
        .expect("a workload of that name")
        .selectors = vec![selector];
}

/// Takes every IPv6 address out of `state` (workloads and ipcache).
fn strip_v6(state: &mut NodeState) {
    for w in state.workloads.values_mut() {
        w.ips.retain(|ip| !ip.contains(':'));
    }
    state.ipcache.retain(|cidr, _| !cidr.contains(':'));
}

fn workload(name: &str, identity: u32, ip: Ipv4Addr) -> pb::Workload {
    pb::Workload {
        namespace: "default".into(),
        name: name.into(),
        service_account: name.into(),
        node: NODE.into(),
        ips: both(ip).iter().map(|ip| ip.to_string()).collect(),
        identity,
        spiffe_id: format!("spiffe://example.org/ns/default/sa/{name}"),
        ..Default::default()
    }
}

struct StateBuilder(NodeState);

impl StateBuilder {
    /// Pods a and b on this node, R on node 2; nothing selected by policy
    /// except what the test adds (default allow both ways for a).
    fn new() -> StateBuilder {
        let mut s = NodeState {
            synced: true,
            ..Default::default()
        };
        for (name, id, ip) in [("a", A, IP_A), ("b", B, IP_B)] {
            s.workloads
                .insert(("default".into(), name.into()), workload(name, id, ip));
        }
        for (ip, id, node) in [(IP_A, A, NODE_ID), (IP_B, B, NODE_ID), (IP_R, R, REMOTE_NODE_ID)] {
            for cidr in [format!("{ip}/32"), format!("{}/128", v6_of(ip))] {
                s.ipcache.insert(
                    cidr.clone(),
                    pb::IpcacheEntry {
                        cidr,
                        identity: id,
                        node_id: node,
                        ..Default::default()
                    },
                );
            }
        }
        s.nodes.insert(
            NODE.into(),
            pb::Node {
                name: NODE.into(),
                node_id: NODE_ID,
                addresses: vec![],
            },
        );
        StateBuilder(s)
    }

    /// An entry for one port (port 0: every port and protocol).
    fn rule(mut self, key: (u32, u32, u32, u32, u32), auth: bool, rule: &str) -> Self {
        let (k, e) = node_agent::state::port_entry(key, auth, rule);
        self.0.policy.insert(k, e);
        self
    }

    /// No policy selects `id` in `dir`: anything goes.
    fn default_allow(self, id: u32, dir: u32) -> Self {
        self.rule((id, 0, 0, 0, dir), false, "default-allow")
    }

    fn open(self) -> Self {
        self.default_allow(A, INGRESS)
            .default_allow(A, EGRESS)
            .default_allow(B, INGRESS)
            .default_allow(B, EGRESS)
    }

    fn build(self) -> NodeState {
        self.0
    }

    /// No IPv6 anywhere: for layouts whose pods have IPv4 only.
    fn v4_only(mut self) -> Self {
        strip_v6(&mut self.0);
        self
    }
}

// ---- traffic ----

fn udp_echo(ns: &str, ip: impl Into<IpAddr>, port: u16) {
    let ip: IpAddr = ip.into();
    let sock = in_netns(ns, move || UdpSocket::bind((ip, port)).expect("bind udp echo"));
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
}

fn udp_round_trip(ns: &str, ip: impl Into<IpAddr>, port: u16) -> bool {
    let ip: IpAddr = ip.into();
    let any = if ip.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
    let sock = in_netns(ns, move || UdpSocket::bind(any).expect("udp bind"));
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    if sock.send_to(b"ping", (ip, port)).is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(sock.recv_from(&mut buf), Ok((4, _)))
}

/// Waits for a flow event matching `pred`.
fn expect_flow(rx: &mut broadcast::Receiver<Flow>, what: &str, pred: impl Fn(&Flow) -> bool) -> Flow {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match rx.try_recv() {
            Ok(f) if pred(&f) => return f,
            Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(broadcast::error::TryRecvError::Empty) => {
                assert!(Instant::now() < deadline, "no flow event: {what}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("flow stream closed: {e}"),
        }
    }
}

fn drain_flows(rx: &mut broadcast::Receiver<Flow>) -> Vec<Flow> {
    let mut out = Vec::new();
    while let Ok(f) = rx.try_recv() {
        out.push(f);
    }
    out
}

// ---- tests ----

fn allowed_tcp_udp_and_icmp_pass_and_local_pods_are_reached_by_redirect(fam: Fam) {
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    let b = topo.add_pod("b", IP_B);
    let dp = start(&topo, |_| {}, NodeState::default());
    let mut flows = dp.flows.subscribe();
    dp.apply(StateBuilder::new().open().build(), &topo);

    tcp_echo(&b.netns, fam.ip(IP_B), 8080);
    udp_echo(&b.netns, fam.ip(IP_B), 5353);
    let mut conn =
        connect(&a.netns, fam.ip(IP_B), 8080, Duration::from_secs(3)).expect("a -> b TCP is allowed");
    assert!(echo_round_trip(&mut conn, b"hello"), "TCP data flows both ways");
    assert!(
        udp_round_trip(&a.netns, fam.ip(IP_B), 5353),
        "UDP a -> b and back"
    );
    assert!(ping(&a.netns, fam.ip(IP_B), 2), "ICMP a -> b and back");

    // New-flow events at both ends, with both identities.
    let port = conn.local_addr().unwrap().port();
    for from_pod in [true, false] {
        let f = expect_flow(&mut flows, "new TCP flow a -> b", |f| {
            f.kind == FlowKind::New && f.src_port == port && f.dst_port == 8080 && f.from_pod == from_pod
        });
        assert!(f.forwarded);
        assert_eq!(
            (f.src, f.dst, f.src_identity, f.dst_identity),
            (fam.ip(IP_A), fam.ip(IP_B), A, B)
        );
        assert_eq!(f.proto, 6);
    }

    // Never one event per forwarded packet: 200 more round trips on the
    // established connection add no event for it.
    drain_flows(&mut flows);
    for _ in 0..200 {
        assert!(echo_round_trip(&mut conn, b"x"));
    }
    let extra: Vec<Flow> = drain_flows(&mut flows)
        .into_iter()
        .filter(|f| f.src_port == port || f.dst_port == port)
        .collect();
    assert!(
        extra.is_empty(),
        "forwarded packets of a known flow made events: {extra:?}"
    );

    // With IP forwarding off in the node, only the programs' redirect can
    // carry a packet between the two pods: a new connection still works,
    // while traffic that must be routed (to the remote peer) cannot.
    let r = topo.add_remote(IP_R);
    tcp_echo(&r.netns, fam.ip(IP_R), 8080);
    assert!(
        connect(&a.netns, fam.ip(IP_R), 8080, Duration::from_secs(3)).is_ok(),
        "routed while forwarding is on"
    );
    sysctl(&topo.node, fam.forwarding(), "0");
    let mut conn2 =
        connect(&a.netns, fam.ip(IP_B), 8080, Duration::from_secs(3)).expect("redirected without routing");
    assert!(echo_round_trip(&mut conn2, b"redirected"));
    assert!(
        connect(&a.netns, fam.ip(IP_R), 8080, Duration::from_secs(1)).is_err(),
        "forwarding is really off"
    );
    dp.stop();
}

fn a_flow_no_rule_allows_is_dropped_and_reported_policy_denied(fam: Fam) {
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    let b = topo.add_pod("b", IP_B);
    // b is selected for ingress: only R may reach it, on 9999.
    let state = StateBuilder::new()
        .default_allow(A, INGRESS)
        .default_allow(A, EGRESS)
        .default_allow(B, EGRESS)
        .rule((B, R, 9999, TCP, INGRESS), false, "default/b-from-r ingress[0]")
        .build();
    let dp = start(&topo, |_| {}, NodeState::default());
    let mut flows = dp.flows.subscribe();
    dp.apply(state, &topo);
    tcp_echo(&b.netns, fam.ip(IP_B), 8080);

    assert!(
        connect(&a.netns, fam.ip(IP_B), 8080, Duration::from_secs(1)).is_err(),
        "a -> b:8080 must be dropped"
    );
    let f = expect_flow(&mut flows, "a drop of a -> b:8080", |f| {
        f.dst_port == 8080 && !f.forwarded
    });
    assert_eq!(f.drop_reason, drop_reason::POLICY_DENIED);
    assert_eq!(f.drop_reason_name(), "policy-denied");
    assert_eq!((f.src_identity, f.dst_identity), (A, B));
    assert!(!f.from_pod, "dropped where b's ingress policy is enforced");
    assert!(
        !ping(&a.netns, fam.ip(IP_B), 1),
        "no rule allows ICMP to b either"
    );

    // b can still open connections to a (its egress is open, a's ingress too).
    tcp_echo(&a.netns, fam.ip(IP_A), 7070);
    let mut c = connect(&b.netns, fam.ip(IP_A), 7070, Duration::from_secs(3)).expect("b -> a is allowed");
    assert!(echo_round_trip(&mut c, b"replies get back in"));
    dp.stop();
}

/// A packet dropped before any flow exists does not make its tuple a flow
/// of its own. a sends to b:6000 from 7070 first, and b admits no one;
/// then b's own datagram to a:7070 opens the flow, and a's answer on it
/// reaches b, as conntrack would have it. Otherwise whoever sends the
/// reverse tuple first (a host off the cluster forging a server's
/// address) would keep a pod's replies out.
fn a_dropped_packet_does_not_keep_the_replies_of_a_later_flow_out(fam: Fam) {
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    let b = topo.add_pod("b", IP_B);
    let dp = start(&topo, |_| {}, NodeState::default());
    let mut flows = dp.flows.subscribe();
    let state = StateBuilder::new()
        .default_allow(A, INGRESS)
        .default_allow(A, EGRESS)
        .default_allow(B, EGRESS)
        .rule((B, R, 9999, UDP, INGRESS), false, "default/b-from-r ingress[0]")
        .build();
    dp.apply(state, &topo);
    let (ip_a, ip_b) = (fam.ip(IP_A), fam.ip(IP_B));
    let sa = in_netns(&a.netns, move || {
        UdpSocket::bind((ip_a, 7070)).expect("bind a:7070")
    });
    let sb = in_netns(&b.netns, move || {
        UdpSocket::bind((ip_b, 6000)).expect("bind b:6000")
    });
    for s in [&sa, &sb] {
        s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    }
    let mut buf = [0u8; 64];

    sa.send_to(b"first, unasked", (ip_b, 6000)).expect("a sends");
    let f = expect_flow(&mut flows, "a -> b:6000 dropped", |f| {
        f.dst_port == 6000 && f.src_port == 7070 && !f.forwarded
    });
    assert_eq!(f.drop_reason, drop_reason::POLICY_DENIED);
    assert!(sb.recv_from(&mut buf).is_err(), "b admits no one");

    sb.send_to(b"b asks", (ip_a, 7070)).expect("b sends");
    let (n, from) = sa.recv_from(&mut buf).expect("b -> a:7070 is allowed");
    assert_eq!((&buf[..n], from.port()), (&b"b asks"[..], 6000));
    sa.send_to(b"a answers", (ip_b, 6000)).expect("a answers");
    let (n, _) = sb
        .recv_from(&mut buf)
        .expect("a's answer on b's flow must reach b, its earlier drop notwithstanding");
    assert_eq!(&buf[..n], b"a answers");
    dp.stop();
}

/// An ICMP flow's replies are the echo replies to its echo requests, with
/// their identifier, as conntrack has it, and nothing else. a may send b
/// anything and admits nothing from b. a's echo request gets its reply; an
/// echo request from b with the same identifier (else a ping that passes a
/// pod's ingress on another's egress), an echo reply to no request, and
/// another message type are each judged as a flow of their own, and
/// dropped at a.
fn only_the_echo_replies_to_a_pods_echo_request_come_back_as_its_replies(fam: Fam) {
    const ID: u16 = 0x4b57;
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    let b = topo.add_pod("b", IP_B);
    let dp = start(&topo, |_| {}, NodeState::default());
    let mut flows = dp.flows.subscribe();
    let state = StateBuilder::new()
        .rule((A, B, 0, 0, EGRESS), false, "default/a-to-b egress[0]")
        .rule((A, R, 9999, UDP, INGRESS), false, "default/a-from-r ingress[0]")
        .default_allow(B, INGRESS)
        .default_allow(B, EGRESS)
        .build();
    dp.apply(state, &topo);
    let (ip_a, ip_b) = (fam.ip(IP_A), fam.ip(IP_B));
    let (request, reply) = echo_types(ip_a);
    let inbox = icmp_socket(&a.netns, ip_a.is_ipv6());

    assert!(ping(&a.netns, ip_b, 2), "a's ping gets its replies");
    send_icmp(&a.netns, ip_a, ip_b, request, ID);
    assert!(
        icmp_arrives(&inbox, ip_b, reply, ID, Duration::from_secs(3)),
        "b's echo reply to a's echo request reaches a"
    );

    // Each is a new flow b -> a, dropped where a's ingress is enforced.
    let other = if fam == Fam::V4 { 13 } else { 139 };
    for (ty, id, what) in [
        (request, ID, "an echo request with a's identifier"),
        (reply, ID + 1, "an echo reply to no request"),
        (other, 0, "another message type"),
    ] {
        drain_flows(&mut flows);
        send_icmp(&b.netns, ip_b, ip_a, ty, id);
        let f = expect_flow(&mut flows, what, |f| {
            f.src == ip_b && f.dst == ip_a && !f.from_pod
        });
        assert!(
            !f.forwarded,
            "{what} from b must be dropped at a, not taken for a's reply"
        );
        assert_eq!(f.drop_reason, drop_reason::POLICY_DENIED, "{what}");
        assert!(
            !icmp_arrives(&inbox, ip_b, ty, id, Duration::ZERO),
            "{what} reached a"
        );
    }
    dp.stop();
}

/// The programs remember each interface's subject (its identity and marks)
/// for the epoch they read it in. When b's identity changes, the next
/// connections to b are judged as the new identity, which no policy admits,
/// on every CPU that remembered the old one.
fn a_pod_whose_identity_changes_is_judged_as_its_new_identity(fam: Fam) {
    const B2: u32 = 399;
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    let b = topo.add_pod("b", IP_B);
    let dp = start(&topo, |_| {}, NodeState::default());
    let state = || {
        StateBuilder::new()
            .default_allow(A, INGRESS)
            .default_allow(A, EGRESS)
            .default_allow(B, EGRESS)
            .default_allow(B2, EGRESS)
            .rule((B, A, 8080, TCP, INGRESS), false, "default/b-from-a ingress[0]")
            .build()
    };
    dp.apply(state(), &topo);
    tcp_echo(&b.netns, fam.ip(IP_B), 8080);
    for i in 0..4 {
        let mut c = connect(&a.netns, fam.ip(IP_B), 8080, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("a -> b ({i}) is allowed: {e}"));
        assert!(echo_round_trip(&mut c, b"as b"));
    }
    let mut renamed = state();
    add_workload(&mut renamed, "b", B2, IP_B);
    dp.apply(renamed, &topo);
    for i in 0..4 {
        assert!(
            connect(&a.netns, fam.ip(IP_B), 8080, Duration::from_secs(1)).is_err(),
            "a -> b ({i}) must be dropped: b is {B2} now, which admits no one"
        );
    }
    dp.stop();
}

/// The programs remember, per interface, that the pod behind it owns the
/// source it sends from. When the pod's record names another address (its
/// old one still configured in it), what it sends from the old one is
/// forged, and dropped, on every CPU that remembered it.
fn a_pod_whose_address_moves_can_no_longer_send_from_the_old_one(fam: Fam) {
    const IP_A2: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 5);
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    let b = topo.add_pod("b", IP_B);
    let dp = start(&topo, |_| {}, NodeState::default());
    let mut flows = dp.flows.subscribe();
    dp.apply(StateBuilder::new().open().build(), &topo);
    let (ip_a, ip_b) = (fam.ip(IP_A), fam.ip(IP_B));
    let inbox = udp_inbox(&b.netns, ip_b, 6000);
    let cpus = send_from_each_cpu(&a.netns, ip_a, 7000, (ip_b, 6000), b"as a");
    for _ in 0..cpus {
        inbox_until(&inbox, b"as a");
    }

    // a's record now names IP_A2, routed to a's interface as a CNI would.
    for (cidr, v6) in [
        (format!("{IP_A2}/32"), false),
        (format!("{}/128", v6_of(IP_A2)), true),
    ] {
        let mut args = vec!["-n", topo.node.as_str()];
        if v6 {
            args.push("-6");
        }
        args.extend(["route", "add", cidr.as_str(), "dev", a.host_if.as_str()]);
        keyway_tests::netns::run("ip", &args);
    }
    let mut moved = StateBuilder::new().open().build();
    add_workload(&mut moved, "a", A, IP_A2);
    dp.apply(moved, &topo);
    drain_flows(&mut flows);
    send_from_each_cpu(&a.netns, ip_a, 7100, (ip_b, 6000), b"from the old address");
    for port in 7100..7100 + cpus as u16 {
        let f = expect_flow(&mut flows, "a's packet from its old address", |f| {
            f.src_port == port && f.from_pod
        });
        assert!(!f.forwarded, "sent from {port} after the move");
        assert_eq!(f.drop_reason, drop_reason::SOURCE_SPOOFED);
    }
    dp.stop();
}

/// One datagram from `src`, port `first_port + cpu`, to `to` from a thread
/// in `ns` pinned to each CPU in turn (a veth runs the peer's ingress on
/// the sender's CPU, so each CPU's per-CPU state is exercised); how many.
fn send_from_each_cpu(
    ns: &str,
    src: IpAddr,
    first_port: u16,
    to: (IpAddr, u16),
    what: &'static [u8],
) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for cpu in 0..cpus {
        in_netns(ns, move || {
            #[allow(unsafe_code, reason = "sched_setaffinity has no std equivalent")]
            // SAFETY: a zeroed cpu_set_t with one CPU set, for this thread.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                assert_eq!(rc, 0, "pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
            }
            let s = UdpSocket::bind((src, first_port + cpu as u16)).expect("bind");
            s.send_to(what, to).expect("send");
        });
    }
    cpus
}

/// A flow's replies are recognised on their first packet, by the flow's
/// own entry the other way, and stay replies: here b's answers to a's
/// connection are first allowed by a's open ingress as well, and when a's
/// ingress closes they keep passing as the replies they are, while a new
/// connection to a is dropped.
fn a_reply_stays_a_reply_when_the_policy_that_also_allowed_it_goes(fam: Fam) {
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    let b = topo.add_pod("b", IP_B);
    let dp = start(&topo, |_| {}, NodeState::default());
    dp.apply(StateBuilder::new().open().build(), &topo);
    tcp_echo(&b.netns, fam.ip(IP_B), 8080);
    tcp_echo(&a.netns, fam.ip(IP_A), 7070);
    let mut c = connect(&a.netns, fam.ip(IP_B), 8080, Duration::from_secs(3)).expect("a -> b is allowed");
    assert!(echo_round_trip(&mut c, b"allowed both ways"));

    // a's ingress now admits only R on 9999.
    let closed = StateBuilder::new()
        .default_allow(A, EGRESS)
        .default_allow(B, INGRESS)
        .default_allow(B, EGRESS)
        .rule((A, R, 9999, TCP, INGRESS), false, "default/a-from-r ingress[0]")
        .build();
    dp.apply(closed, &topo);
    assert!(
        connect(&b.netns, fam.ip(IP_A), 7070, Duration::from_secs(1)).is_err(),
        "b -> a must be dropped now"
    );
    assert!(
        echo_round_trip(&mut c, b"still the replies of a's connection"),
        "b's replies on a's connection must still reach a"
    );
    dp.stop();
}

/// The kernel skips the policy lookups a subject has no entry for (the
/// agent marks them in the subject's ipcache value). Each shape it does
/// have is looked up: b admits a on any TCP port (any-port entry), and
/// anyone on 7070 with authentication (any-peer entry). a -> b:9090 passes
/// on the first alone; a -> b:7070 is allowed by both, and the second's
/// authentication is required, though the more specific entry asks none.
fn every_policy_shape_a_subject_has_is_looked_up(fam: Fam) {
    // b's any-port entry for a and its any-peer entry for 7070 are folded
    // into one exact key (the default), or, past the fold limit (0 here),
    // kept apart and united by the kernel: the same verdicts either way.
    for fold_limit in [datapath::tables::FOLD_LIMIT, 0] {
        every_policy_shape_with(fam, fold_limit);
    }
}

fn every_policy_shape_with(fam: Fam, fold_limit: usize) {
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    let b = topo.add_pod("b", IP_B);
    let state = StateBuilder::new()
        .default_allow(A, INGRESS)
        .default_allow(A, EGRESS)
        .rule((B, A, 0, TCP, INGRESS), false, "default/b-from-a ingress[0]")
        .rule((B, 0, 7070, TCP, INGRESS), true, "default/b-7070 ingress[0]")
        .build();
    let dp = start(&topo, |c| c.policy_fold_limit = fold_limit, NodeState::default());
    let mut flows = dp.flows.subscribe();
    dp.apply(state, &topo);
    tcp_echo(&b.netns, fam.ip(IP_B), 9090);
    tcp_echo(&b.netns, fam.ip(IP_B), 7070);
    let mut c = connect(&a.netns, fam.ip(IP_B), 9090, Duration::from_secs(3))
        .expect("a -> b:9090 on the any-port entry");
    assert!(echo_round_trip(&mut c, b"any port"));
    assert!(connect(&a.netns, fam.ip(IP_B), 7070, Duration::from_millis(1200)).is_err());
    let f = expect_flow(&mut flows, "a -> b:7070 held for authentication", |f| {
        f.dst_port == 7070 && !f.forwarded
    });
    assert_eq!(f.drop_reason, drop_reason::AUTH_REQUIRED);
    dp.stop();
}

/// The agent's handshake for a pair can fail; while the pair's packets
/// keep being dropped, the agent is signalled again once the signal
/// interval has passed, with the time of the drop.
fn a_pair_still_unauthenticated_is_signalled_again_once_the_interval_has_passed(fam: Fam) {
    let interval = Duration::from_millis(1500);
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    topo.add_pod("b", IP_B);
    let state = StateBuilder::new()
        .default_allow(A, INGRESS)
        .default_allow(A, EGRESS)
        .default_allow(B, EGRESS)
        .rule((B, A, 5353, UDP, INGRESS), true, "default/dns-mtls ingress[0]")
        .build();
    let mut dp = start(&topo, |c| c.signal_interval = interval, NodeState::default());
    dp.apply(state, &topo);
    let ip_b = fam.ip(IP_B);
    let sa = in_netns(&a.netns, move || {
        UdpSocket::bind((fam.ip(IP_A), 0)).expect("bind a")
    });
    let mut signal = || {
        let mut got = None;
        wait_until(Duration::from_secs(5), "a signal for the pair", || {
            got = dp.signals.try_recv().ok();
            got.is_some()
        });
        got.expect("signalled")
    };

    let sent = datapath::monotonic_ns();
    sa.send_to(b"first", (ip_b, 5353)).expect("send");
    let first = signal();
    let received = datapath::monotonic_ns();
    // The programs' clock is this one at tick resolution (jiffies, tied to
    // it when they were loaded): up to a tick behind, and ahead only by
    // how late the agent saw the jiffy edge it measured at (microseconds;
    // a millisecond allowed).
    assert!(
        first.at_ns + 50_000_000 >= sent,
        "the signal carries the drop's time: {} long before {sent}",
        first.at_ns
    );
    assert!(
        first.at_ns <= received + 1_000_000,
        "the programs' clock is ahead of CLOCK_MONOTONIC: a drop at {} seen at {received}",
        first.at_ns
    );
    // Past the interval on the programs' clock too, a tick behind this one.
    wait_until(Duration::from_secs(10), "the signal interval to pass", || {
        datapath::monotonic_ns() > first.at_ns + interval.as_nanos() as u64 + 50_000_000
    });
    sa.send_to(b"later", (ip_b, 5353)).expect("send");
    let second = signal();
    assert_eq!(second.key, first.key);
    assert!(second.at_ns > first.at_ns + interval.as_nanos() as u64);
    dp.stop();
}

fn auth_required_drops_and_signals_once_until_authenticated_and_again_after_expiry(fam: Fam) {
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    let b = topo.add_pod("b", IP_B);
    let state = StateBuilder::new()
        .default_allow(A, INGRESS)
        .default_allow(A, EGRESS)
        .default_allow(B, EGRESS)
        .rule((B, A, 8080, TCP, INGRESS), true, "default/api-mtls ingress[0]")
        .build();
    let mut dp = start(
        &topo,
        |c| c.signal_interval = Duration::from_secs(30),
        NodeState::default(),
    );
    let mut flows = dp.flows.subscribe();
    dp.apply(state, &topo);
    tcp_echo(&b.netns, fam.ip(IP_B), 8080);

    // Three attempts, several SYNs each: all dropped, one signal.
    for _ in 0..3 {
        assert!(connect(&a.netns, fam.ip(IP_B), 8080, Duration::from_millis(1200)).is_err());
    }
    let f = expect_flow(&mut flows, "an auth-required drop", |f| {
        f.dst_port == 8080 && !f.forwarded
    });
    assert_eq!(f.drop_reason_name(), "auth-required");
    assert!(f.auth_required);
    let key = AuthKey {
        local_id: B,
        remote_id: A,
        remote_node_id: NODE_ID as u16,
        auth_type: auth_type::MTLS_SPIFFE,
        _pad: 0,
    };
    let first = dp.signals.try_recv().expect("the agent was signalled");
    assert_eq!(first.key, key);
    assert!(
        dp.signals.try_recv().is_err(),
        "exactly one signal for the pair within the interval"
    );

    // Authenticated for three seconds: the flow passes.
    let expiry = datapath::monotonic_ns() + 3_000_000_000;
    dp.auth.upsert(key, expiry).unwrap();
    let mut conn =
        connect(&a.netns, fam.ip(IP_B), 8080, Duration::from_secs(3)).expect("authenticated pair passes");
    assert!(echo_round_trip(&mut conn, b"authenticated"));
    expect_flow(&mut flows, "the verdict change to forwarded", |f| {
        f.dst_port == 8080 && f.forwarded && f.auth_required
    });

    // Expired: dropped again, also on the connection that was established.
    wait_until(Duration::from_secs(10), "the auth entry to expire", || {
        datapath::monotonic_ns() > expiry
    });
    assert!(
        !echo_round_trip(&mut conn, b"expired"),
        "an expired pair must not pass"
    );
    assert!(connect(&a.netns, fam.ip(IP_B), 8080, Duration::from_secs(1)).is_err());
    expect_flow(&mut flows, "an auth-required drop after expiry", |f| {
        f.dst_port == 8080 && !f.forwarded && f.drop_reason == drop_reason::AUTH_REQUIRED
    });

    // Removing an entry takes effect at once on established flows too.
    dp.auth
        .upsert(key, datapath::monotonic_ns() + 60_000_000_000)
        .unwrap();
    let mut conn = connect(&a.netns, fam.ip(IP_B), 8080, Duration::from_secs(3)).expect("re-authenticated");
    assert!(echo_round_trip(&mut conn, b"again"));
    assert!(dp.auth.remove(&key).unwrap());
    assert!(
        !echo_round_trip(&mut conn, b"revoked"),
        "a removed entry stops the established flow"
    );
    dp.stop();
}

fn traffic_to_a_remote_peer_goes_through_the_stack_under_egress_policy(fam: Fam) {
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    topo.add_pod("b", IP_B);
    let r = topo.add_remote(IP_R);
    // a may talk to R on 8080 only. R is known by a CIDR (the LPM trie),
    // not by its address.
    let mut builder = StateBuilder::new();
    builder.0.ipcache.remove(&fam.cidr(IP_R, 32));
    builder.0.ipcache.insert(
        fam.cidr(Ipv4Addr::new(10, 201, 9, 0), 24),
        pb::IpcacheEntry {
            cidr: fam.cidr(Ipv4Addr::new(10, 201, 9, 0), 24),
            identity: R,
            node_id: REMOTE_NODE_ID,
            ..Default::default()
        },
    );
    let state = builder
        .default_allow(A, INGRESS)
        .default_allow(B, INGRESS)
        .default_allow(B, EGRESS)
        .rule((A, R, 8080, TCP, EGRESS), false, "default/a-to-r egress[0]")
        .build();
    let dp = start(&topo, |_| {}, NodeState::default());
    let mut flows = dp.flows.subscribe();
    dp.apply(state, &topo);
    tcp_echo(&r.netns, fam.ip(IP_R), 8080);
    tcp_echo(&r.netns, fam.ip(IP_R), 8081);

    let mut c = connect(&a.netns, fam.ip(IP_R), 8080, Duration::from_secs(3)).expect("a -> R:8080 allowed");
    assert!(echo_round_trip(&mut c, b"remote"));
    assert!(
        connect(&a.netns, fam.ip(IP_R), 8081, Duration::from_secs(1)).is_err(),
        "8081 is not allowed"
    );
    let f = expect_flow(&mut flows, "a -> R:8081 dropped", |f| f.dst_port == 8081);
    assert_eq!(
        (f.src_identity, f.dst_identity, f.drop_reason),
        (A, R, drop_reason::POLICY_DENIED)
    );
    assert!(
        f.from_pod,
        "a's egress policy is enforced where a's packets leave it"
    );
    dp.stop();
}

/// Path MTU discovery through a policy that names no router. a may send
/// to R on UDP 9000 and may receive nothing. The node's link to R has an
/// MTU of 1280, so a's 1400-byte datagram, sent without fragmentation,
/// makes the node send a an ICMP fragmentation needed (IPv6: packet too
/// big). The error reaches a's socket with the link's MTU: it is about a
/// flow a was allowed to send. Without that, the error is dropped by a's
/// ingress policy and the path is a black hole. An error from R about a
/// flow a never sent, and one about a's flow once its policy is gone, are
/// dropped, as are errors about a flow a sent but was denied, and a
/// message that is no error; an echo request from R is judged by policy
/// as before.
fn an_icmp_error_about_a_flow_the_pod_sent_reaches_it_and_nothing_else_does(fam: Fam) {
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    let r = topo.add_remote(IP_R);
    keyway_tests::netns::run(
        "ip",
        &["-n", &topo.node, "link", "set", &r.host_if, "mtu", "1280"],
    );
    keyway_tests::netns::run("ip", &["-n", &r.netns, "link", "set", "eth0", "mtu", "1280"]);
    let with_rule = StateBuilder::new()
        .rule((A, R, 9000, UDP, EGRESS), false, "default/a-to-r egress[0]")
        .build();
    let dp = start(&topo, |_| {}, NodeState::default());
    dp.apply(with_rule, &topo);
    let (a_ip, r_ip) = (fam.of(&a), fam.ip(IP_R));

    let s = pmtu_socket(&a.netns, a_ip, 5000, (r_ip, 9000).into());
    s.send(&[7u8; 1400])
        .expect("the first datagram leaves a (the pod's link MTU is 1500)");
    let (ty, _, mtu) = icmp_error(&s, Duration::from_secs(5)).expect(
        "the node's fragmentation needed / packet too big reaches a, about a flow a was allowed to send",
    );
    let too_big = if fam == Fam::V4 { 3 } else { 2 };
    assert_eq!(
        (ty, mtu),
        (too_big, 1280),
        "the error and the MTU of the node's link to R"
    );

    // `send`, then the policy drop it causes.
    let dropped_after = |what: &str, send: &dyn Fn()| {
        let before = drops(&topo, drop_reason::POLICY_DENIED);
        send();
        wait_until(Duration::from_secs(5), what, || {
            drops(&topo, drop_reason::POLICY_DENIED) > before
        });
    };
    // From R to a, a message of `kind` quoting a's datagram `from` -> R:`about`.
    let from_r = |kind: (u8, u8), from: u16, about: u16| {
        send_icmp_error(&r.netns, r_ip, a_ip, kind, (a_ip, from), (r_ip, about))
    };

    // Errors from R about a flow a sent but was not allowed to (5001 ->
    // R:7777, dropped by a's egress policy), and about one a never sent
    // (5002 -> R:7778): dropped.
    let denied_flow = pmtu_socket(&a.netns, a_ip, 5001, (r_ip, 7777).into());
    dropped_after("a's datagram to R:7777 to be dropped", &|| {
        denied_flow.send(b"denied").expect("sent (and dropped)");
    });
    let never = pmtu_socket(&a.netns, a_ip, 5002, (r_ip, 7778).into());
    for (s, from, about) in [(&denied_flow, 5001, 7777), (&never, 5002, 7778)] {
        dropped_after("the forged error to be judged", &|| {
            from_r(unreachable(a_ip), from, about)
        });
        assert_eq!(
            icmp_error(s, Duration::ZERO),
            None,
            "an error about no flow a was allowed to send ({from} -> {about}) is dropped"
        );
    }
    // A message that is no error, quoting a's allowed flow: judged by
    // a's policy, which allows none.
    let echo_reply = if fam == Fam::V4 { (0, 0) } else { (129, 0) };
    dropped_after("the echo reply to be judged", &|| from_r(echo_reply, 5000, 9000));

    // An error about a's flow quoted right, from R: it passes while the
    // flow is allowed...
    from_r(unreachable(a_ip), 5000, 9000);
    assert!(
        icmp_error(&s, Duration::from_secs(5)).is_some(),
        "an error about a's allowed flow reaches a"
    );
    // ... and not once the policy that allowed it is gone.
    dp.apply(StateBuilder::new().build(), &topo);
    dropped_after("the stale flow's error to be judged", &|| {
        from_r(unreachable(a_ip), 5000, 9000)
    });
    assert_eq!(
        icmp_error(&s, Duration::ZERO),
        None,
        "an error about a flow no longer allowed is dropped"
    );
    // Echo requests are no errors: judged by a's policy, which allows none.
    assert!(
        !ping(&r.netns, a_ip, 1),
        "R's echo request is dropped by a's policy"
    );
    dp.stop();
}

fn restarting_the_loader_keeps_established_flows_and_the_tables(fam: Fam) {
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    let b = topo.add_pod("b", IP_B);
    let state = StateBuilder::new()
        .default_allow(A, INGRESS)
        .default_allow(A, EGRESS)
        .default_allow(B, EGRESS)
        .rule((B, A, 8080, TCP, INGRESS), false, "default/b ingress[0]")
        .build();
    let dp = start(&topo, |_| {}, NodeState::default());
    dp.apply(state.clone(), &topo);
    tcp_echo(&b.netns, fam.ip(IP_B), 8080);
    tcp_echo(&b.netns, fam.ip(IP_B), 9090);
    let mut conn = connect(&a.netns, fam.ip(IP_B), 8080, Duration::from_secs(3)).expect("allowed");
    assert!(echo_round_trip(&mut conn, b"before"));

    // The agent goes away: programs and maps stay pinned and in force.
    dp.stop();
    assert!(echo_round_trip(&mut conn, b"while no agent runs"));
    assert!(
        connect(&a.netns, fam.ip(IP_B), 9090, Duration::from_secs(1)).is_err(),
        "policy is still enforced while no agent runs"
    );
    let pinned: BTreeMap<String, bool> = maps::ALL
        .iter()
        .map(|m| (m.to_string(), topo.pin_dir.join(m).exists()))
        .collect();
    assert!(pinned.values().all(|p| *p), "every map stays pinned: {pinned:?}");

    // A new agent takes over the pinned maps and links in place.
    let dp = start(&topo, |_| {}, NodeState::default());
    assert!(echo_round_trip(&mut conn, b"after the new loader attached"));
    dp.apply(state, &topo);
    assert!(echo_round_trip(&mut conn, b"after it reconciled"));
    let mut c2 = connect(&a.netns, fam.ip(IP_B), 8080, Duration::from_secs(3)).expect("new connections work");
    assert!(echo_round_trip(&mut c2, b"new"));
    assert!(connect(&a.netns, fam.ip(IP_B), 9090, Duration::from_secs(1)).is_err());
    let links = std::fs::read_dir(topo.pin_dir.join("links")).unwrap().count();
    assert_eq!(links, 4, "two pods, two programs each, no stale link pins");
    dp.stop();
}

fn removing_a_workload_detaches_its_interface_and_clears_its_endpoint(fam: Fam) {
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    let b = topo.add_pod("b", IP_B);
    let dp = start(&topo, |_| {}, NodeState::default());
    dp.apply(StateBuilder::new().open().build(), &topo);
    {
        let s = dp.status.borrow();
        assert_eq!(s.endpoints[&fam.ip(IP_A)].identity, A);
        assert_eq!(s.endpoints[&fam.ip(IP_B)].identity, B);
        assert_eq!(s.local_node_id, NODE_ID as u16);
    }
    let mut state = StateBuilder::new().open().build();
    state.workloads.remove(&("default".to_string(), "b".to_string()));
    let revision = dp.state.borrow().revision + 1;
    state.revision = revision;
    dp.state.send_replace(Arc::new(state));
    wait_until(Duration::from_secs(10), "b's interface to be detached", || {
        let s = dp.status.borrow();
        s.revision >= revision && !s.attached.contains(&b.host_if) && s.attached.contains(&a.host_if)
    });
    assert!(!dp.status.borrow().endpoints.contains_key(&fam.ip(IP_B)));
    let pins: Vec<String> = std::fs::read_dir(topo.pin_dir.join("links"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        pins.iter().all(|p| p.starts_with(&a.host_if)),
        "only a's links stay pinned: {pins:?}"
    );
    dp.stop();
}

/// A pod whose workload the agent already knows gets its interface later,
/// the way a CNI plugin makes it. The rtnetlink notifications of that (the
/// veth, its address, the host route) bring the scan: the programs are on
/// the interface, enforcing, with the periodic resync an hour away. When the
/// pod's veth goes (CNI DEL), so does its route, and the same notifications
/// take its endpoint out.
fn a_pod_interface_made_after_the_agent_started_is_covered_on_the_netlink_event(fam: Fam) {
    const C: u32 = 303;
    const IP_C: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 3);
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    let b = topo.add_pod("b", IP_B);
    let mut state = StateBuilder::new().open().build();
    add_workload(&mut state, "c", C, IP_C);
    // c's ingress: nothing allowed (no entry), so what reaches it is dropped.
    let dp = start(
        &topo,
        |c| c.resync_interval = Duration::from_secs(3600),
        NodeState::default(),
    );
    let mut flows = dp.flows.subscribe();
    dp.apply(state, &topo);
    assert_eq!(
        dp.status.borrow().unresolved,
        both(IP_C),
        "c has no interface yet"
    );

    let c = topo.add_pod("c", IP_C);
    wait_until(
        Duration::from_secs(10),
        "c's new interface to be attached",
        || {
            let s = dp.status.borrow();
            s.attached.contains(&c.host_if)
                && both(IP_C)
                    .iter()
                    .all(|ip| s.endpoints.get(ip).map(|e| e.identity) == Some(C))
        },
    );
    assert!(dp.status.borrow().unresolved.is_empty());
    tcp_echo(&c.netns, fam.ip(IP_C), 8080);
    assert!(
        connect(&a.netns, fam.ip(IP_C), 8080, Duration::from_secs(1)).is_err(),
        "c's ingress is enforced"
    );
    let f = expect_flow(&mut flows, "a -> c denied at c", |f| {
        f.dst == fam.ip(IP_C) && f.dst_port == 8080 && !f.from_pod
    });
    assert!(!f.forwarded);
    assert_eq!(f.drop_reason, drop_reason::POLICY_DENIED);
    assert_eq!((f.src_identity, f.dst_identity), (A, C));
    // The others are untouched.
    tcp_echo(&b.netns, fam.ip(IP_B), 8080);
    assert!(connect(&a.netns, fam.ip(IP_B), 8080, Duration::from_secs(3)).is_ok());

    // What a CNI DEL does. (Deleting c's namespace would not do here: the
    // echo server's thread still holds it, and with it the veth.)
    keyway_tests::netns::run("ip", &["-n", &topo.node, "link", "del", &c.host_if]);
    wait_until(
        Duration::from_secs(10),
        "c's endpoint to go with its interface",
        || {
            let s = dp.status.borrow();
            !s.attached.contains(&c.host_if) && !s.endpoints.contains_key(&fam.ip(IP_C))
        },
    );
    assert_eq!(dp.status.borrow().unresolved, both(IP_C));
    dp.stop();
}

/// An interface detached and at once attached again is guarded, round
/// after round: `detach` takes the programs off the hook when it returns.
/// Removing a link's pin alone leaves the kernel to free the link later,
/// and an attach meanwhile is refused (a program is attached once per
/// hook), after which the old link goes and nothing is attached.
#[test]
fn an_interface_detached_and_attached_again_at_once_stays_guarded() {
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    topo.add_pod("b", IP_B);
    let (pin_dir, host_if) = (topo.pin_dir.clone(), a.host_if.clone());
    let ns = format!("/run/netns/{}", topo.node);
    let mut dp = std::thread::spawn(move || {
        enter_netns(&ns);
        let mut dp = datapath::Datapath::load(DatapathConfig::new(&pin_dir, NODE)).expect("load");
        for round in 0..200 {
            dp.attach(&host_if)
                .unwrap_or_else(|e| panic!("attaching again, round {round}: {e}"));
            dp.detach(&host_if);
        }
        dp
    })
    .join()
    .expect("attach and detach");
    assert!(ping(&a.netns, IP_B, 2), "detached: nothing judges a's packets");
    let host_if = a.host_if.clone();
    let ns = format!("/run/netns/{}", topo.node);
    std::thread::spawn(move || {
        enter_netns(&ns);
        dp.attach(&host_if).expect("attach");
        dp
    })
    .join()
    .expect("attach");
    // No tables: a is no one the programs know, and nothing allows it.
    assert!(!ping(&a.netns, IP_B, 1), "attached: a's packets are judged");
}

/// A program taken off a pod's interface by another tool (`bpftool link
/// detach`, here the same call) leaves that side unguarded until the next
/// scan, which attaches it again; the other program stays on its hook.
#[test]
fn a_program_another_tool_detached_is_attached_again_on_the_next_scan() {
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    let b = topo.add_pod("b", IP_B);
    // b admits no one; a sends anything.
    let state = StateBuilder::new()
        .default_allow(A, INGRESS)
        .default_allow(A, EGRESS)
        .default_allow(B, EGRESS)
        .rule((B, R, 9999, UDP, INGRESS), false, "default/b-from-r ingress[0]")
        .build();
    let ns = format!("/run/netns/{}", topo.node);
    let in_node = |dp: Option<datapath::Datapath>| {
        let (ns, pin_dir, state) = (ns.clone(), topo.pin_dir.clone(), state.clone());
        std::thread::spawn(move || {
            enter_netns(&ns);
            let mut dp = dp.unwrap_or_else(|| {
                let mut dp = datapath::Datapath::load(DatapathConfig::new(&pin_dir, NODE)).expect("load");
                dp.apply_tables(&state).expect("tables");
                dp
            });
            dp.apply_endpoints(&state).expect("a scan");
            dp
        })
        .join()
        .expect("in the node")
    };
    let dp = in_node(None);
    assert!(!ping(&a.netns, IP_B, 1), "b admits no one");

    let name = b.host_if.clone();
    let index = in_netns(&topo.node, move || datapath::ifindex(&name).expect("b's veth"));
    let pin = |suffix: &str| {
        topo.pin_dir
            .join("links")
            .join(format!("{}@{index}@{suffix}", b.host_if))
    };
    datapath::detach_pinned_link(&pin("to-pod")).expect("detaching b's to-pod link");
    assert!(
        ping(&a.netns, IP_B, 2),
        "b's side unguarded: nothing judges a's ping there"
    );

    let _dp = in_node(Some(dp));
    assert!(!ping(&a.netns, IP_B, 1), "attached again: b admits no one");
    assert!(pin("from-pod").exists() && pin("to-pod").exists());
}

/// Every flap of a pod's link is an rtnetlink message to the node (the
/// host veth's carrier): a pod flapping its own link as fast as it can
/// must not keep the agent scanning without pause. Scans come at most once
/// per `min_scan_gap`, however many messages arrive.
#[test]
fn a_pod_flapping_its_link_costs_the_agent_one_scan_per_gap() {
    const C: u32 = 303;
    const IP_C: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 3);
    let gap = Duration::from_millis(50);
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    let mut state = StateBuilder::new().open().build();
    add_workload(&mut state, "c", C, IP_C);
    let dp = start(&topo, |c| c.min_scan_gap = gap, NodeState::default());
    dp.apply(state, &topo);
    let batch = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        batch.path(),
        "link set eth0 down\nlink set eth0 up\n".repeat(2000),
    )
    .unwrap();
    let before = dp.status.borrow().scans;
    let started = Instant::now();
    keyway_tests::netns::run("ip", &["-n", &a.netns, "-batch", batch.path().to_str().unwrap()]);
    // A change the agent must act on, after the flood: once it has, every
    // message of the flood has been read.
    let c = topo.add_pod("c", IP_C);
    wait_until(Duration::from_secs(20), "c attached after the flood", || {
        dp.status.borrow().attached.contains(&c.host_if)
    });
    let took = started.elapsed();
    let scans = dp.status.borrow().scans - before;
    let bound = (took.as_millis() / gap.as_millis()) as u64 + 3;
    assert!(
        scans <= bound,
        "4000 link changes in {took:?} made {scans} scans; at most one per {gap:?} ({bound}) expected"
    );
    // The pod's link works again, and the agent still covers it.
    assert!(dp.status.borrow().attached.contains(&a.host_if));
    dp.stop();
}

/// Where no event comes (no rtnetlink here, as for a bridge pod's address
/// when the agent may not hear the pods' namespaces), an address with no
/// interface is looked for again on a backoff, not only at the resync.
fn an_unplaced_address_is_retried_without_any_event(fam: Fam) {
    const C: u32 = 303;
    const IP_C: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 3);
    let mut topo = Topology::new();
    topo.add_pod("a", IP_A);
    let mut state = StateBuilder::new().open().build();
    state
        .workloads
        .insert(("default".into(), "c".into()), workload("c", C, IP_C));
    let dp = start(
        &topo,
        |c| {
            c.netlink = false;
            c.unresolved_retry = Some(Duration::from_millis(50));
        },
        NodeState::default(),
    );
    dp.apply(state, &topo);
    assert!(dp.status.borrow().unresolved.contains(&fam.ip(IP_C)));
    let c = topo.add_pod("c", IP_C);
    wait_until(Duration::from_secs(10), "c found by the retry", || {
        dp.status.borrow().attached.contains(&c.host_if)
    });
    dp.stop();
}

/// A bridge CNI layout (Debian's `bridge` plugin): the pods' /24 is routed
/// to a Linux bridge that holds their gateway, and each pod's host-side veth
/// is a port of it. The routing table names only the bridge; the agent
/// follows each pod's address into the pod's namespace to its veth and
/// attaches at the port. The same policy, auth and flow assertions as the
/// routing layout pass, and a pod plumbed after the agent started is covered
/// on the notification of its address, which is set inside the pod's own
/// namespace after the bridge plugin's last change in the node's.
#[test]
fn on_a_bridge_cni_each_pod_is_guarded_at_its_bridge_port() {
    const C: u32 = 303;
    const D: u32 = 304;
    const X: u32 = 309;
    const IP_C: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 3);
    const IP_D: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 4);
    const IP_X: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 9);
    const E: u32 = 305;
    const IP_E: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 5);
    // Not any workload's.
    const IP_Y: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 10);
    let gateway = Ipv4Addr::new(10, 201, 0, 254);
    let mut topo = Topology::new();
    let bridge = topo.add_bridge("10.201.0.254/24");
    let a = topo.add_bridged_pod(&bridge, "a", IP_A, 24, gateway);
    let b = topo.add_bridged_pod(&bridge, "b", IP_B, 24, gateway);
    // The bridge layout here is IPv4 only.
    let mut builder = StateBuilder::new()
        .v4_only()
        .default_allow(A, INGRESS)
        .default_allow(A, EGRESS)
        .default_allow(B, EGRESS)
        .rule((B, A, 8080, TCP, INGRESS), true, "default/b-mtls ingress[0]")
        .rule((B, A, 5454, UDP, INGRESS), false, "default/b-udp ingress[0]")
        .rule((C, 0, 0, 0, INGRESS), false, "default-allow")
        .rule((C, 0, 0, 0, EGRESS), false, "default-allow")
        .rule((D, 0, 0, 0, INGRESS), false, "default-allow")
        .rule((D, 0, 0, 0, EGRESS), false, "default-allow")
        .rule((X, 0, 0, 0, INGRESS), false, "default-allow")
        .rule((X, 0, 0, 0, EGRESS), false, "default-allow")
        .rule((E, 0, 0, 0, INGRESS), false, "default-allow");
    for (name, id, ip) in [("c", C, IP_C), ("x", X, IP_X)] {
        add_workload(&mut builder.0, name, id, ip);
        strip_v6(&mut builder.0);
    }
    // Each record names its pod's namespace; c's names none yet.
    for name in ["a", "b", "x"] {
        home(&mut builder.0, name, format!("netns:{}", topo.pod_netns(name)));
    }
    let mut dp = start(&topo, |_| {}, NodeState::default());
    let mut flows = dp.flows.subscribe();
    let mut state = builder.build();
    dp.apply(state.clone(), &topo);
    {
        let s = dp.status.borrow();
        assert!(!s.attached.contains(&bridge), "never on the bridge itself: {s:?}");
        for (pod, id) in [(&a, A), (&b, B)] {
            let ep = s.endpoints[&IpAddr::V4(pod.ip)];
            assert_eq!(ep.identity, id);
            assert_eq!(
                Some(ep.ifindex),
                in_netns(&topo.node, {
                    let i = pod.host_if.clone();
                    move || node_agent::datapath::ifindex(&i)
                }),
                "{}'s endpoint is its bridge port",
                pod.name
            );
            assert_eq!(ep.flags, keyway_common::endpoint_flags::BRIDGED);
        }
        let mut unresolved = s.unresolved.clone();
        unresolved.sort();
        assert_eq!(unresolved, vec![IP_C, IP_X], "c and x have no pods yet");
        assert!(
            matches!(s.withheld.get(&IpAddr::V4(IP_C)), Some(Withheld::Unbound(why)) if why.contains("no netns: or k8s:pod-uid: selector")),
            "nothing ties c to a namespace: {s:?}"
        );
        assert_eq!(s.withheld.len(), 1, "{s:?}");
    }

    // Auth required a -> b:8080: dropped and signalled until the pair is
    // authenticated, then it passes over the bridge.
    tcp_echo(&b.netns, IP_B, 8080);
    tcp_echo(&b.netns, IP_B, 9090);
    assert!(connect(&a.netns, IP_B, 8080, Duration::from_millis(1200)).is_err());
    let f = expect_flow(&mut flows, "an auth-required drop at b's port", |f| {
        f.dst_port == 8080 && !f.forwarded
    });
    assert_eq!(f.drop_reason, drop_reason::AUTH_REQUIRED);
    assert_eq!((f.src_identity, f.dst_identity, f.from_pod), (A, B, false));
    let signal = dp.signals.try_recv().expect("the agent was signalled");
    assert_eq!((signal.key.local_id, signal.key.remote_id), (B, A));
    dp.auth
        .upsert(signal.key, datapath::monotonic_ns() + 600_000_000_000)
        .unwrap();
    let mut conn = connect(&a.netns, IP_B, 8080, Duration::from_secs(3)).expect("authenticated pair passes");
    assert!(echo_round_trip(&mut conn, b"over the bridge"));
    let port = conn.local_addr().unwrap().port();
    for from_pod in [true, false] {
        let f = expect_flow(&mut flows, "the flow seen at both ports", |f| {
            f.src_port == port && f.dst_port == 8080 && f.forwarded && f.from_pod == from_pod
        });
        assert_eq!((f.src_identity, f.dst_identity), (A, B));
    }

    // No rule for 9090: policy-denied, at b's port.
    assert!(connect(&a.netns, IP_B, 9090, Duration::from_secs(1)).is_err());
    let f = expect_flow(&mut flows, "a policy drop at b's port", |f| {
        f.dst_port == 9090 && !f.forwarded
    });
    assert_eq!(f.drop_reason, drop_reason::POLICY_DENIED);
    // b's egress and a's ingress are open: b -> a works, ICMP included.
    tcp_echo(&a.netns, IP_A, 7070);
    assert!(connect(&b.netns, IP_A, 7070, Duration::from_secs(3)).is_ok());
    assert!(ping(&b.netns, IP_A, 2));

    // c is plumbed now; its address is set last, inside its namespace. Its
    // port is guarded at once, but c is placed behind it only once its
    // record says which namespace is c's.
    let c = topo.add_bridged_pod(&bridge, "c", IP_C, 24, gateway);
    wait_until(Duration::from_secs(10), "c's bridge port to be attached", || {
        dp.status.borrow().attached.contains(&c.host_if)
    });
    assert!(!dp.status.borrow().endpoints.contains_key(&IpAddr::V4(IP_C)));
    home(&mut state, "c", format!("netns:{}", c.netns));
    dp.apply(state.clone(), &topo);
    assert_eq!(
        dp.status
            .borrow()
            .endpoints
            .get(&IpAddr::V4(IP_C))
            .map(|e| e.identity),
        Some(C)
    );
    tcp_echo(&c.netns, IP_C, 8080);
    assert!(connect(&a.netns, IP_C, 8080, Duration::from_secs(3)).is_ok());
    expect_flow(&mut flows, "a -> c judged at c's port", |f| {
        f.dst == IP_C && f.dst_port == 8080 && f.forwarded && !f.from_pod && f.dst_identity == C
    });

    // A pod chooses its own addresses. x, placed for its own, then drops it
    // and adds b's (placed already) and d's, before d's pod is made. What a
    // pod's interface holds places nobody: d is placed behind the port into
    // d's namespace, found from d's record as the kubelet leaves it: d's
    // processes, in a cgroup named after d's pod UID.
    let x = topo.add_bridged_pod(&bridge, "x", IP_X, 24, gateway);
    wait_until(Duration::from_secs(10), "x's own address placed", || {
        dp.status.borrow().endpoints.contains_key(&IpAddr::V4(IP_X))
    });
    keyway_tests::netns::run(
        "ip",
        &[
            "-n",
            &x.netns,
            "addr",
            "del",
            &format!("{IP_X}/24"),
            "dev",
            "eth0",
        ],
    );
    keyway_tests::netns::run(
        "ip",
        &["-n", &x.netns, "route", "add", "10.201.0.0/24", "dev", "eth0"],
    );
    let claim = |pod: &keyway_tests::netns::Pod, ip: Ipv4Addr| {
        keyway_tests::netns::run(
            "ip",
            &[
                "-n",
                &pod.netns,
                "addr",
                "add",
                &format!("{ip}/32"),
                "dev",
                "eth0",
            ],
        );
    };
    claim(&x, IP_D);
    let d = topo.add_bridged_pod(&bridge, "d", IP_D, 24, gateway);
    const D_UID: &str = "0d0d0d0d-1111-4222-8333-444455556666";
    let _d_process = topo.pod_process("d", D_UID);
    // A process of d's in the node's namespace (a runtime's monitor) does
    // not keep d from being placed.
    let _d_monitor = topo.process_in(&topo.node, D_UID);
    add_workload(&mut state, "d", D, IP_D);
    strip_v6(&mut state);
    home(&mut state, "d", format!("k8s:pod-uid:{D_UID}"));
    dp.apply(state.clone(), &topo);
    {
        let s = dp.status.borrow();
        for pod in [&b, &d, &x] {
            let index = in_netns(&topo.node, {
                let i = pod.host_if.clone();
                move || node_agent::datapath::ifindex(&i)
            });
            assert_eq!(
                Some(s.endpoints[&IpAddr::V4(pod.ip)].ifindex),
                index,
                "{} behind its own port: {s:?}",
                pod.name
            );
        }
        assert!(s.withheld.is_empty(), "{s:?}");
    }
    claim(&x, IP_B);
    // x sending as b or as d is dropped as forged. (Its ARP naming those
    // addresses is dropped too, see below: a's address is given to it as a
    // static neighbour, so the datagrams do leave.)
    let a_mac = keyway_tests::netns::mac(&a.netns, "eth0");
    for pod in [&x, &d] {
        static_neighbour(&pod.netns, IP_A, &a_mac);
    }
    for (from, src) in [(&x, IP_B), (&x, IP_D)] {
        let sock = in_netns(&from.netns, move || UdpSocket::bind((src, 0)).expect("bind"));
        sock.send_to(b"as someone else", (IP_A, 5353)).expect("send");
        let f = expect_flow(
            &mut flows,
            "a forged datagram dropped at its sender's port",
            |f| f.src == src && f.dst_port == 5353 && !f.forwarded && f.from_pod,
        );
        assert_eq!(
            f.drop_reason,
            drop_reason::SOURCE_SPOOFED,
            "{} as {src}",
            from.name
        );
    }

    // d, placed, sends as itself.
    let sock = in_netns(&d.netns, || UdpSocket::bind((IP_D, 0)).expect("bind"));
    sock.send_to(b"as myself", (IP_A, 5353)).expect("send");
    expect_flow(&mut flows, "d's own datagram let through", |f| {
        f.src == IP_D && f.dst_port == 5353 && f.forwarded && f.from_pod && f.src_identity == D
    });

    // x answers ARP for b's address: its reply never reaches a, while one
    // for its own address, sent after it on the same path, does.
    let x_mac = keyway_tests::netns::mac(&x.netns, "eth0");
    {
        use keyway_tests::netns::{ArpListener, parse_mac, send_arp_reply};
        let at_a = ArpListener::new(&a.netns, "eth0");
        let (xm, am) = (
            parse_mac(&x_mac),
            parse_mac(&keyway_tests::netns::mac(&a.netns, "eth0")),
        );
        send_arp_reply(&x.netns, "eth0", xm, IP_B, am, IP_A);
        // From x's own MAC, for x's own address, but naming b's MAC as the
        // sender's: a would send x's traffic to b.
        let bm = parse_mac(&keyway_tests::netns::mac(&b.netns, "eth0"));
        keyway_tests::netns::send_arp_reply_naming(&x.netns, "eth0", xm, bm, IP_X, am, IP_A);
        send_arp_reply(&x.netns, "eth0", xm, IP_X, am, IP_A);
        let seen = at_a.senders_until(IP_X, Duration::from_secs(5));
        assert_eq!(
            seen.last(),
            Some(&(xm, IP_X)),
            "x's reply for itself arrives: {seen:?}"
        );
        assert!(
            !seen.contains(&(xm, IP_B)),
            "x's reply claiming b's address must not arrive: {seen:?}"
        );
        assert!(
            !seen.contains(&(bm, IP_X)),
            "x's reply naming b's MAC must not arrive: {seen:?}"
        );
    }

    // Had a's cache been poisoned anyway (a's neighbour entry for b made to
    // point at x, as a spoofed reply would leave it): a's datagrams for b,
    // which policy allows, reach x's port and go no further.
    static_neighbour(&a.netns, IP_B, &x_mac);
    let stolen = in_netns(&x.netns, || {
        UdpSocket::bind((IP_B, 5454)).expect("x binds b's address")
    });
    stolen.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let sender = in_netns(&a.netns, || UdpSocket::bind((IP_A, 0)).expect("bind"));
    sender.send_to(b"for b only", (IP_B, 5454)).expect("send");
    let f = expect_flow(&mut flows, "a -> b stopped at x's port", |f| {
        f.dst == IP_B && f.dst_port == 5454 && !f.forwarded && !f.from_pod
    });
    assert_eq!(f.drop_reason, drop_reason::MISDELIVERED);
    assert_eq!((f.src_identity, f.dst_identity), (A, B));
    let mut buf = [0u8; 64];
    assert!(
        stolen.recv_from(&mut buf).is_err(),
        "x must not receive what was sent to b"
    );

    // y is a pod the agent has no record of (or one that dropped its own
    // address): its port is guarded all the same, and nothing it sends
    // gets through, though nothing stops it at the other end (a admits
    // anyone).
    let y = topo.add_bridged_pod(&bridge, "y", IP_Y, 24, gateway);
    wait_until(Duration::from_secs(10), "y's port guarded", || {
        dp.status.borrow().attached.contains(&y.host_if)
    });
    static_neighbour(&y.netns, IP_A, &a_mac);
    let send_as = |from: &keyway_tests::netns::Pod, src: Ipv4Addr, flows: &mut broadcast::Receiver<Flow>| {
        let sock = in_netns(&from.netns, move || UdpSocket::bind((src, 0)).expect("bind"));
        sock.send_to(b"who am i", (IP_A, 5353)).expect("send");
        expect_flow(flows, "a datagram from y's port", |f| {
            f.src == src && f.dst_port == 5353 && f.from_pod
        })
    };
    let f = send_as(&y, IP_Y, &mut flows);
    assert_eq!((f.forwarded, f.drop_reason), (false, drop_reason::SOURCE_SPOOFED));

    // y claims e's address before e's pod is made, and b's, placed
    // already. Neither counts: e is placed behind its own port, b stays.
    for ip in [IP_E, IP_B] {
        claim(&y, ip);
    }
    let e = topo.add_bridged_pod(&bridge, "e", IP_E, 24, gateway);
    add_workload(&mut state, "e", E, IP_E);
    strip_v6(&mut state);
    home(&mut state, "e", format!("netns:{}", e.netns));
    let b_port = dp.status.borrow().endpoints[&IpAddr::V4(IP_B)];
    dp.apply(state.clone(), &topo);
    let node = topo.node.clone();
    let index_of = |pod: &keyway_tests::netns::Pod| {
        in_netns(&node, {
            let i = pod.host_if.clone();
            move || node_agent::datapath::ifindex(&i)
        })
    };
    {
        let s = dp.status.borrow();
        assert_eq!(
            s.endpoints.get(&IpAddr::V4(IP_E)).map(|ep| Some(ep.ifindex)),
            Some(index_of(&e)),
            "{s:?}"
        );
        assert_eq!(s.endpoints.get(&IpAddr::V4(IP_B)), Some(&b_port), "{s:?}");
        assert!(s.withheld.is_empty(), "{s:?}");
    }
    let f = send_as(&y, IP_E, &mut flows);
    assert_eq!((f.forwarded, f.drop_reason), (false, drop_reason::SOURCE_SPOOFED));
    // e's pod goes away (CNI DEL) while its record is still in the state,
    // as it is between a pod's deletion and the control plane hearing of
    // it: y, the one claimant left, does not inherit e's address, neither
    // now nor from an agent restarted with no memory of who claimed what.
    topo.unplug_pod("e");
    wait_until(Duration::from_secs(10), "e's endpoint gone with its port", || {
        !dp.status.borrow().endpoints.contains_key(&IpAddr::V4(IP_E))
    });
    let f = send_as(&y, IP_E, &mut flows);
    assert_eq!(
        (f.forwarded, f.drop_reason),
        (false, drop_reason::SOURCE_SPOOFED),
        "y must not send as e once e is gone"
    );
    dp.stop();
    let dp = start(&topo, |_| {}, NodeState::default());
    let mut flows = dp.flows.subscribe();
    dp.apply(state.clone(), &topo);
    {
        let s = dp.status.borrow();
        assert_eq!(s.endpoints.get(&IpAddr::V4(IP_B)), Some(&b_port), "{s:?}");
        assert!(!s.endpoints.contains_key(&IpAddr::V4(IP_E)), "{s:?}");
    }
    let f = send_as(&y, IP_E, &mut flows);
    assert_eq!(
        (f.forwarded, f.drop_reason),
        (false, drop_reason::SOURCE_SPOOFED),
        "y must not send as e after a restart"
    );
    // e's sandbox is made again with the same address (a StatefulSet pod
    // with static addresses): e is placed behind its new port, and reached.
    let e = topo.plug_bridged_pod(&bridge, "e", IP_E, 24, gateway);
    wait_until(Duration::from_secs(10), "e placed behind its new port", || {
        dp.status
            .borrow()
            .endpoints
            .get(&IpAddr::V4(IP_E))
            .map(|ep| Some(ep.ifindex))
            == Some(index_of(&e))
    });
    tcp_echo(&e.netns, IP_E, 8080);
    let mut conn = connect(&a.netns, IP_E, 8080, Duration::from_secs(3)).expect("a reaches e's new sandbox");
    assert!(echo_round_trip(&mut conn, b"the same address, a new sandbox"));
    // (a's neighbour entry for b, pointed at x above, put right first.)
    let b_mac = keyway_tests::netns::mac(&b.netns, "eth0");
    static_neighbour(&a.netns, IP_B, &b_mac);
    let mut conn = connect(&b.netns, IP_A, 7070, Duration::from_secs(3)).expect("b still sends as itself");
    assert!(echo_round_trip(&mut conn, b"after the restart"));

    // The bridge learns where a MAC lives from the frames it sees. x takes
    // b's MAC and sends from it (an ARP probe, then a datagram as itself,
    // which policy allows): were either let onto the bridge, b's frames
    // would go to x's port (and be dropped there as misdelivered). Both
    // are dropped at x's port, and a still reaches b.
    let spoofed = || drops(&topo, drop_reason::SOURCE_SPOOFED);
    let before = spoofed();
    let bm = keyway_tests::netns::parse_mac(&b_mac);
    keyway_tests::netns::send_arp_reply(
        &x.netns,
        "eth0",
        bm,
        Ipv4Addr::UNSPECIFIED,
        keyway_tests::netns::parse_mac(&a_mac),
        IP_A,
    );
    let a_to_b = |what: &str| {
        let mut conn = connect(&a.netns, IP_B, 8080, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("a must still reach b {what}: {e}"));
        assert!(echo_round_trip(&mut conn, b"b's own"));
    };
    a_to_b("after x's ARP probe from b's MAC");
    keyway_tests::netns::run("ip", &["-n", &x.netns, "link", "set", "eth0", "address", &b_mac]);
    keyway_tests::netns::run(
        "ip",
        &[
            "-n",
            &x.netns,
            "addr",
            "add",
            &format!("{IP_X}/32"),
            "dev",
            "eth0",
        ],
    );
    let sock = in_netns(&x.netns, || UdpSocket::bind((IP_X, 0)).expect("bind"));
    sock.send_to(b"from b's MAC", (IP_A, 5353)).expect("send");
    a_to_b("after x's datagram from b's MAC");
    assert!(spoofed() >= before + 2, "both counted as source-spoofed");
    // A restarted agent reads every MAC again: b, still on the MAC it was
    // placed with, keeps it; x, who took it while placed, is not placed.
    dp.stop();
    let dp = start(&topo, |_| {}, NodeState::default());
    dp.apply(state, &topo);
    {
        let s = dp.status.borrow();
        assert_eq!(s.endpoints.get(&IpAddr::V4(IP_B)), Some(&b_port), "{s:?}");
        assert_eq!(
            s.withheld.get(&IpAddr::V4(IP_X)),
            Some(&Withheld::MacInUse(b.host_if.clone())),
            "{s:?}"
        );
    }
    a_to_b("after a restart with x on b's MAC");
    dp.stop();
}

/// The real binaries: a control plane and a node agent with `--datapath`,
/// both inside the node's network namespace (entered with nsenter, so the
/// BPF filesystem stays the host's). Policy goes in with `control-plane
/// apply`, reaches the agent over Sync, and the kernel enforces it.
#[test]
fn policy_applied_to_the_control_plane_is_enforced_by_the_agent_binary() {
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    let b = topo.add_pod("b", IP_B);
    let dir = tempfile::tempdir().unwrap();
    let cp = keyway_tests::Binary::spawn_in_netns(&topo.node, &dir.path().join("cp"), &[]);
    let token = cp.ok(&["token", "create", "--node", NODE]).trim().to_string();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, cp.ok(&["bundle", "show"])).unwrap();
    let docs = |mode: &str| {
        format!(
            "{}---\n{}---\napiVersion: keyway.dev/v1alpha1\nkind: KeywayNetworkPolicy\n\
             metadata: {{ name: b-ingress, namespace: default }}\nspec:\n  endpointSelector: {{ matchLabels: {{ app: b }} }}\n  \
             ingress:\n    - authentication: {{ mode: {mode} }}\n      fromEndpoints: [{{ matchLabels: {{ app: a }} }}]\n      \
             toPorts: [{{ ports: [{{ port: \"8080\", protocol: TCP }}] }}]\n",
            keyway_tests::workload_yaml("a", "a", NODE, &IP_A.to_string()),
            keyway_tests::workload_yaml("b", "b", NODE, &IP_B.to_string()),
        )
    };
    let file = dir.path().join("docs.yaml");
    std::fs::write(&file, docs("disabled")).unwrap();
    cp.ok(&["apply", "-f", file.to_str().unwrap()]);

    let spawn_agent = |token: Option<&str>| {
        keyway_tests::netns::AgentProcess::spawn(
            &topo.node,
            &cp.listen,
            NODE,
            &bundle,
            dir.path(),
            &topo.pin_dir,
            token,
            &[],
        )
    };
    let mut agent = spawn_agent(Some(&token));
    let links = || {
        std::fs::read_dir(topo.pin_dir.join("links"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    wait_until(
        Duration::from_secs(30),
        "the agent to attach to both pods",
        || links() == 4,
    );

    tcp_echo(&b.netns, IP_B, 8080);
    tcp_echo(&b.netns, IP_B, 9090);
    let mut conn =
        connect(&a.netns, IP_B, 8080, Duration::from_secs(3)).expect("the policy allows a -> b:8080");
    assert!(echo_round_trip(&mut conn, b"allowed by policy"));
    assert!(
        connect(&a.netns, IP_B, 9090, Duration::from_secs(1)).is_err(),
        "b is selected by policy: 9090 is denied"
    );

    // The agent dies: the kernel keeps enforcing, established flows live.
    agent.kill9();
    assert!(echo_round_trip(&mut conn, b"agent killed"));
    assert!(connect(&a.netns, IP_B, 9090, Duration::from_secs(1)).is_err());

    // Restarted (no token needed), and the policy now requires mutual
    // authentication. Both workloads run on this node, so the agent
    // authenticates the pair locally (both SVIDs are here), before any packet.
    agent = spawn_agent(None);
    std::fs::write(&file, docs("required")).unwrap();
    cp.ok(&["apply", "-f", file.to_str().unwrap()]);
    let has_pair = |agent: &keyway_tests::netns::AgentProcess| {
        agent.auth_list().iter().any(|e| {
            e["via"] == "local"
                && e["local_spiffe_id"]
                    .as_str()
                    .is_some_and(|s| s.ends_with("/sa/b"))
                && e["remote_spiffe_id"]
                    .as_str()
                    .is_some_and(|s| s.ends_with("/sa/a"))
        })
    };
    wait_until(Duration::from_secs(20), "the pair to be authenticated", || {
        has_pair(&agent)
    });
    let mut c2 = connect(&a.netns, IP_B, 8080, Duration::from_secs(3)).expect("authenticated pair passes");
    assert!(echo_round_trip(&mut c2, b"mutually authenticated"));
    assert!(echo_round_trip(&mut conn, b"the old connection too"));

    // a's Workload goes away: the entry is flushed and b no longer accepts a.
    std::fs::write(
        &file,
        keyway_tests::workload_yaml("a", "a", NODE, &IP_A.to_string()),
    )
    .unwrap();
    cp.ok(&["delete", "-f", file.to_str().unwrap()]);
    wait_until(Duration::from_secs(10), "the entry to be flushed", || {
        !has_pair(&agent)
    });
    assert!(connect(&a.netns, IP_B, 8080, Duration::from_secs(1)).is_err());
    drop(agent);
}

/// The bridge layout, dual-stack: IPv6 is placed, judged and guarded at
/// the bridge port like IPv4. Both of a pod's addresses are its endpoints
/// behind the one port into its namespace, with its MAC. Authentication
/// and policy hold for IPv6; a forged IPv6 source is dropped; and a pod
/// advertising another pod's IPv6 address as its own (a neighbour
/// advertisement naming b's address with x's MAC, which would have a's
/// neighbour cache send b's traffic to x) is dropped at its port, as the
/// ARP reply doing the same in IPv4 is. And a frame from a pod that names
/// no address (a router solicitation from a link-local one) must still
/// come from the pod's own MAC: the bridge learns from it too.
#[test]
fn on_a_dual_stack_bridge_ipv6_is_placed_judged_and_guarded_at_the_port() {
    use keyway_tests::netns::{Forged, ipv6_packet, mac, send_forged, send_raw};
    const X: u32 = 309;
    const IP_X: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 9);
    let gateway = Ipv4Addr::new(10, 201, 0, 254);
    let mut topo = Topology::new();
    let bridge = topo.add_bridge("10.201.0.254/24");
    let a = topo.add_dual_stack_bridged_pod(&bridge, "a", IP_A, 24, gateway);
    let b = topo.add_dual_stack_bridged_pod(&bridge, "b", IP_B, 24, gateway);
    let x = topo.add_dual_stack_bridged_pod(&bridge, "x", IP_X, 24, gateway);
    let mut builder = StateBuilder::new()
        .default_allow(A, INGRESS)
        .default_allow(A, EGRESS)
        .default_allow(B, EGRESS)
        .rule((B, A, 8080, TCP, INGRESS), true, "default/b-mtls ingress[0]")
        .rule((B, A, 5454, UDP, INGRESS), false, "default/b-udp ingress[0]")
        .rule((X, 0, 0, 0, INGRESS), false, "default-allow")
        .rule((X, 0, 0, 0, EGRESS), false, "default-allow");
    add_workload(&mut builder.0, "x", X, IP_X);
    for name in ["a", "b", "x"] {
        home(&mut builder.0, name, format!("netns:{}", topo.pod_netns(name)));
    }
    let mut dp = start(&topo, |_| {}, NodeState::default());
    let mut flows = dp.flows.subscribe();
    dp.apply(builder.build(), &topo);
    let (a6, b6, x6) = (v6_of(IP_A), v6_of(IP_B), v6_of(IP_X));
    wait_until(
        Duration::from_secs(10),
        "both addresses of a, b and x placed",
        || {
            let s = dp.status.borrow();
            [IP_A, IP_B, IP_X]
                .iter()
                .flat_map(|ip| both(*ip))
                .all(|ip| s.endpoints.contains_key(&ip))
        },
    );
    {
        let s = dp.status.borrow();
        for pod in [&a, &b, &x] {
            let (v4, v6) = (s.endpoints[&IpAddr::V4(pod.ip)], s.endpoints[&fam_v6(pod)]);
            assert_eq!(v4, v6, "{}: one endpoint, both addresses", pod.name);
            assert_eq!(v6.flags, keyway_common::endpoint_flags::BRIDGED);
            assert_eq!(v6.mac, keyway_tests::netns::parse_mac(&mac(&pod.netns, "eth0")));
        }
    }

    // Authentication and policy, over IPv6, at b's port.
    tcp_echo(&b.netns, b6, 8080);
    tcp_echo(&b.netns, b6, 9090);
    assert!(connect(&a.netns, b6, 8080, Duration::from_millis(1200)).is_err());
    let f = expect_flow(&mut flows, "an auth-required drop at b's port", |f| {
        f.dst == IpAddr::V6(b6) && f.dst_port == 8080 && !f.forwarded
    });
    assert_eq!(f.drop_reason, drop_reason::AUTH_REQUIRED);
    assert_eq!((f.src_identity, f.dst_identity, f.from_pod), (A, B, false));
    let signal = dp.signals.try_recv().expect("the agent was signalled");
    dp.auth
        .upsert(signal.key, datapath::monotonic_ns() + 600_000_000_000)
        .unwrap();
    let mut conn = connect(&a.netns, b6, 8080, Duration::from_secs(3)).expect("authenticated pair passes");
    assert!(echo_round_trip(&mut conn, b"over the bridge, in IPv6"));
    assert!(connect(&a.netns, b6, 9090, Duration::from_secs(1)).is_err());
    let f = expect_flow(&mut flows, "a policy drop at b's port", |f| {
        f.dst == IpAddr::V6(b6) && f.dst_port == 9090 && !f.forwarded
    });
    assert_eq!(f.drop_reason, drop_reason::POLICY_DENIED);

    // x forges a's IPv6 source: dropped at x's port.
    let inbox = udp_inbox(&b.netns, IpAddr::V6(b6), 5454);
    let spoofed_before = drops(&topo, drop_reason::SOURCE_SPOOFED);
    send_forged(
        &x.netns,
        a6,
        b6,
        Forged::Udp {
            src_port: 40000,
            dst_port: 5454,
            payload: b"forged",
        },
    );
    wait_until(Duration::from_secs(5), "the forged datagram dropped", || {
        drops(&topo, drop_reason::SOURCE_SPOOFED) > spoofed_before
    });

    // x advertises b's address with its own MAC (override set), to a, which
    // knows b's MAC from the connection above.
    let b_mac = mac(&b.netns, "eth0");
    let neighbour_of_b =
        || keyway_tests::netns::run("ip", &["-n", &a.netns, "-6", "neigh", "show", &b6.to_string()]);
    assert!(neighbour_of_b().contains(&b_mac), "{}", neighbour_of_b());
    let mut na = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    na.extend_from_slice(&b6.octets());
    na.extend_from_slice(&[2, 1]);
    na.extend_from_slice(&keyway_tests::netns::parse_mac(&mac(&x.netns, "eth0")));
    let mut packet = ipv6_packet(x6, a6, &[], 58, na, Some(2));
    packet[7] = 255;
    let spoofed_before = drops(&topo, drop_reason::SOURCE_SPOOFED);
    send_raw(&x.netns, IpAddr::V6(a6), &packet);
    wait_until(Duration::from_secs(5), "x's advertisement dropped", || {
        drops(&topo, drop_reason::SOURCE_SPOOFED) > spoofed_before
    });
    assert!(
        neighbour_of_b().contains(&b_mac),
        "a still has b's MAC: {}",
        neighbour_of_b()
    );

    // x solicits routers from a link-local address, a frame that names no
    // address of anyone's, but from b's MAC: the bridge, learning from it,
    // would send b's frames to x's port. Dropped at x's port; the bridge
    // still has b's MAC on b's port.
    let fdb_port_of = |m: &str| {
        let out = keyway_tests::netns::run("bridge", &["-n", &topo.node, "fdb", "show", "br", &bridge]);
        out.lines().find(|l| l.starts_with(m)).and_then(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "dev")
                .nth(1)
                .map(str::to_string)
        })
    };
    assert_eq!(fdb_port_of(&b_mac).as_deref(), Some(b.host_if.as_str()));
    let mut rs = vec![0x33, 0x33, 0, 0, 0, 2];
    rs.extend_from_slice(&keyway_tests::netns::parse_mac(&b_mac));
    rs.extend_from_slice(&[0x86, 0xdd]);
    let mut ip = ipv6_packet(
        "fe80::dead".parse().unwrap(),
        "ff02::2".parse().unwrap(),
        &[],
        58,
        vec![133, 0, 0, 0, 0, 0, 0, 0],
        Some(2),
    );
    ip[7] = 255;
    rs.extend_from_slice(&ip);
    let spoofed_before = drops(&topo, drop_reason::SOURCE_SPOOFED);
    keyway_tests::netns::send_frame(&x.netns, "eth0", &rs);
    wait_until(
        Duration::from_secs(5),
        "x's solicitation from b's MAC dropped",
        || drops(&topo, drop_reason::SOURCE_SPOOFED) > spoofed_before,
    );
    assert_eq!(fdb_port_of(&b_mac).as_deref(), Some(b.host_if.as_str()));

    // x poses as a router: an advertisement (high preference, a default
    // router for 30 minutes) that a would take, routing its IPv6 through
    // x. A pod is never a router: dropped.
    let x_mac = keyway_tests::netns::parse_mac(&mac(&x.netns, "eth0"));
    let frame = |icmp: Vec<u8>, src: Ipv6Addr, dst: Ipv6Addr, dst_mac: [u8; 6]| {
        let mut f = dst_mac.to_vec();
        f.extend_from_slice(&x_mac);
        f.extend_from_slice(&[0x86, 0xdd]);
        let mut ip = ipv6_packet(src, dst, &[], 58, icmp, Some(2));
        ip[7] = 255;
        f.extend_from_slice(&ip);
        f
    };
    let x_link_local: Ipv6Addr = "fe80::bad".parse().unwrap();
    let ra = frame(
        vec![134, 0, 0, 0, 64, 0x08, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0],
        x_link_local,
        "ff02::1".parse().unwrap(),
        [0x33, 0x33, 0, 0, 0, 1],
    );
    // A duplicate address probe for b's address: b's answer (or, were b
    // still probing, its giving the address up) makes the address x's.
    let mut probe = vec![135, 0, 0, 0, 0, 0, 0, 0];
    probe.extend_from_slice(&b6.octets());
    let b_solicited: Ipv6Addr = format!(
        "ff02::1:ff{:02x}:{:02x}{:02x}",
        b6.octets()[13],
        b6.octets()[14],
        b6.octets()[15]
    )
    .parse()
    .unwrap();
    let dad = frame(
        probe,
        Ipv6Addr::UNSPECIFIED,
        b_solicited,
        [
            0x33,
            0x33,
            0xff,
            b6.octets()[13],
            b6.octets()[14],
            b6.octets()[15],
        ],
    );
    for (what, f) in [("router advertisement", ra), ("probe for b's address", dad)] {
        let before = drops(&topo, drop_reason::SOURCE_SPOOFED);
        keyway_tests::netns::send_frame(&x.netns, "eth0", &f);
        wait_until(Duration::from_secs(5), &format!("x's {what} dropped"), || {
            drops(&topo, drop_reason::SOURCE_SPOOFED) > before
        });
    }
    let routes = keyway_tests::netns::run("ip", &["-n", &a.netns, "-6", "route", "show", "default"]);
    assert!(!routes.contains("fe80::bad"), "a took x for a router: {routes}");

    // a still reaches b, and what reached b's UDP port came from a.
    let sock = in_netns(&a.netns, move || UdpSocket::bind((a6, 0)).expect("udp bind"));
    sock.send_to(b"real", (b6, 5454)).expect("udp send");
    assert_eq!(inbox_until(&inbox, b"real"), ["real"]);
    assert!(echo_round_trip(&mut conn, b"still b"));
    dp.stop();
}

fn fam_v6(pod: &keyway_tests::netns::Pod) -> IpAddr {
    Fam::V6.of(pod)
}

/// A UDP socket on `ip:port` in `ns`; every datagram's payload, as it comes.
fn udp_inbox(ns: &str, ip: IpAddr, port: u16) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let sock = in_netns(ns, move || UdpSocket::bind((ip, port)).expect("bind udp"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    rx
}

/// What `inbox` got until `last` (which must come within 5 s), `last` included.
fn inbox_until(inbox: &std::sync::mpsc::Receiver<Vec<u8>>, last: &[u8]) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let p = inbox
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("no {:?} after {got:?}", String::from_utf8_lossy(last)));
        got.push(String::from_utf8_lossy(&p).into_owned());
        if p == last {
            return got;
        }
    }
}

/// The drops counted for `reason` on this node so far.
fn drops(topo: &Topology, reason: u8) -> u64 {
    node_agent::datapath::drops::DropCounters::open(&topo.pin_dir)
        .unwrap()
        .read()
        .unwrap()
        .into_iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, n)| n)
}

/// Neighbour discovery is to IPv6 what ARP is to IPv4: b may send and
/// receive nothing under its policy, yet the node still learns b's MAC
/// (its solicitation reaches b, b's advertisement comes back), or nothing
/// could be delivered to b once policy allows it. The exemption holds on
/// the link only: a neighbour solicitation a pod sends to an address off
/// its link would be routed like any packet, so it is judged like one.
#[test]
fn ipv6_neighbour_discovery_is_never_judged_by_policy_but_stays_on_the_link() {
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    let b = topo.add_pod("b", IP_B);
    let r = topo.add_remote(IP_R);
    // b has no policy entry: nothing in, nothing out.
    let state = StateBuilder::new()
        .default_allow(A, INGRESS)
        .default_allow(A, EGRESS)
        .build();
    let dp = start(&topo, |_| {}, NodeState::default());
    let mut flows = dp.flows.subscribe();
    dp.apply(state, &topo);
    let (b6, r6) = (v6_of(IP_B), v6_of(IP_R));

    // a's ping makes the node look for b's MAC (to redirect it to b); the
    // ping itself is denied at b.
    assert!(!ping(&a.netns, b6, 1), "policy denies a -> b");
    wait_until(Duration::from_secs(5), "the node to learn b's MAC", || {
        let out = keyway_tests::netns::run(
            "ip",
            &[
                "-n",
                &topo.node,
                "-6",
                "neigh",
                "show",
                &b6.to_string(),
                "dev",
                &b.host_if,
            ],
        );
        out.contains("lladdr")
    });
    let f = expect_flow(&mut flows, "a's ping dropped at b", |f| {
        f.dst == IpAddr::V6(b6) && f.proto == 58 && !f.forwarded
    });
    assert_eq!(f.drop_reason, drop_reason::POLICY_DENIED);
    assert!(
        drain_flows(&mut flows).iter().all(|f| f.src != IpAddr::V6(b6)),
        "b's neighbour advertisement was not judged"
    );

    // A neighbour solicitation (hop limit 255) from b to the remote peer:
    // off b's link, so judged, and b may send nothing.
    let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
    ns.extend_from_slice(&r6.octets());
    let mut packet = keyway_tests::netns::ipv6_packet(b6, r6, &[], 58, ns, Some(2));
    packet[7] = 255;
    keyway_tests::netns::send_raw(&b.netns, IpAddr::V6(r6), &packet);
    let f = expect_flow(&mut flows, "b's off-link solicitation judged", |f| {
        f.src == IpAddr::V6(b6) && f.dst == IpAddr::V6(r6) && f.proto == 58
    });
    assert!(!f.forwarded && f.from_pod);
    assert_eq!(f.drop_reason, drop_reason::POLICY_DENIED);
    let _ = r;
    dp.stop();
}

/// IPv6 extension headers are walked to the transport header, so policy
/// judges the real port: b admits a on UDP 5454 only, and a datagram behind
/// a hop-by-hop and a destination options header is judged on its port.
/// What cannot be walked is dropped with its own reason, never passed
/// unjudged: a chain longer than the datapath walks, a routing header with
/// segments left (the real destination is not the packet's), and a header
/// whose length runs past the packet. The receiving stack would accept the
/// long chain, so only the datapath stands between it and b.
#[test]
fn an_ipv6_extension_header_chain_is_walked_to_the_port_and_what_cannot_be_walked_is_dropped() {
    use keyway_tests::netns::{ipv6_options, ipv6_packet, send_raw, udp_datagram};
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    let b = topo.add_pod("b", IP_B);
    let state = StateBuilder::new()
        .default_allow(A, INGRESS)
        .default_allow(A, EGRESS)
        .default_allow(B, EGRESS)
        .rule((B, A, 5454, UDP, INGRESS), false, "default/b-udp ingress[0]")
        .build();
    let dp = start(&topo, |_| {}, NodeState::default());
    let mut flows = dp.flows.subscribe();
    dp.apply(state, &topo);
    let (a6, b6) = (v6_of(IP_A), v6_of(IP_B));
    let allowed = udp_inbox(&b.netns, IpAddr::V6(b6), 5454);
    let denied = udp_inbox(&b.netns, IpAddr::V6(b6), 5455);
    let send = |chain: &[(u8, Vec<u8>)], port: u16, payload: &[u8]| {
        let p = ipv6_packet(a6, b6, chain, 17, udp_datagram(40000, port, payload), Some(6));
        send_raw(&a.netns, IpAddr::V6(b6), &p);
    };
    let options = [ipv6_options(0), ipv6_options(60)];

    send(&options, 5454, b"walked");
    assert_eq!(inbox_until(&allowed, b"walked"), ["walked"]);
    send(&options, 5455, b"denied");
    let f = expect_flow(&mut flows, "the datagram to 5455 judged on its port", |f| {
        f.dst_port == 5455 && !f.from_pod
    });
    assert_eq!(f.drop_reason, drop_reason::POLICY_DENIED);

    let before = drops(&topo, drop_reason::IPV6_EXT_HEADERS);
    let too_long: Vec<(u8, Vec<u8>)> = (0..=keyway_common::IPV6_MAX_EXT_HEADERS)
        .map(|_| ipv6_options(60))
        .collect();
    send(&too_long, 5454, b"too long");
    // A segment routing header with one segment left, to the address of a.
    let mut srh = vec![0, 2, 4, 1, 0, 0, 0, 0];
    srh.extend_from_slice(&a6.octets());
    send(&[(43, srh)], 5454, b"routed");
    // Destination options claiming 2 KiB.
    send(&[(60, vec![0, 255, 1, 4, 0, 0, 0, 0])], 5454, b"cut short");
    wait_until(
        Duration::from_secs(5),
        "three drops for extension headers",
        || drops(&topo, drop_reason::IPV6_EXT_HEADERS) >= before + 3,
    );
    assert_eq!(drops(&topo, drop_reason::IPV6_EXT_HEADERS), before + 3);
    // None of them reached b: the next datagram is the first since "walked".
    send(&[], 5454, b"plain");
    assert_eq!(inbox_until(&allowed, b"plain"), ["plain"]);
    assert!(denied.try_recv().is_err(), "nothing reached 5455");
    dp.stop();
}

#[test]
fn the_flow_ring_never_grows_past_its_bound_under_a_flood_of_a_million_flows() {
    const BOUND: usize = 4096;
    const SOURCES: u16 = 16;
    let mut topo = Topology::new();
    let a = topo.add_pod("a", IP_A);
    topo.add_pod("b", IP_B);
    let dp = start(&topo, |_| {}, NodeState::default());
    dp.apply(StateBuilder::new().open().build(), &topo);

    // The agent's flow log, fed from the datapath's flow events as in the agent.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let log = node_agent::flows::FlowLog::new(BOUND);
    let (_auth_tx, auth_rx) = watch::channel(Arc::new(Vec::new()));
    let (stop_log, stop_rx) = watch::channel(false);
    let mut counted = dp.flows.subscribe();
    {
        let _guard = rt.enter();
        node_agent::flows::run(
            log.clone(),
            dp.flows.subscribe(),
            dp.state.subscribe(),
            dp.status.clone(),
            auth_rx,
            NODE.into(),
            stop_rx,
        );
    }
    let events = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = {
        let events = events.clone();
        rt.spawn(async move {
            loop {
                match counted.recv().await {
                    Ok(_) => {
                        events.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        events.fetch_add(n as usize, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(_) => return,
                }
            }
        })
    };

    // 16 source ports x 65535 destination ports: 1,048,560 distinct UDP
    // flows from a to b, each one a new flow for the datapath.
    let flooding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let log = log.clone();
        let flooding = flooding.clone();
        std::thread::spawn(move || {
            let mut max = 0;
            while flooding.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(log.len());
                std::thread::sleep(Duration::from_millis(5));
            }
            max
        })
    };
    let started = Instant::now();
    let sent = in_netns(&a.netns, || {
        let socks: Vec<UdpSocket> = (0..SOURCES)
            .map(|i| UdpSocket::bind((IP_A, 20000 + i)).expect("bind flood source"))
            .collect();
        let mut sent = 0usize;
        for port in 1..=u16::MAX {
            for s in &socks {
                if s.send_to(b"x", (IP_B, port)).is_ok() {
                    sent += 1;
                }
            }
        }
        sent
    });
    let elapsed = started.elapsed();
    // Let the log take in what the datapath reported, then stop sampling.
    wait_until(Duration::from_secs(20), "flow events to arrive", || {
        events.load(std::sync::atomic::Ordering::Relaxed) >= BOUND && log.len() == BOUND
    });
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    let max = sampler.join().expect("sampler");
    let seen = events.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "flood: {sent} packets ({} distinct flows) in {elapsed:?}; {seen} flow events; the log held at most {max} (bound {BOUND})",
        usize::from(SOURCES) * usize::from(u16::MAX)
    );
    assert!(sent >= 1_000_000, "only {sent} packets sent");
    assert!(max <= BOUND, "the flow log grew to {max}, past its bound {BOUND}");
    assert_eq!(log.len(), BOUND, "the log is full and not beyond");
    stop_log.send_replace(true);
    counter.abort();
    dp.stop();
}

/// An upgrade whose config map has another layout (here: the 24-byte one
/// before the programs' clock came from jiffies) replaces the pinned map
/// with an empty one. The new one goes on from the old one's epoch, node
/// id and flags, and the flow tables, whose verdicts are stamped with the
/// old epochs, are replaced with it. A counter starting again from 0 would
/// bring a verdict cached under epoch 8 back to life at its eighth bump: a
/// flow denied since would pass again. And the old config, which the old
/// programs still attached keep reading and no agent bumps any more, is
/// bumped once more and told to cache nothing.
#[test]
fn an_upgrade_that_replaces_the_config_map_keeps_its_epoch_and_drops_cached_verdicts() {
    use aya::maps::{Array, HashMap, Map, MapData};
    use keyway_common::{Config, FlowKey, FlowKey6, FlowState, Ipv6Key, config_flags, hook};
    fn flows<K: aya::Pod>(pin_dir: &std::path::Path, name: &str) -> HashMap<MapData, K, FlowState> {
        let data = MapData::from_pin(pin_dir.join(name)).expect(name);
        HashMap::try_from(Map::LruHashMap(data)).expect(name)
    }
    let topo = Topology::new();
    std::fs::create_dir_all(&topo.pin_dir).expect("pin dir");
    // A map pinned as an agent of the earlier layout left it.
    let create = |name: &str, kind: &str, key: usize, value: usize, entries: u32| {
        let out = std::process::Command::new("bpftool")
            .args(["map", "create"])
            .arg(topo.pin_dir.join(name))
            .args(["type", kind, "key", &key.to_string(), "value", &value.to_string()])
            .args([
                "entries",
                &entries.to_string(),
                "name",
                &name[..name.len().min(15)],
            ])
            .output()
            .expect("bpftool");
        assert!(
            out.status.success(),
            "bpftool map create {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    create(maps::CONFIG, "array", 4, 24, 1);
    create(
        maps::FLOW_TABLE,
        "lru_hash",
        size_of::<FlowKey>(),
        size_of::<FlowState>(),
        maps::FLOW_TABLE_MAX,
    );
    create(
        maps::FLOW_TABLE6,
        "lru_hash",
        size_of::<FlowKey6>(),
        size_of::<FlowState>(),
        maps::FLOW_TABLE6_MAX,
    );
    // Its config: epoch 7, node 3, bridge ports seen (and what the old
    // programs hold on to); a forwarded verdict cached under epoch 8 in
    // each flow table.
    let mut old_config: Array<MapData, [u8; 24]> = Array::try_from(Map::Array(
        MapData::from_pin(topo.pin_dir.join(maps::CONFIG)).expect("old config"),
    ))
    .expect("old config");
    let mut old = [0u8; 24];
    old[..8].copy_from_slice(&[7, 0, 0, 0, 3, 0, config_flags::BRIDGED_PORTS, 0]);
    old_config.set(0, old, 0).expect("old config value");
    let verdict = FlowState {
        epoch: 8,
        forwarded: 1,
        ..FlowState::default()
    };
    let key = FlowKey {
        src_ip: u32::from_ne_bytes(IP_A.octets()),
        dst_ip: u32::from_ne_bytes(IP_B.octets()),
        src_port: 40000u16.to_be(),
        dst_port: 8080u16.to_be(),
        proto: 6,
        hook: hook::FROM_POD,
        icmp: [0, 0],
        ifindex: 7,
    };
    let key6 = FlowKey6 {
        src_ip: Ipv6Key {
            addr: v6_of(IP_A).octets(),
        },
        dst_ip: Ipv6Key {
            addr: v6_of(IP_B).octets(),
        },
        src_port: key.src_port,
        dst_port: key.dst_port,
        proto: key.proto,
        hook: key.hook,
        icmp: key.icmp,
        ifindex: key.ifindex,
    };
    flows::<FlowKey>(&topo.pin_dir, maps::FLOW_TABLE)
        .insert(key, verdict, 0)
        .expect("cached verdict");
    flows::<FlowKey6>(&topo.pin_dir, maps::FLOW_TABLE6)
        .insert(key6, verdict, 0)
        .expect("cached verdict");

    let dp = datapath::Datapath::load(DatapathConfig::new(&topo.pin_dir, NODE)).expect("the new agent loads");
    let cfg: Config = dp.config().get().expect("config");
    assert_eq!(cfg.epoch, 8, "the epoch goes on from the old map's");
    assert_eq!(cfg.local_node_id, 3);
    assert_ne!(
        cfg.flags & config_flags::BRIDGED_PORTS,
        0,
        "the last agent's finding is kept"
    );
    assert_ne!(cfg.jiffy_ns, 0, "the programs' clock is tied");
    assert!(
        flows::<FlowKey>(&topo.pin_dir, maps::FLOW_TABLE)
            .get(&key, 0)
            .is_err(),
        "a verdict cached under the old config's epochs is gone"
    );
    assert!(
        flows::<FlowKey6>(&topo.pin_dir, maps::FLOW_TABLE6)
            .get(&key6, 0)
            .is_err(),
        "and the IPv6 one's"
    );
    let old = old_config.get(&0, 0).expect("old config value");
    assert_eq!(
        old[0], 8,
        "the old config is bumped past every verdict the old programs cached"
    );
    assert_eq!(
        old[6] & (config_flags::NO_VERDICT_CACHE | config_flags::NO_SUBJECT_MEMO),
        config_flags::NO_VERDICT_CACHE | config_flags::NO_SUBJECT_MEMO,
        "the old programs judge every packet by the new agent's tables"
    );
    drop(dp);
}
