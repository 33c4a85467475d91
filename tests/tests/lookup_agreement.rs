//! `explain` and the kernel agree, on randomised tables: the real programs
//! loaded into the real kernel, random policy (every entry shape, with and
//! without authentication, folded and with nothing folded) and random auth
//! entries written through the agent's own datapath module, then random
//! packets run through the programs with BPF_PROG_TEST_RUN and the same
//! packets evaluated by `explain`'s lookup (node-agent
//! `datapath::lookup::evaluate`) against the pinned maps. Every packet's
//! fate (forwarded or dropped, and the drop reason the kernel counted) must
//! be the one `explain` gives. Both run the one lookup order
//! (`keyway_common::resolve_policy`, `auth_key`); this test catches the rest
//! drifting apart (ipcache, the probes a subject skips, the auth check).
//! Needs root; fails, never skips, without it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use keyway_common::{config_flags, drop_reason, hook, identity};
use keyway_tests::pinned::{PinDir, open_hash};
use node_agent::datapath::drops::DropCounters;
use node_agent::datapath::lookup::{PinnedLookup, evaluate};
use node_agent::datapath::{self, AuthMap, DatapathConfig};
use node_agent::state::NodeState;
use proto::keyway as pb;

const NODE: &str = "node-1";
const NODE_ID: u32 = 1;
const REMOTE_NODE_ID: u32 = 2;
const TC_ACT_SHOT: u32 = 2;
/// The interface BPF_PROG_TEST_RUN gives its packets (loopback): every
/// local pod is placed there, so the from-pod source check passes for it.
const TEST_RUN_IFINDEX: u32 = 1;
const PORTS: [u16; 5] = [53, 80, 443, 8080, 9000];

/// A small deterministic generator: the same tables every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Pods on this node (identity, address), one on another node, and an
/// address no table knows (the world).
const LOCAL: [(u32, Ipv4Addr); 4] = [
    (400, Ipv4Addr::new(10, 202, 0, 1)),
    (401, Ipv4Addr::new(10, 202, 0, 2)),
    (402, Ipv4Addr::new(10, 202, 0, 3)),
    (403, Ipv4Addr::new(10, 202, 0, 4)),
];
const REMOTE: (u32, Ipv4Addr) = (410, Ipv4Addr::new(10, 202, 9, 1));
const WORLD_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

