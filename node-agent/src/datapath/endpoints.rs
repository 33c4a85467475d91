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
//! address is followed to the bridge port instead: the pod's address lives
//! on the far end of a port's veth, in the pod's network namespace, which
//! the node can read by the id the port reports ([`read_claims`]), and
//! weighs against what other ports claim ([`BridgePlacer`]).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use super::netlink::{self, Link};

/// One row of `/proc/net/route` that can reach an address directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub iface: String,
    pub dest: Ipv4Addr,
    pub prefix_len: u32,
}

const RTF_UP: u32 = 0x1;
const RTF_GATEWAY: u32 = 0x2;

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
            dest: Ipv4Addr::from(dest.to_ne_bytes()),
            prefix_len: mask.count_ones(),
        });
    }
    out
}

/// The interface of the most specific direct route to `ip`, if it is not
/// the loopback.
pub fn interface_for(routes: &[Route], ip: Ipv4Addr) -> Option<&str> {
    routes
        .iter()
        .filter(|r| r.iface != "lo")
        .filter(|r| {
            let m = if r.prefix_len == 0 {
                0
            } else {
                u32::MAX << (32 - r.prefix_len)
            };
            u32::from(ip) & m == u32::from(r.dest) & m
        })
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

/// A local workload address routed to a bridge: whose it is, and which
/// bridge it must be found behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub key: WorkloadKey,
    pub identity: u32,
    /// The bridge's interface index.
    pub bridge: u32,
}

/// One veth port of a bridge, with the IPv4 addresses the pod behind it
/// has on the far end (`None`: not read this scan, see
/// [`BridgePlacer::ports_to_read`]; `Some(Err)`: could not be read).
#[derive(Debug)]
pub struct PortView {
    pub link: Link,
    pub claims: Option<std::io::Result<Vec<Ipv4Addr>>>,
    /// The MAC of the pod's end, as read with the claims.
    pub mac: Option<[u8; 6]>,
}

/// A bridge port as far as placement is concerned: an index is reused
/// after a link is deleted, a name and index together are not in practice
/// (CNIs name host veths at random).
fn same_port(a: &Link, b: &Link) -> bool {
    a.index == b.index && a.name == b.name
}

#[derive(Debug, Clone)]
struct Placement {
    key: WorkloadKey,
    port: Link,
    /// The pod's MAC when it was placed: the only source MAC its port may
    /// send from (the bridge learns where a MAC lives from the frames it
    /// sees, so another pod's MAC would steer that pod's traffic here).
    mac: [u8; 6],
}

/// Ports that claimed one address together, for as long as that address
/// belongs to the same pod. `lost`: one of them (or the port the address
/// was placed behind) is gone since, so whoever still claims it may be the
/// one that lied: the address is withheld until the pod's record changes.
#[derive(Debug, Clone)]
struct Contest {
    key: WorkloadKey,
    ports: Vec<Link>,
    lost: bool,
}

/// Why an address behind a bridge has no port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Withheld {
    /// Claimed behind several ports now (their names).
    Contested(Vec<String>),
    /// Claimed behind several ports before, and one of them, or the port it
    /// was placed behind, is gone (their names): withheld until the pod's
    /// record changes, so the port left over cannot inherit it.
    Orphaned(Vec<String>),
    /// The one port claiming it has the MAC of a pod placed behind another
    /// port (named), or no MAC that could be read (none named).
    MacInUse(Vec<String>),
}

