//! Local endpoints: which host-side interface leads to each local
//! workload's address. Standalone mode has no CNI plugin to tell the agent,
//! so it reads the node's routing table the way the kernel would route the
//! address: the interface of the most specific direct (gateway-less) route.
//! This is how CNI plugins that route pods (Calico-style /32 routes to host
//! veths) leave the node configured.
//!
//! Bridge CNIs (Debian's `bridge` plugin, flannel, kindnet) leave one route
//! for the whole pod subnet, to a Linux bridge, and the pods on its ports.
//! The bridge itself is not where a pod's packets can be told apart, so the
//! pod is followed to its bridge port instead: the port whose veth leads
//! into the pod's network namespace ([`BridgePlacer`], [`podns`]).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::netlink::Link;
use super::podns;

/// One row of `/proc/net/route` or `/proc/net/ipv6_route` that can reach
/// an address directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub iface: String,
    pub dest: IpAddr,
    pub prefix_len: u32,
}

const RTF_UP: u32 = 0x1;
const RTF_GATEWAY: u32 = 0x2;
const RTF_ANYCAST: u32 = 0x0010_0000;
const RTF_LOCAL: u32 = 0x8000_0000;

/// Direct routes (up, no gateway) from the text of `/proc/net/route`.
pub fn parse_routes(text: &str) -> Vec<Route> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Ok(dest), Ok(flags), Ok(mask)) = (
            u32::from_str_radix(f[1], 16),
            u32::from_str_radix(f[3], 16),
            u32::from_str_radix(f[7], 16),
        ) else {
            continue;
        };
        if flags & RTF_UP == 0 || flags & RTF_GATEWAY != 0 {
            continue;
        }
        // The kernel prints both in memory (network) byte order as a host u32.
        let mask = u32::from_be_bytes(mask.to_ne_bytes());
        out.push(Route {
            iface: f[0].to_string(),
            dest: IpAddr::V4(Ipv4Addr::from(dest.to_ne_bytes())),
            prefix_len: mask.count_ones(),
        });
    }
    out
}

/// Direct routes (up, no gateway) from the text of `/proc/net/ipv6_route`:
/// destination, its prefix length, source, its length, next hop, metric,
/// reference count, use count, flags, device; numbers in hex.
pub fn parse_routes6(text: &str) -> Vec<Route> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let (Ok(dest), Ok(len), Ok(flags)) = (
            u128::from_str_radix(f[0], 16),
            u32::from_str_radix(f[1], 16),
            u32::from_str_radix(f[8], 16),
        ) else {
            continue;
        };
        // The local and anycast routes of the node's own addresses (the
        // file lists every table; /proc/net/route only the main one).
        if flags & RTF_UP == 0 || flags & (RTF_GATEWAY | RTF_LOCAL | RTF_ANYCAST) != 0 || len > 128 {
            continue;
        }
        out.push(Route {
            iface: f[9].to_string(),
            dest: IpAddr::V6(Ipv6Addr::from(dest)),
            prefix_len: len,
        });
    }
    out
}

/// The interface of the most specific direct route to `ip`, if it is not
/// the loopback.
pub fn interface_for(routes: &[Route], ip: IpAddr) -> Option<&str> {
    routes
        .iter()
        .filter(|r| r.iface != "lo" && r.dest.is_ipv4() == ip.is_ipv4())
        .filter(|r| super::tables::masked(ip, r.prefix_len) == super::tables::masked(r.dest, r.prefix_len))
        .max_by_key(|r| r.prefix_len)
        .map(|r| r.iface.as_str())
}

/// Reads the calling thread's network namespace (the agent's, or in tests
/// the namespace the datapath thread entered).
pub fn read_proc_net(file: &str) -> std::io::Result<String> {
    std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))
}

/// A pod, as the control plane names it: (namespace, name).
pub type WorkloadKey = (String, String);

/// A local pod whose addresses are routed to a bridge: which bridge, and
/// what in its record says which network namespace is the pod's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The bridge's interface index.
    pub bridge: u32,
    pub homes: Vec<podns::Home>,
}

/// A bridge port as far as placement is concerned: an index is reused
/// after a link is deleted, a name and index together are not in practice
/// (CNIs name host veths at random), and the far end stays where it was.
fn same_port(a: &Link, b: &Link) -> bool {
    a.index == b.index && a.name == b.name && a.master == b.master && a.peer_netnsid == b.peer_netnsid
}

