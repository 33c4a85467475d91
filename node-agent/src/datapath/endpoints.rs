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
//! the node can read by the id the port reports ([`bridge_ports`]).

use std::collections::{BTreeSet, HashMap};
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

/// What [`bridge_ports`] found.
#[derive(Debug, Default)]
pub struct BridgePorts {
    /// Addresses behind exactly one port.
    pub placed: HashMap<Ipv4Addr, Link>,
    /// Addresses claimed behind more than one port, with the ports' names:
    /// not placed at all (see [`bridge_ports`]).
    pub contested: HashMap<Ipv4Addr, Vec<String>>,
    /// Ports whose far end could not be read, and why.
    pub skipped: Vec<(String, std::io::Error)>,
}

/// The bridge ports behind which `wanted` addresses live. `host` is the
/// node namespace's links (the calling thread's); `bridges` are the indexes
/// of the bridges the addresses are routed to. For each veth port of those
/// bridges, the addresses of its peer are read from the peer's namespace
/// (by the namespace id the port reports, without entering it): an address
/// of the peer names the port.
///
/// A pod chooses its own addresses (with CAP_NET_ADMIN in its namespace it
/// can add any), so what it claims is trusted only when nobody else claims
/// it: an address behind two ports is placed behind neither. Placing it
/// behind the wrong one would let that pod send as the other (the source
/// check follows the endpoint). The caller keeps a placement while the port
/// stays and the address keeps its identity, so a claim made after the
/// real pod was placed changes nothing. A pod's address reaches the agent
/// only after its CNI ADD has set it, so a claim made before is contested
/// by the real pod, and refused.
pub fn bridge_ports(host: &[Link], bridges: &BTreeSet<u32>, wanted: &[Ipv4Addr]) -> BridgePorts {
    let mut claims: HashMap<Ipv4Addr, Vec<&Link>> = HashMap::new();
    let mut out = BridgePorts::default();
    for port in host
        .iter()
        .filter(|l| bridges.contains(&l.master) && l.kind == "veth")
    {
        let Some(nsid) = port.peer_netnsid else {
            continue;
        };
        match netlink::ipv4_addresses_in(nsid) {
            Ok(addresses) => {
                for a in addresses.iter().filter(|a| a.index == port.peer) {
                    if let IpAddr::V4(ip) = a.ip
                        && wanted.contains(&ip)
                    {
                        let c = claims.entry(ip).or_default();
                        if !c.iter().any(|p| p.index == port.index) {
                            c.push(port);
                        }
                    }
                }
            }
            Err(e) => out.skipped.push((port.name.clone(), e)),
        }
    }
    for (ip, ports) in claims {
        match ports.as_slice() {
            [one] => {
                out.placed.insert(ip, (*one).clone());
            }
            many => {
                let mut names: Vec<String> = many.iter().map(|p| p.name.clone()).collect();
                names.sort();
                out.contested.insert(ip, names);
            }
        }
    }
    out
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