/// What one [`BridgePlacer::place`] found besides the placements.
#[derive(Debug, Default)]
pub struct PlaceOutcome {
    pub withheld: HashMap<Ipv4Addr, Withheld>,
    /// Ports whose claims were ignored, and why.
    pub ignored: Vec<(String, &'static str)>,
    /// Ports whose far end could not be read, and why.
    pub skipped: Vec<(String, String)>,
}

/// Which bridge port each pod address behind a bridge is placed behind,
/// kept from scan to scan.
///
/// A pod chooses its own addresses: with CAP_NET_ADMIN in its namespace it
/// can add any address, before or after the real owner's. Placing an
/// address behind the wrong port lets that pod send as the other (the
/// source check follows the endpoint), so a claim counts only when nothing
/// says it is a lie:
/// - a port placed for one pod (its *owner*, kept while the port lives)
///   speaks for that pod only: its claims to other pods' addresses are
///   ignored, so a pod cannot contest its neighbours by claiming the subnet;
/// - a port not placed yet that claims addresses of two pods is ignored;
/// - an address claimed behind two ports is placed behind neither, and the
///   claimants are remembered while the address belongs to that pod;
/// - a placement stands against later claims while its port lives, and the
///   claim is remembered as a contest;
/// - once a contested port or a placed port is gone, the address is
///   withheld until its pod's record changes: which claimant is left over
///   cannot be told from the claims, and the one that lied must not inherit
///   it when the real pod goes away.
///
/// A pod's address reaches the agent only after its CNI ADD has set it, so
/// a pod that claims it earlier is contested by the real pod, never placed.
#[derive(Debug, Default)]
pub struct BridgePlacer {
    placed: HashMap<Ipv4Addr, Placement>,
    owners: HashMap<u32, (Link, WorkloadKey)>,
    contests: HashMap<Ipv4Addr, Contest>,
}

impl BridgePlacer {
    /// The port `ip` is placed behind, and the MAC its pod sends from.
    pub fn port_of(&self, ip: Ipv4Addr) -> Option<(&Link, [u8; 6])> {
        self.placed.get(&ip).map(|p| (&p.port, p.mac))
    }

    /// Takes a placement the last agent wrote (its endpoint map), if the
    /// address still belongs to a pod of that identity behind that bridge
    /// and the port is one of `ports`: a restart must not reopen the claims
    /// it had settled.
    pub fn seed(
        &mut self,
        ip: Ipv4Addr,
        ifindex: u32,
        identity: u32,
        mac: [u8; 6],
        ports: &[Link],
        wanted: &HashMap<Ipv4Addr, Wanted>,
    ) {
        let Some(w) = wanted.get(&ip) else { return };
        let Some(port) = ports.iter().find(|p| p.index == ifindex && p.master == w.bridge) else {
            return;
        };
        if w.identity != identity || mac == [0; 6] || self.placed.contains_key(&ip) {
            return;
        }
        if let Some((_, owner)) = self.owners.get(&port.index)
            && *owner != w.key
        {
            return;
        }
        self.owners.insert(port.index, (port.clone(), w.key.clone()));
        self.placed.insert(
            ip,
            Placement {
                key: w.key.clone(),
                port: port.clone(),
                mac,
            },
        );
    }

    /// The ports whose far end must be read this scan: those not placed for
    /// any pod yet, and those whose pod still has an address not placed.
    /// A port placed for a pod speaks for that pod only, so once all of a
    /// pod's addresses are placed its port is not read again.
    pub fn ports_to_read(&self, ports: &[Link], wanted: &HashMap<Ipv4Addr, Wanted>) -> Vec<bool> {
        ports
            .iter()
            .map(|p| match self.owners.get(&p.index) {
                Some((l, key)) if same_port(l, p) => wanted
                    .iter()
                    .any(|(ip, w)| w.key == *key && !self.placed.contains_key(ip)),
                _ => true,
            })
            .collect()
    }