#[derive(Debug, Clone)]
struct Placement {
    wanted: Wanted,
    port: Link,
    /// The pod's MAC when it was placed: the only source MAC its port may
    /// send from (the bridge learns where a MAC lives from the frames it
    /// sees, so another pod's MAC would steer that pod's traffic here).
    mac: [u8; 6],
}

/// Why a pod behind a bridge has no port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Withheld {
    /// Nothing ties the pod to a network namespace the agent can find
    /// (why): its record has no `netns:` or `k8s:pod-uid:` selector, or
    /// what they name cannot be found.
    Unbound(String),
    /// Several ports of the bridge lead into the pod's namespace (names).
    SeveralPorts(Vec<String>),
    /// The one port into the pod's namespace is placed for another pod
    /// (which), as when two records name one namespace.
    PortTaken(String),
    /// The pod's end has the MAC of a pod placed behind another port, or
    /// of another pod placed in the same scan (that port's name).
    MacInUse(String),
    /// The MAC of the pod's end could not be read (why).
    NoMac(String),
}

impl Withheld {
    /// Every [`Withheld::reason`], for metrics.
    pub const REASONS: [&'static str; 5] = ["unbound", "several-ports", "port-taken", "mac-in-use", "no-mac"];

    /// Why, in one word (the `reason` label of `keyway_datapath_endpoints`).
    pub fn reason(&self) -> &'static str {
        match self {
            Withheld::Unbound(_) => "unbound",
            Withheld::SeveralPorts(_) => "several-ports",
            Withheld::PortTaken(_) => "port-taken",
            Withheld::MacInUse(_) => "mac-in-use",
            Withheld::NoMac(_) => "no-mac",
        }
    }
}

/// How long a restarted agent holds a MAC for the pod the last agent placed
/// with it, while that pod is not placed again.
pub const REMEMBER_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// Which bridge port each pod behind a bridge is placed behind, kept from
/// scan to scan.
///
/// A pod chooses its own addresses (with CAP_NET_ADMIN in its namespace it
/// can add any), so what a pod's interface holds says nothing about whose
/// the port is. What the pod cannot choose is its network namespace: the
/// agent finds the namespace its record names (the pod's processes, by the
/// pod UID in their cgroup, or a named namespace in standalone mode) and
/// places the pod behind the one port of its bridge whose veth leads into
/// it. A port into another namespace is never placed for the pod, whatever
/// its far end claims, before or after an agent restart.
///
/// A pod's MAC is the one thing read from the pod's end, and it is the
/// pod's to change: a pod is not placed with a MAC that a placed pod sends
/// from, nor with one another pod placed in the same scan has. A restarted
/// agent places first the pods whose MAC is the one the last agent placed
/// them with, so a pod that took a neighbour's MAC while the agent was down
/// does not win it.
#[derive(Debug, Default)]
pub struct BridgePlacer {
    placed: HashMap<WorkloadKey, Placement>,
    /// The MACs the last agent placed pods with (its endpoint map), until
    /// those pods are placed again or [`REMEMBER_FOR`] has passed.
    remembered: HashMap<WorkloadKey, ([u8; 6], std::time::Instant)>,
}

impl BridgePlacer {
    /// The port `key` is placed behind, and the MAC its pod sends from.
    pub fn port_of(&self, key: &WorkloadKey) -> Option<(&Link, [u8; 6])> {
        self.placed.get(key).map(|p| (&p.port, p.mac))
    }

    /// Takes the MAC the last agent placed `key` with (a restart).
    pub fn remember(&mut self, key: WorkloadKey, mac: [u8; 6]) {
        if mac != [0; 6] {
            self.remembered.insert(key, (mac, std::time::Instant::now()));
        }
    }