/// Random policy over the pods: entries of every shape (exact, any port,
/// any peer, any peer and port) in both directions, some requiring
/// authentication; some subjects with none in a direction (then no policy
/// selects them there and the control plane sends default-allow).
fn random_state(r: &mut Lcg) -> NodeState {
    let mut s = NodeState {
        synced: true,
        ..Default::default()
    };
    let ipcache =
        LOCAL
            .iter()
            .map(|&(id, ip)| (id, ip, NODE_ID))
            .chain([(REMOTE.0, REMOTE.1, REMOTE_NODE_ID)]);
    for (id, ip, node) in ipcache {
        let cidr = format!("{ip}/32");
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
    s.nodes.insert(
        NODE.into(),
        pb::Node {
            name: NODE.into(),
            node_id: NODE_ID,
            addresses: vec![],
        },
    );
    let peers: Vec<u32> = LOCAL
        .iter()
        .map(|&(id, _)| id)
        .chain([REMOTE.0, identity::WORLD, identity::UNKNOWN])
        .collect();
    for &(subject, _) in &LOCAL {
        for direction in [0u32, 1] {
            if r.chance(20) {
                let (k, e) =
                    node_agent::state::port_entry((subject, 0, 0, 0, direction), false, "default-allow");
                s.policy.insert(k, e);
                continue;
            }
            for n in 0..1 + r.below(6) {
                let peer = r.pick(&peers);
                let port = if r.chance(30) {
                    0
                } else {
                    u32::from(r.pick(&PORTS))
                };
                let proto = r.pick(&[6u32, 17]);
                let auth = r.chance(40);
                let rule = format!("s{subject}-d{direction}-{n}");
                let (k, e) =
                    node_agent::state::port_entry((subject, peer, port, proto, direction), auth, &rule);
                s.policy.insert(k, e);
            }
        }
    }
    s
}

/// An Ethernet + IPv4 frame carrying a TCP SYN or a UDP datagram, with no
/// payload (the programs read headers only).
fn frame(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let l4 = if proto == 6 { 20 } else { 8 };
    let mut f = vec![0u8; 14 + 20 + l4];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let t = &mut f[34..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    if proto == 6 {
        t[12] = 5 << 4;
        t[13] = 0x02;
    } else {
        t[4..6].copy_from_slice(&(l4 as u16).to_be_bytes());
    }
    f
}

fn pinned_program(dp: &mut datapath::Datapath, pins: &PinDir, name: &str) -> SchedClassifier {
    let path = pins.progs().join(name);
    dp.pin_program(name, &path)
        .unwrap_or_else(|e| panic!("pinning {name}: {e}"));
    SchedClassifier::from_pin(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn drops(counters: &DropCounters) -> BTreeMap<u8, u64> {
    counters.read().expect("drop counters").into_iter().collect()
}

#[test]
fn explain_and_the_kernel_agree_on_randomised_tables() {
    keyway_tests::netns::require_root();
    let mut r = Lcg(0x6b65_7977_6179_0006);
    let (mut checked, mut by_reason) = (0, BTreeMap::<u8, usize>::new());
    for fold_limit in [datapath::tables::FOLD_LIMIT, 0] {
        let pins = PinDir::new(&format!("keyway-agree-{fold_limit}-"));
        let pin_dir = pins.path().to_path_buf();
        let mut cfg = DatapathConfig::new(&pin_dir, NODE);
        cfg.flow_capture = false;
        cfg.policy_fold_limit = fold_limit;
        let mut dp = datapath::Datapath::load(cfg).expect("loading the datapath (root, bpffs)");
        let to_pod = pinned_program(&mut dp, &pins, "keyway_to_pod");
        let from_pod = pinned_program(&mut dp, &pins, "keyway_from_pod");
        // Every packet judged from the tables, none from a cache.
        dp.config()
            .update(|c| c.flags |= config_flags::NO_VERDICT_CACHE | config_flags::NO_SUBJECT_MEMO)
            .expect("config");
        let mut endpoints: aya::maps::HashMap<aya::maps::MapData, u32, keyway_common::EndpointInfo> =
            open_hash(&pin_dir, keyway_common::maps::ENDPOINTS);
        for &(id, ip) in &LOCAL {
            let ep = keyway_common::EndpointInfo {
                ifindex: TEST_RUN_IFINDEX,
                identity: id,
                ..Default::default()
            };
            endpoints
                .insert(datapath::tables::ip_key(ip), ep, 0)
                .expect("endpoint");
        }
        let auth = dp.auth_map().expect("auth map");
        let counters = DropCounters::open(&pin_dir).expect("drop counters");
        let mut sport = 20_000u16;
        for round in 0..40 {
            let state = random_state(&mut r);
            dp.apply_tables(&state).expect("tables");
            // Auth entries for some pairs: valid for an hour, or expired an
            // hour ago (both far from the clock's edge).
            let now = datapath::monotonic_ns();
            let hour = 3_600_000_000_000u64;
            for (key, _) in auth.entries().expect("auth entries") {
                auth.remove(&key).expect("auth remove");
            }
            for &(subject, _) in &LOCAL {
                for (peer, node) in LOCAL
                    .iter()
                    .map(|&(id, _)| (id, NODE_ID))
                    .chain([(REMOTE.0, REMOTE_NODE_ID)])
                {
                    if r.chance(50) {
                        let key = keyway_common::auth_key(subject, peer, node as u16, NODE_ID as u16);
                        let expiry_ns = if r.chance(70) { now + hour } else { now - hour };
                        auth.upsert(key, expiry_ns).expect("auth entry");
                    }
                }
            }
            let pinned = PinnedLookup::open(&pin_dir).expect("pinned maps");
            for _ in 0..60 {
                let subject_ip = r.pick(&LOCAL).1;
                let local_peer = r.pick(&LOCAL).1;
                let peer_ip = r.pick(&[local_peer, REMOTE.1, WORLD_IP]);
                // The from-pod hook is asked only about peers it does not
                // redirect to (a local destination is judged again at its
                // own hook, which `explain` names separately).
                let at = if peer_ip != REMOTE.1 && peer_ip != WORLD_IP || r.chance(50) {
                    hook::TO_POD
                } else {
                    hook::FROM_POD
                };
                let (src, dst) = if at == hook::TO_POD {
                    (peer_ip, subject_ip)
                } else {
                    (subject_ip, peer_ip)
                };
                let proto = r.pick(&[6u8, 17]);
                let port = if r.chance(80) {
                    r.pick(&PORTS)
                } else {
                    1 + r.below(65000) as u16
                };
                sport = sport.wrapping_add(1).max(20_000);
                let before = drops(&counters);
                let prog = if at == hook::TO_POD { &to_pod } else { &from_pod };
                let run = prog
                    .test_run(TestRunOptions {
                        data_in: Some(&frame(proto, src, dst, sport, port)),
                        repeat: 1,
                        ..TestRunOptions::new()
                    })
                    .expect("BPF_PROG_TEST_RUN");
                let after = drops(&counters);
                let counted: Vec<u8> = after
                    .iter()
                    .filter(|(reason, n)| before.get(reason) != Some(n))
                    .map(|(reason, _)| *reason)
                    .collect();
                let kernel = if run.return_value == TC_ACT_SHOT {
                    assert_eq!(counted.len(), 1, "one drop, one reason counted: {counted:?}");
                    counted[0]
                } else {
                    assert!(counted.is_empty(), "forwarded, yet counted {counted:?}");
                    drop_reason::NONE
                };
                let e = evaluate(
                    &pinned,
                    IpAddr::V4(src),
                    IpAddr::V4(dst),
                    port,
                    proto,
                    at,
                    Some(TEST_RUN_IFINDEX),
                    datapath::monotonic_ns(),
                )
                .expect("explain");
                assert_eq!(
                    (kernel, e.forwarded),
                    (e.reason, kernel == drop_reason::NONE),
                    "round {round}, fold limit {fold_limit}: {src} -> {dst} proto {proto} port {port} at hook {at}: \
                     the kernel's reason {kernel}, explain's {e:?}"
                );
                *by_reason.entry(kernel).or_default() += 1;
                checked += 1;
            }
        }
        drop(dp);
    }
    eprintln!("{checked} packets agreed; by drop reason: {by_reason:?}");
    eprintln!("{checked} packets agreed; by drop reason: {by_reason:?}");
    // The tables were random enough to reach every outcome.
    for reason in [
        drop_reason::NONE,
        drop_reason::POLICY_DENIED,
        drop_reason::AUTH_REQUIRED,
    ] {
        assert!(
            by_reason.get(&reason).is_some_and(|n| *n >= 50),
            "{checked} packets, too few with reason {reason}: {by_reason:?}"
        );
    }
}