    /// One scan: forgets what is gone, weighs the claims read from `ports`
    /// (the veth ports of the bridges in `wanted`) and places what can be
    /// placed.
    pub fn place(&mut self, ports: &[PortView], wanted: &HashMap<Ipv4Addr, Wanted>) -> PlaceOutcome {
        let mut out = PlaceOutcome::default();
        let present = |l: &Link| {
            ports
                .iter()
                .any(|p| same_port(&p.link, l) && p.link.master == l.master)
        };
        self.owners.retain(|_, (l, _)| present(l));
        let mut orphaned = Vec::new();
        self.placed.retain(|ip, p| {
            let Some(w) = wanted.get(ip).filter(|w| w.key == p.key) else {
                return false;
            };
            if !present(&p.port) || w.bridge != p.port.master {
                orphaned.push((*ip, p.key.clone(), p.port.clone()));
                return false;
            }
            // The pod's identity may have changed; its port has not.
            true
        });
        for (ip, key, port) in orphaned {
            let c = self.contests.entry(ip).or_insert(Contest {
                key,
                ports: Vec::new(),
                lost: false,
            });
            if !c.ports.iter().any(|l| same_port(l, &port)) {
                c.ports.push(port);
            }
            c.lost = true;
        }
        self.contests
            .retain(|ip, c| wanted.get(ip).is_some_and(|w| w.key == c.key));
        for c in self.contests.values_mut() {
            if c.ports.iter().any(|l| !present(l)) {
                c.lost = true;
            }
        }

        // The claims that count, by address.
        let mut claims: HashMap<Ipv4Addr, Vec<&PortView>> = HashMap::new();
        for view in ports {
            let port = &view.link;
            let addresses = match &view.claims {
                None => continue,
                Some(Err(e)) => {
                    out.skipped.push((port.name.clone(), e.to_string()));
                    continue;
                }
                Some(Ok(a)) => a,
            };
            let mine: Vec<(Ipv4Addr, &Wanted)> = addresses
                .iter()
                .filter_map(|ip| wanted.get(ip).map(|w| (*ip, w)))
                .filter(|(_, w)| w.bridge == port.master)
                .collect();
            let owner = self
                .owners
                .get(&port.index)
                .filter(|(l, _)| same_port(l, port))
                .map(|(_, k)| k);
            let counted: Vec<Ipv4Addr> = match owner {
                Some(key) => {
                    if mine.iter().any(|(_, w)| w.key != *key) {
                        out.ignored
                            .push((port.name.clone(), "claims addresses of other pods than its own"));
                    }
                    mine.iter()
                        .filter(|(_, w)| w.key == *key)
                        .map(|(ip, _)| *ip)
                        .collect()
                }
                None => {
                    let first = mine.first().map(|(_, w)| &w.key);
                    if mine.iter().any(|(_, w)| Some(&w.key) != first) {
                        out.ignored
                            .push((port.name.clone(), "claims addresses of several pods"));
                        Vec::new()
                    } else {
                        mine.iter().map(|(ip, _)| *ip).collect()
                    }
                }
            };
            for ip in counted {
                claims.entry(ip).or_default().push(view);
            }
        }

        let mut ips: Vec<&Ipv4Addr> = wanted.keys().collect();
        ips.sort();
        for ip in ips {
            let w = &wanted[ip];
            let claimants = claims.get(ip).map(Vec::as_slice).unwrap_or_default();
            if let Some(p) = self.placed.get(ip) {
                let others: Vec<&Link> = claimants
                    .iter()
                    .map(|v| &v.link)
                    .filter(|l| !same_port(l, &p.port))
                    .collect();
                if !others.is_empty() {
                    let port = p.port.clone();
                    self.remember_contest(*ip, w, std::iter::once(&port).chain(others));
                }
                continue;
            }
            if let Some(c) = self.contests.get(ip)
                && c.lost
            {
                out.withheld.insert(*ip, Withheld::Orphaned(names(&c.ports)));
                continue;
            }
            match claimants {
                [] => {}
                [one] => {
                    let port = &one.link;
                    // A MAC is one pod's: a port sending from a MAC placed
                    // behind another port would steer that pod's frames.
                    let holder = self
                        .placed
                        .values()
                        .find(|p| !same_port(&p.port, port) && Some(p.mac) == one.mac);
                    match (one.mac, holder) {
                        (Some(mac), None) if mac != [0; 6] => {
                            self.owners.insert(port.index, (port.clone(), w.key.clone()));
                            self.placed.insert(
                                *ip,
                                Placement {
                                    key: w.key.clone(),
                                    port: port.clone(),
                                    mac,
                                },
                            );
                        }
                        (_, holder) => {
                            let named = holder.map(|h| h.port.name.clone()).into_iter().collect();
                            out.withheld.insert(*ip, Withheld::MacInUse(named));
                        }
                    }
                }
                many => {
                    let ports = || many.iter().map(|v| &v.link);
                    self.remember_contest(*ip, w, ports());
                    out.withheld.insert(*ip, Withheld::Contested(names(ports())));
                }
            }
        }
        out
    }