    /// One scan: forgets what is gone and places what can be placed.
    /// `ports` are the veth ports of the bridges in `wanted`; `nsids_of`
    /// finds the ids, in the node's namespace, of the pod's namespaces
    /// (those of [`podns::Resolver::nsids`]); `mac_of(nsid, index)` reads
    /// the MAC of an interface there. Returns the pods withheld, and why.
    pub fn place(
        &mut self,
        ports: &[Link],
        wanted: &BTreeMap<WorkloadKey, Wanted>,
        mut nsids_of: impl FnMut(&[podns::Home]) -> Result<Vec<i32>, String>,
        mut mac_of: impl FnMut(i32, u32) -> Result<Option<[u8; 6]>, String>,
    ) -> BTreeMap<WorkloadKey, Withheld> {
        self.placed.retain(|key, p| {
            wanted.get(key) == Some(&p.wanted) && ports.iter().any(|l| same_port(l, &p.port))
        });
        // A pod that cannot be placed again (its record no longer names a
        // namespace it is in) holds its old MAC only for a while.
        self.remembered
            .retain(|key, (_, since)| wanted.contains_key(key) && since.elapsed() < REMEMBER_FOR);
        let mut withheld = BTreeMap::new();
        // The one port into each unplaced pod's namespace, and its MAC.
        let mut found: Vec<(&WorkloadKey, &Wanted, &Link, [u8; 6])> = Vec::new();
        for (key, w) in wanted {
            if self.placed.contains_key(key) {
                continue;
            }
            let nsids = match nsids_of(&w.homes) {
                Ok(ids) => ids,
                Err(why) => {
                    withheld.insert(key.clone(), Withheld::Unbound(why));
                    continue;
                }
            };
            // None yet: its CNI ADD is under way.
            let into: Vec<&Link> = ports
                .iter()
                .filter(|l| l.master == w.bridge && l.peer_netnsid.is_some_and(|id| nsids.contains(&id)))
                .collect();
            let port = match into.as_slice() {
                [] => continue,
                [one] => *one,
                many => {
                    let names = names(many.iter().copied());
                    withheld.insert(key.clone(), Withheld::SeveralPorts(names));
                    continue;
                }
            };
            if let Some((other, _)) = self.placed.iter().find(|(_, p)| same_port(&p.port, port)) {
                withheld.insert(
                    key.clone(),
                    Withheld::PortTaken(format!("{}/{}", other.0, other.1)),
                );
                continue;
            }
            let nsid = port.peer_netnsid.expect("matched by it");
            match mac_of(nsid, port.peer) {
                Ok(Some(mac)) if mac != [0; 6] => found.push((key, w, port, mac)),
                Ok(_) => {
                    withheld.insert(key.clone(), Withheld::NoMac("the pod's end has no MAC".into()));
                }
                Err(why) => {
                    withheld.insert(key.clone(), Withheld::NoMac(why));
                }
            }
        }
        // Those whose MAC is the one they were placed with first, then the
        // rest; a MAC a placed pod has, or two candidates of one pass share,
        // or one the last agent placed another pod with that is not placed
        // again yet, places nobody.
        let (first, rest): (Vec<_>, Vec<_>) = found
            .into_iter()
            .partition(|(key, _, _, mac)| self.remembered.get(*key).map(|(m, _)| m) == Some(mac));
        for pass in [first, rest] {
            for (i, (key, w, port, mac)) in pass.iter().enumerate() {
                let holder = self
                    .placed
                    .values()
                    .map(|p| (&p.port, p.mac))
                    .chain(
                        pass.iter()
                            .enumerate()
                            .filter(|(j, _)| *j != i)
                            .map(|(_, (_, _, l, m))| (*l, *m)),
                    )
                    .find(|(_, m)| m == mac)
                    .map(|(l, _)| l.name.clone())
                    .or_else(|| {
                        self.remembered
                            .iter()
                            .find(|(k, (m, _))| *k != *key && m == mac && !self.placed.contains_key(*k))
                            .map(|(k, _)| format!("{}/{} (before the agent restarted)", k.0, k.1))
                    });
                if let Some(holder) = holder {
                    withheld.insert((*key).clone(), Withheld::MacInUse(holder));
                    continue;
                }
                self.remembered.remove(*key);
                self.placed.insert(
                    (*key).clone(),
                    Placement {
                        wanted: (*w).clone(),
                        port: (*port).clone(),
                        mac: *mac,
                    },
                );
            }
        }
        withheld
    }
}

fn names<'a>(ports: impl IntoIterator<Item = &'a Link>) -> Vec<String> {
    let mut n: Vec<String> = ports.into_iter().map(|l| l.name.clone()).collect();
    n.sort();
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
kwa\t0100C90A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0
down0\t0200C90A\t00000000\t0000\t0\t0\t0\tFFFFFFFF\t0\t0\t0
";

    const BR: u32 = 2;

    /// A port into namespace `nsid` (the peer is index 2 there).
    fn port(index: u32, name: &str, nsid: i32) -> Link {
        Link {
            index,
            name: name.into(),
            kind: "veth".into(),
            master: BR,
            peer: 2,
            peer_netnsid: Some(nsid),
            mac: None,
        }
    }

    fn key(name: &str) -> WorkloadKey {
        ("default".into(), name.into())
    }

    /// Pods by name, each naming namespace `ns-<name>`, or nothing.
    fn wanted(pods: &[(&str, Option<&str>)]) -> BTreeMap<WorkloadKey, Wanted> {
        pods.iter()
            .map(|(name, ns)| {
                let homes = ns.map(|n| podns::Home::Netns(n.into())).into_iter().collect();
                (key(name), Wanted { bridge: BR, homes })
            })
            .collect()
    }

    /// A node: which id each namespace name has, and the MAC of each
    /// namespace's end.
    struct Node {
        nsids: HashMap<&'static str, i32>,
        macs: HashMap<i32, [u8; 6]>,
    }

    impl Node {
        fn new(namespaces: &[(&'static str, i32, u8)]) -> Node {
            Node {
                nsids: namespaces.iter().map(|(n, id, _)| (*n, *id)).collect(),
                macs: namespaces
                    .iter()
                    .map(|(_, id, m)| (*id, [2, 0, 0, 0, 0, *m]))
                    .collect(),
            }
        }

        fn place(
            &self,
            p: &mut BridgePlacer,
            ports: &[Link],
            w: &BTreeMap<WorkloadKey, Wanted>,
        ) -> BTreeMap<WorkloadKey, Withheld> {
            p.place(
                ports,
                w,
                |homes| match homes {
                    [podns::Home::Netns(n)] => Ok(self.nsids.get(n.as_str()).copied().into_iter().collect()),
                    _ => Err("no selector".into()),
                },
                |nsid, _| Ok(self.macs.get(&nsid).copied()),
            )
        }
    }

    fn placed<'a>(p: &'a BridgePlacer, name: &str) -> Option<&'a str> {
        p.port_of(&key(name)).map(|(l, _)| l.name.as_str())
    }

    #[test]
    fn a_pod_is_placed_behind_the_port_into_its_namespace_only() {
        // x's port leads into x's own namespace, whatever x claims there.
        let node = Node::new(&[("ns-a", 1, 1), ("ns-b", 2, 2), ("ns-x", 9, 9), ("ns-c", 3, 3)]);
        let ports = [port(10, "vx", 9), port(11, "va", 1), port(12, "vb", 2)];
        let w = wanted(&[
            ("a", Some("ns-a")),
            ("b", Some("ns-b")),
            ("c", Some("ns-c")),
            ("d", Some("ns-d")),
        ]);
        let mut p = BridgePlacer::default();
        let withheld = node.place(&mut p, &ports, &w);
        assert_eq!((placed(&p, "a"), placed(&p, "b")), (Some("va"), Some("vb")));
        // c's namespace has no port yet, d's is not joined to the node: both
        // wait, neither is refused.
        assert_eq!((placed(&p, "c"), placed(&p, "d")), (None, None));
        assert!(withheld.is_empty(), "{withheld:?}");
        assert_eq!(
            p.port_of(&key("a")).unwrap().1,
            [2, 0, 0, 0, 0, 1],
            "placed with its pod's MAC"
        );
    }

    #[test]
    fn a_pod_whose_port_is_gone_is_placed_behind_its_new_one_and_nobody_elses() {
        let node = Node::new(&[("ns-e", 5, 5), ("ns-y", 9, 9)]);
        let w = wanted(&[("e", Some("ns-e"))]);
        let mut p = BridgePlacer::default();
        node.place(&mut p, &[port(10, "vy", 9), port(11, "ve", 5)], &w);
        assert_eq!(placed(&p, "e"), Some("ve"));
        // e's sandbox is recreated with the same address: its old port goes
        // first. y, still there, never gets e.
        node.place(&mut p, &[port(10, "vy", 9)], &w);
        assert_eq!(placed(&p, "e"), None);
        node.place(&mut p, &[port(10, "vy", 9), port(13, "ve2", 5)], &w);
        assert_eq!(placed(&p, "e"), Some("ve2"));
        // A new agent decides the same from nothing.
        let mut fresh = BridgePlacer::default();
        node.place(&mut fresh, &[port(10, "vy", 9)], &w);
        assert_eq!(placed(&fresh, "e"), None);
    }

    #[test]
    fn a_pod_nothing_ties_to_a_namespace_is_withheld_and_says_why() {
        let node = Node::new(&[("ns-a", 1, 1)]);
        let w = wanted(&[("a", None)]);
        let mut p = BridgePlacer::default();
        let withheld = node.place(&mut p, &[port(11, "va", 1)], &w);
        assert_eq!(
            withheld.get(&key("a")),
            Some(&Withheld::Unbound("no selector".into()))
        );
        assert_eq!(placed(&p, "a"), None);
    }

    #[test]
    fn several_ports_into_one_namespace_or_one_port_for_two_records_place_nobody_twice() {
        let node = Node::new(&[("ns-a", 1, 1)]);
        let mut p = BridgePlacer::default();
        let withheld = node.place(
            &mut p,
            &[port(11, "va", 1), port(12, "va2", 1)],
            &wanted(&[("a", Some("ns-a"))]),
        );
        assert_eq!(
            withheld.get(&key("a")),
            Some(&Withheld::SeveralPorts(vec!["va".into(), "va2".into()]))
        );
        // Two records naming one namespace: new together, neither; the one
        // placed first keeps the port.
        let w = wanted(&[("a", Some("ns-a")), ("b", Some("ns-a"))]);
        let withheld = node.place(&mut p, &[port(11, "va", 1)], &w);
        assert_eq!((placed(&p, "a"), placed(&p, "b")), (None, None), "{withheld:?}");
        node.place(&mut p, &[port(11, "va", 1)], &wanted(&[("a", Some("ns-a"))]));
        let withheld = node.place(&mut p, &[port(11, "va", 1)], &w);
        assert_eq!(placed(&p, "a"), Some("va"));
        assert_eq!(
            withheld.get(&key("b")),
            Some(&Withheld::PortTaken("default/a".into()))
        );
    }

    #[test]
    fn a_pod_with_another_pods_mac_is_not_placed() {
        // x set its MAC to a's, placed already: x is not placed.
        let mut node = Node::new(&[("ns-a", 1, 1), ("ns-x", 9, 9)]);
        let mut p = BridgePlacer::default();
        let mut w = wanted(&[("a", Some("ns-a"))]);
        node.place(&mut p, &[port(11, "va", 1)], &w);
        node.macs.insert(9, [2, 0, 0, 0, 0, 1]);
        w.extend(wanted(&[("x", Some("ns-x"))]));
        let ports = [port(10, "vx", 9), port(11, "va", 1)];
        let withheld = node.place(&mut p, &ports, &w);
        assert_eq!(withheld.get(&key("x")), Some(&Withheld::MacInUse("va".into())));
        // Two pods new in one scan with one MAC: neither.
        let mut fresh = BridgePlacer::default();
        let withheld = node.place(&mut fresh, &ports, &w);
        assert_eq!(
            (placed(&fresh, "a"), placed(&fresh, "x")),
            (None, None),
            "{withheld:?}"
        );
        // After a restart, the pod still on the MAC it was placed with wins
        // it, whichever comes first by name.
        let mut restarted = BridgePlacer::default();
        restarted.remember(key("a"), [2, 0, 0, 0, 0, 1]);
        restarted.remember(key("x"), [2, 0, 0, 0, 0, 9]);
        let withheld = node.place(&mut restarted, &ports, &w);
        assert_eq!(placed(&restarted, "a"), Some("va"));
        assert_eq!(withheld.get(&key("x")), Some(&Withheld::MacInUse("va".into())));
    }

    #[test]
    fn a_mac_the_last_agent_placed_a_pod_with_stays_that_pods_until_it_is_placed() {
        // x took a's MAC while the agent was down, and a's port is not
        // there yet when the agent comes back: x does not get the MAC.
        let mut node = Node::new(&[("ns-a", 1, 1), ("ns-x", 9, 9)]);
        node.macs.insert(9, [2, 0, 0, 0, 0, 1]);
        let w = wanted(&[("a", Some("ns-a")), ("x", Some("ns-x"))]);
        let mut p = BridgePlacer::default();
        p.remember(key("a"), [2, 0, 0, 0, 0, 1]);
        p.remember(key("x"), [2, 0, 0, 0, 0, 9]);
        let withheld = node.place(&mut p, &[port(10, "vx", 9)], &w);
        assert_eq!(
            withheld.get(&key("x")),
            Some(&Withheld::MacInUse(
                "default/a (before the agent restarted)".into()
            ))
        );
        node.place(&mut p, &[port(10, "vx", 9), port(11, "va", 1)], &w);
        assert_eq!(placed(&p, "a"), Some("va"));
    }

    /// A pod's processes may be in several namespaces (a runtime's monitor
    /// in the node's, a workload's own): each is the pod's, and the one
    /// with a port on the bridge places it.
    #[test]
    fn a_pod_in_several_namespaces_is_placed_behind_the_one_port_into_them() {
        let node = Node::new(&[("ns-a", 1, 1)]);
        let w = wanted(&[("a", Some("ns-a"))]);
        let mut p = BridgePlacer::default();
        p.place(
            &[port(10, "vother", 7), port(11, "va", 1)],
            &w,
            |_| Ok(vec![3, 1]),
            |nsid, _| Ok(node.macs.get(&nsid).copied()),
        );
        assert_eq!(placed(&p, "a"), Some("va"));
    }

    #[test]
    fn a_placement_ends_with_its_port_or_a_change_of_record() {
        let node = Node::new(&[("ns-a", 1, 1), ("ns-a2", 2, 2)]);
        let mut p = BridgePlacer::default();
        let ports = [port(11, "va", 1), port(12, "va2", 2)];
        node.place(&mut p, &ports, &wanted(&[("a", Some("ns-a"))]));
        assert_eq!(placed(&p, "a"), Some("va"));
        // The record now names another namespace (a new pod of that name).
        node.place(&mut p, &ports, &wanted(&[("a", Some("ns-a2"))]));
        assert_eq!(placed(&p, "a"), Some("va2"));
        // A port whose index comes back under another name is another port.
        let mut reused = port(12, "vnew", 2);
        reused.peer = 3;
        node.place(&mut p, &[reused], &wanted(&[("a", Some("ns-a2"))]));
        assert_eq!(placed(&p, "a"), Some("vnew"));
        node.place(&mut p, &ports, &wanted(&[]));
        assert_eq!(placed(&p, "a"), None);
    }

    #[test]
    fn a_host_route_to_a_veth_names_the_pod_interface() {
        let mut routes = parse_routes(ROUTES);
        routes.extend(parse_routes6(ROUTES6));
        let at = |ip: &str| interface_for(&routes, ip.parse().unwrap());
        assert_eq!(at("10.201.0.1"), Some("kwa"));
        assert_eq!(at("192.168.1.7"), Some("eth0"));
        // Reached only through a gateway (the default route): not local.
        assert_eq!(at("8.8.8.8"), None);
        // A route that is not up does not count.
        assert_eq!(at("10.201.0.2"), None);
        // IPv6: the host route to the pod's veth beats the subnet's.
        assert_eq!(at("fd00:201::1"), Some("kwa"));
        assert_eq!(at("fd00:201::7"), Some("br0"));
        // A local route (an address of the node's own) is not a way to a pod.
        assert_eq!(at("fd00:202::5"), None);
        assert_eq!(at("2001:db8::1"), None, "only through the default gateway");
        assert_eq!(at("fd00:202::2"), None, "a route that is not up");
    }

    /// As Linux prints it: a host route, a subnet on a bridge, the default
    /// through a gateway, a route that is not up, and the loopback's.
    const ROUTES6: &str = "\
fd000201000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001      kwa
fd000202000000000000000000000002 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000000      kwb
fd000201000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001      br0
fd000202000000000000000000000005 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000001 00000000 80200001      kwx
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000001 00000000 80200001       lo
";
}