    fn remember_contest<'a>(&mut self, ip: Ipv4Addr, w: &Wanted, ports: impl Iterator<Item = &'a Link>) {
        let c = self.contests.entry(ip).or_insert(Contest {
            key: w.key.clone(),
            ports: Vec::new(),
            lost: false,
        });
        for l in ports {
            if !c.ports.iter().any(|p| same_port(p, l)) {
                c.ports.push(l.clone());
            }
        }
    }
}

fn names<'a>(ports: impl IntoIterator<Item = &'a Link>) -> Vec<String> {
    let mut n: Vec<String> = ports.into_iter().map(|l| l.name.clone()).collect();
    n.sort();
    n
}

/// Reads, for each port marked in `read`, the IPv4 addresses of its veth
/// peer, from the peer's namespace by the id the port reports (one dump per
/// namespace, however many ports lead into it).
pub fn read_claims(ports: &[Link], read: &[bool]) -> Vec<PortView> {
    let mut by_ns: HashMap<i32, Result<Vec<netlink::Address>, String>> = HashMap::new();
    let mut links_by_ns: HashMap<i32, Vec<Link>> = HashMap::new();
    ports
        .iter()
        .zip(read)
        .map(|(port, read)| {
            let claims = match (read, port.peer_netnsid) {
                (false, _) => None,
                // A veth whose peer is in the node's own namespace leads to
                // no pod.
                (true, None) => Some(Ok(Vec::new())),
                (true, Some(nsid)) => {
                    let dump = by_ns
                        .entry(nsid)
                        .or_insert_with(|| netlink::ipv4_addresses_in(nsid).map_err(|e| e.to_string()));
                    Some(match dump {
                        Ok(a) => Ok(a
                            .iter()
                            .filter(|a| a.index == port.peer)
                            .filter_map(|a| match a.ip {
                                IpAddr::V4(ip) => Some(ip),
                                IpAddr::V6(_) => None,
                            })
                            .collect()),
                        Err(e) => Err(std::io::Error::other(e.clone())),
                    })
                }
            };
            // The MAC of the pod's end, read beside its addresses (none
            // if it cannot be: such a port is not placed).
            let mac = match (read, port.peer_netnsid) {
                (true, Some(nsid)) => links_by_ns
                    .entry(nsid)
                    .or_insert_with(|| netlink::links_in(nsid).unwrap_or_default())
                    .iter()
                    .find(|l| l.index == port.peer)
                    .and_then(|l| l.mac),
                _ => None,
            };
            PortView {
                link: port.clone(),
                claims,
                mac,
            }
        })
        .collect()
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

    fn port(index: u32, name: &str) -> Link {
        Link {
            index,
            name: name.into(),
            kind: "veth".into(),
            master: BR,
            peer: 2,
            peer_netnsid: Some(index as i32),
            mac: None,
        }
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, 0, last)
    }

    fn wanted(pods: &[(&str, u32, &[u8])]) -> HashMap<Ipv4Addr, Wanted> {
        let mut w = HashMap::new();
        for (name, identity, ips) in pods {
            for last in *ips {
                w.insert(
                    ip(*last),
                    Wanted {
                        key: ("default".into(), (*name).into()),
                        identity: *identity,
                        bridge: BR,
                    },
                );
            }
        }
        w
    }

    /// Ports with what their pods claim (every port read).
    fn views(ports: &[(&Link, &[u8])]) -> Vec<PortView> {
        ports
            .iter()
            .map(|(l, ips)| PortView {
                link: (*l).clone(),
                claims: Some(Ok(ips.iter().map(|i| ip(*i)).collect())),
                mac: Some([2, 0, 0, 0, 0, l.index as u8]),
            })
            .collect()
    }

    fn placed(p: &BridgePlacer, last: u8) -> Option<&str> {
        p.port_of(ip(last)).map(|(l, _)| l.name.as_str())
    }

    #[test]
    fn an_address_claimed_behind_one_port_is_placed_there() {
        let (pa, pb) = (port(10, "va"), port(11, "vb"));
        let w = wanted(&[("a", 1, &[1]), ("b", 2, &[2])]);
        let mut p = BridgePlacer::default();
        let out = p.place(&views(&[(&pa, &[1]), (&pb, &[2, 77])]), &w);
        assert!(out.withheld.is_empty() && out.ignored.is_empty(), "{out:?}");
        assert_eq!((placed(&p, 1), placed(&p, 2)), (Some("va"), Some("vb")));
        // Placed ports of fully placed pods are not read again.
        assert_eq!(
            p.ports_to_read(&[pa, pb, port(12, "vc")], &w),
            vec![false, false, true]
        );
    }

    #[test]
    fn an_address_claimed_behind_two_ports_is_placed_behind_neither() {
        let (pa, px) = (port(10, "va"), port(11, "vx"));
        let w = wanted(&[("a", 1, &[1])]);
        let mut p = BridgePlacer::default();
        let out = p.place(&views(&[(&pa, &[1]), (&px, &[1])]), &w);
        assert_eq!(
            out.withheld.get(&ip(1)),
            Some(&Withheld::Contested(vec!["va".into(), "vx".into()]))
        );
        assert_eq!(placed(&p, 1), None);
        // The liar withdraws while both ports stay: the one left is placed.
        p.place(&views(&[(&pa, &[1]), (&px, &[])]), &w);
        assert_eq!(placed(&p, 1), Some("va"));
    }

    #[test]
    fn a_placement_stands_against_later_claims_and_identity_changes() {
        let (pa, px) = (port(10, "va"), port(11, "vx"));
        let mut p = BridgePlacer::default();
        p.place(&views(&[(&pa, &[1])]), &wanted(&[("a", 1, &[1])]));
        let out = p.place(&views(&[(&pa, &[1]), (&px, &[1])]), &wanted(&[("a", 7, &[1])]));
        assert!(out.withheld.is_empty(), "{out:?}");
        assert_eq!(placed(&p, 1), Some("va"));
    }

    #[test]
    fn a_port_placed_for_one_pod_speaks_for_that_pod_only() {
        // a has a second address not placed yet, so its port is read; it
        // also claims b's, which must neither be placed there nor contest b.
        let (pa, pb) = (port(10, "va"), port(11, "vb"));
        let mut p = BridgePlacer::default();
        p.place(&views(&[(&pa, &[1])]), &wanted(&[("a", 1, &[1])]));
        let w = wanted(&[("a", 1, &[1, 3]), ("b", 2, &[2])]);
        assert_eq!(p.ports_to_read(&[pa.clone(), pb.clone()], &w), vec![true, true]);
        let out = p.place(&views(&[(&pa, &[1, 3, 2]), (&pb, &[2])]), &w);
        assert!(out.withheld.is_empty(), "{out:?}");
        assert_eq!(
            out.ignored,
            vec![("va".to_string(), "claims addresses of other pods than its own")]
        );
        assert_eq!((placed(&p, 3), placed(&p, 2)), (Some("va"), Some("vb")));
    }

    #[test]
    fn a_port_claiming_several_pods_addresses_is_ignored() {
        let (pa, pb, px) = (port(10, "va"), port(11, "vb"), port(12, "vx"));
        let w = wanted(&[("a", 1, &[1]), ("b", 2, &[2])]);
        let mut p = BridgePlacer::default();
        let out = p.place(&views(&[(&px, &[1, 2]), (&pa, &[1]), (&pb, &[2])]), &w);
        assert!(out.withheld.is_empty(), "{out:?}");
        assert_eq!(
            out.ignored,
            vec![("vx".to_string(), "claims addresses of several pods")]
        );
        assert_eq!((placed(&p, 1), placed(&p, 2)), (Some("va"), Some("vb")));
    }

    #[test]
    fn the_claimant_left_over_does_not_inherit_an_address() {
        let (pa, px) = (port(10, "va"), port(11, "vx"));
        let w = wanted(&[("a", 1, &[1])]);
        // Contested, then a's port goes: x is alone, and refused.
        let mut p = BridgePlacer::default();
        p.place(&views(&[(&pa, &[1]), (&px, &[1])]), &w);
        let out = p.place(&views(&[(&px, &[1])]), &w);
        assert_eq!(
            out.withheld.get(&ip(1)),
            Some(&Withheld::Orphaned(vec!["va".into(), "vx".into()]))
        );
        assert_eq!(placed(&p, 1), None);
        // Placed, claimed by x later, then a's port goes: the same.
        let mut p = BridgePlacer::default();
        p.place(&views(&[(&pa, &[1])]), &w);
        p.place(&views(&[(&pa, &[1]), (&px, &[1])]), &w);
        p.place(&views(&[(&px, &[1])]), &w);
        assert_eq!(placed(&p, 1), None);
        // Placed, then its port goes with nobody else claiming: a claim
        // made after that is refused as well.
        let mut p = BridgePlacer::default();
        p.place(&views(&[(&pa, &[1])]), &w);
        p.place(&views(&[(&px, &[])]), &w);
        let out = p.place(&views(&[(&px, &[1])]), &w);
        assert!(
            matches!(out.withheld.get(&ip(1)), Some(Withheld::Orphaned(_))),
            "{out:?}"
        );
        assert_eq!(placed(&p, 1), None);
        // Until the address belongs to another pod (a new record): then it
        // is weighed afresh.
        let pn = port(13, "vn");
        let w2 = wanted(&[("a2", 1, &[1])]);
        let out = p.place(&views(&[(&px, &[]), (&pn, &[1])]), &w2);
        assert!(out.withheld.is_empty(), "{out:?}");
        assert_eq!(placed(&p, 1), Some("vn"));
    }

    #[test]
    fn a_pod_with_another_placed_pods_mac_is_not_placed() {
        let (pa, px) = (port(10, "va"), port(11, "vx"));
        let w = wanted(&[("a", 1, &[1]), ("x", 2, &[2])]);
        let mut p = BridgePlacer::default();
        p.place(&views(&[(&pa, &[1])]), &w);
        // x took a's MAC before it was placed.
        let mut v = views(&[(&pa, &[1]), (&px, &[2])]);
        v[1].mac = v[0].mac;
        let out = p.place(&v, &w);
        assert_eq!(
            out.withheld.get(&ip(2)),
            Some(&Withheld::MacInUse(vec!["va".into()]))
        );
        assert_eq!(placed(&p, 2), None);
        // A MAC that cannot be read: not placed either.
        v[1].mac = None;
        let out = p.place(&v, &w);
        assert_eq!(out.withheld.get(&ip(2)), Some(&Withheld::MacInUse(vec![])));
        // Its own MAC: placed, with it.
        let out = p.place(&views(&[(&pa, &[1]), (&px, &[2])]), &w);
        assert!(out.withheld.is_empty(), "{out:?}");
        assert_eq!(p.port_of(ip(2)).map(|(_, m)| m), Some([2, 0, 0, 0, 0, 11]));
    }

    #[test]
    fn a_restart_takes_over_the_last_agents_placements() {
        let (pa, px) = (port(10, "va"), port(11, "vx"));
        let w = wanted(&[("a", 1, &[1])]);
        let mut p = BridgePlacer::default();
        // A different identity, an unknown port: not taken over.
        let mac = [2, 0, 0, 0, 0, 10];
        p.seed(ip(1), 10, 9, mac, &[pa.clone(), px.clone()], &w);
        p.seed(ip(1), 99, 1, mac, &[pa.clone(), px.clone()], &w);
        assert_eq!(placed(&p, 1), None);
        p.seed(ip(1), 10, 1, mac, &[pa.clone(), px.clone()], &w);
        let out = p.place(&views(&[(&pa, &[1]), (&px, &[1])]), &w);
        assert!(out.withheld.is_empty(), "{out:?}");
        assert_eq!(placed(&p, 1), Some("va"));
    }

    #[test]
    fn a_host_route_to_a_veth_names_the_pod_interface() {
        let routes = parse_routes(ROUTES);
        assert_eq!(interface_for(&routes, Ipv4Addr::new(10, 201, 0, 1)), Some("kwa"));
        assert_eq!(
            interface_for(&routes, Ipv4Addr::new(192, 168, 1, 7)),
            Some("eth0")
        );
        // Reached only through a gateway (the default route): not local.
        assert_eq!(interface_for(&routes, Ipv4Addr::new(8, 8, 8, 8)), None);
        // A route that is not up does not count.
        assert_eq!(interface_for(&routes, Ipv4Addr::new(10, 201, 0, 2)), None);
    }
}
