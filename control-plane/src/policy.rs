//! KeywayNetworkPolicy (DESIGN.md section 4): the validated model, and its
//! compilation into the per-identity-pair entries the datapath looks up.
//!
//! Pure: no IO, so every rule of the semantics is tested here. Parsing the
//! YAML documents into this model lives in `documents`.
//!
//! The datapath probes, for a packet, the keys (subject, peer, port block,
//! proto), (subject, peer, any port), (subject, any peer, port block, proto)
//! and (subject, any peer, any port) (`keyway_common::policy_probes`); an
//! entry matches when the packet's bit is set (its port within the block, or
//! its protocol in an any-port entry). The packet is allowed when any entry
//! matches, and needs mutual authentication when any matching entry says
//! so: exactly the union the rules give together, so entries never have to
//! be rewritten to carry each other's requirements. A peer whose any-port
//! entry is marked final (the exemptions, and world/remote-node where a
//! `cluster` rule is compiled into the any-peer entries) is never matched
//! by the any-peer entries.
//!
//! Ports are sets of 256-bit blocks, so a port range or a list of ports
//! costs one entry per block it touches, never one per port. What remains
//! (subjects x peers x blocks) is counted before anything is built and held
//! to per-policy and per-namespace budgets: a policy over budget is refused
//! (its endpoints become default-deny in its directions, which only its own
//! namespace can feel) with a reason the status shows.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use keyway_common::{PortBits, identity as reserved, port_block};

use crate::model::policy::{AuthMode, Direction, Entity, Protocol, Rule};
use crate::model::{IdentityRecord, PolicyRecord};

/// Rule text of the entry that allows everything to an endpoint no policy selects.
pub const DEFAULT_ALLOW: &str = "default-allow: no policy selects this endpoint";
/// Rule text of the entries that keep the control plane reachable whatever policy says.
pub const EXEMPT_CONTROL_PLANE: &str = "keyway-exempt: control plane";
/// Rule text of the entries that keep the node (agent, kubelet probes) reachable.
pub const EXEMPT_HOST: &str = "keyway-exempt: host (node agent, kubelet probes)";

/// IP protocol numbers as they appear in policy keys; 0 is any.
pub mod ip_proto {
    pub const ANY: u32 = 0;
    pub const ICMP: u32 = 1;
    pub const ICMPV6: u32 = 58;
    pub const TCP: u32 = 6;
    pub const UDP: u32 = 17;
    pub const SCTP: u32 = 132;
}

/// A compiled policy key: the datapath's {subject, peer (0 any), port block
/// (0: the any-port entry, whose bits are IP protocols), protocol (0 in the
/// any-port entry), direction}.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub subject: u32,
    pub peer: u32,
    pub port_block: u32,
    pub protocol: u32,
    pub direction: u32,
}

/// What one entry allows, and which of that needs mutual authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: PortBits,
    /// A subset of `allowed`.
    pub authenticated: PortBits,
    /// When set, the datapath never looks at the any-peer entries for this
    /// peer (exemptions; world and remote-node beside a `cluster` rule).
    pub final_: bool,
    /// Which rule decided: `<namespace>/<policy> ingress[<i>]`, or one of
    /// the fixed texts for default-allow and the exemptions.
    pub rule: Arc<str>,
}

impl Verdict {
    /// Whether some bit of this entry needs authentication.
    pub fn auth_required(&self) -> bool {
        !self.authenticated.is_empty()
    }
}

/// Entry budgets: what one tenant's policy may cost every replica and every
/// node. Counted before compiling, from the rules' sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Entries one policy may compile to.
    pub per_policy: usize,
    /// Entries the policies of one namespace may compile to together.
    pub per_namespace: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            per_policy: 65_536,
            per_namespace: 262_144,
        }
    }
}

/// Every entry for every subject identity, and the policies refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    by_subject: BTreeMap<u32, BTreeMap<Key, Verdict>>,
    /// `namespace/name` -> why the policy was not compiled (over budget).
    pub refused: BTreeMap<String, String>,
}

impl CompiledPolicy {
    /// The entries whose subject is `subject`, in key order.
    pub fn subject(&self, subject: u32) -> impl Iterator<Item = (&Key, &Verdict)> {
        self.by_subject.get(&subject).into_iter().flatten()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Verdict)> {
        self.by_subject.values().flatten()
    }

    pub fn get(&self, key: &Key) -> Option<&Verdict> {
        self.by_subject.get(&key.subject)?.get(key)
    }

    pub fn len(&self) -> usize {
        self.by_subject.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the datapath decides for a packet (port in host order): the
    /// most specific matching entry's rule, and whether any matching entry
    /// needs authentication; `None` when nothing matches (dropped).
    pub fn decide(
        &self,
        subject: u32,
        peer: u32,
        port: u16,
        proto: u8,
        direction: u32,
    ) -> Option<(Arc<str>, bool)> {
        let dir = direction as u8;
        let mut found: Option<Arc<str>> = None;
        let mut auth = false;
        for (_, k, bit) in keyway_common::policy_probes(subject, peer, port, proto, dir) {
            let key = Key {
                subject,
                peer: k.peer,
                port_block: u32::from(k.port_block),
                protocol: u32::from(k.proto),
                direction,
            };
            let Some(v) = self.get(&key) else { continue };
            if v.allowed.get(bit) {
                found.get_or_insert_with(|| v.rule.clone());
                auth |= v.authenticated.get(bit);
            }
            if v.final_ {
                break;
            }
        }
        found.map(|r| (r, auth))
    }
}

/// Where entries go within one subject and direction: (peer, port block,
/// protocol), with the any-port entry at (peer, 0, 0).
type Slot = (u32, u32, u32);

/// The ports of a rule as entry slots (peer left out): (port block,
/// protocol) -> bits. (0, 0) holds the protocols allowed on every port.
type PortSlots = BTreeMap<(u32, u32), PortBits>;

/// A peer a rule names: one identity, any peer, or every workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Peer {
    Identity(u32),
    Any,
    /// `cluster`: every workload identity. Compiled into the any-peer
    /// entries, with world and remote-node kept out by final entries.
    Cluster,
}

/// A rule with its peers and ports resolved; the same for every subject.
struct ResolvedRule {
    name: Arc<str>,
    auth_required: bool,
    peers: Vec<Peer>,
    ports: PortSlots,
}

impl ResolvedRule {
    /// Entries this rule adds per subject (before merging with others): one
    /// per peer and port slot, and `cluster` adds two final entries. (Beside
    /// a `cluster` rule, any-peer entries are also copied for world and
    /// remote-node: at most three times their count, never a product.)
    fn size(&self) -> usize {
        let slots = self.ports.len().max(1);
        self.peers
            .iter()
            .map(|p| match p {
                Peer::Any | Peer::Identity(_) => slots,
                Peer::Cluster => slots + 2,
            })
            .sum()
    }
}

/// A policy with rules in one direction: whom it selects and what it allows.
struct Selecting {
    subjects: BTreeSet<u32>,
    rules: Vec<ResolvedRule>,
}

fn resolve_peers(rule: &Rule, namespace: &str, identities: &[IdentityRecord]) -> Vec<Peer> {
    if rule.endpoints.is_none() && rule.entities.is_none() {
        // `{}` (or only `authentication`) allows nothing, as in Cilium where
        // `ingress: [{}]` is the default-deny idiom; a rule with only
        // `toPorts` allows those ports from any peer.
        return if rule.ports.is_some() {
            vec![Peer::Any]
        } else {
            Vec::new()
        };
    }
    let mut peers = BTreeSet::new();
    for sel in rule.endpoints.iter().flatten() {
        let scoped = !sel.constrains_namespace();
        peers.extend(
            identities
                .iter()
                .filter(|id| (!scoped || id.namespace == namespace) && sel.matches(id))
                .map(|id| Peer::Identity(id.id)),
        );
    }
    for entity in rule.entities.iter().flatten() {
        peers.insert(match entity {
            Entity::World => Peer::Identity(reserved::WORLD),
            Entity::Host => Peer::Identity(reserved::HOST),
            Entity::RemoteNode => Peer::Identity(reserved::REMOTE_NODE),
            Entity::All => Peer::Any,
            Entity::Cluster => Peer::Cluster,
        });
    }
    peers.into_iter().collect()
}

/// The bits of ports `lo..=hi` (host order) by block.
fn add_range(out: &mut PortSlots, proto: u32, lo: u16, hi: u16) {
    let mut port = lo;
    loop {
        let block = port_block(port);
        let block_end = (block as u32 * 256 - 1).min(u32::from(hi)) as u16;
        out.entry((u32::from(block), proto))
            .or_default()
            .set_range((port & 0xff) as u8, (block_end & 0xff) as u8);
        if block_end >= hi {
            return;
        }
        port = block_end + 1;
    }
}

fn resolve_ports(rule: &Rule) -> PortSlots {
    let mut out = PortSlots::new();
    let Some(ports) = &rule.ports else {
        out.insert((0, 0), PortBits::ALL);
        return out;
    };
    for pp in ports {
        let (lo, hi) = (pp.port, pp.end_port.unwrap_or(pp.port).max(pp.port));
        let protos: &[u32] = match pp.protocol {
            Protocol::Any if lo == 0 => {
                out.insert((0, 0), PortBits::ALL);
                continue;
            }
            Protocol::Any => &[ip_proto::TCP, ip_proto::UDP],
            Protocol::Tcp => &[ip_proto::TCP],
            Protocol::Udp => &[ip_proto::UDP],
            Protocol::Sctp => &[ip_proto::SCTP],
            // ICMP has no ports: every packet of it, in either family (a
            // dual-stack pod's ping6 is ICMPv6).
            Protocol::Icmp => &[ip_proto::ICMP, ip_proto::ICMPV6],
        };
        for &proto in protos {
            if lo == 0 || pp.protocol == Protocol::Icmp {
                out.entry((0, 0)).or_default().set(proto as u8);
            } else {
                add_range(&mut out, proto, lo, hi);
            }
        }
    }
    out
}

/// Allows `bits` at `slot`; when several rules give the same slot, the first
/// rule's name stays and the bits and requirements add up.
fn merge(slots: &mut BTreeMap<Slot, Verdict>, slot: Slot, bits: PortBits, auth: bool, rule: &Arc<str>) {
    let v = slots.entry(slot).or_insert_with(|| Verdict {
        allowed: PortBits::NONE,
        authenticated: PortBits::NONE,
        final_: false,
        rule: rule.clone(),
    });
    v.allowed = v.allowed.or(bits);
    if auth {
        v.authenticated = v.authenticated.or(bits);
    }
}

/// What a policy costs, from its rules' sizes: entries per subject summed
/// over its rules, times its subjects.
fn cost(selecting: &[(Direction, &Selecting)]) -> usize {
    selecting
        .iter()
        .map(|(_, s)| {
            s.subjects
                .len()
                .saturating_mul(s.rules.iter().map(ResolvedRule::size).sum::<usize>())
        })
        .fold(0usize, usize::saturating_add)
}

/// The policies `compile` would refuse, and why, without building anything
/// (what `apply` checks before it stores a document).
pub fn refusals(
    identities: &[IdentityRecord],
    policies: &[PolicyRecord],
    budget: Budget,
) -> BTreeMap<String, String> {
    plan(identities, policies, budget).1
}

type Plan = (BTreeMap<Direction, Vec<Selecting>>, BTreeMap<String, String>);

/// Resolves every policy and holds it to the budgets: per direction, whom
/// each selects and its rules (none for a refused one), and the refusals.
fn plan(identities: &[IdentityRecord], policies: &[PolicyRecord], budget: Budget) -> Plan {
    let mut policies: Vec<&PolicyRecord> = policies.iter().collect();
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    // Each policy resolved per direction, then held to the budgets.
    let mut resolved: Vec<(&PolicyRecord, Vec<(Direction, Selecting)>)> = Vec::new();
    for p in &policies {
        let mut dirs = Vec::new();
        for direction in Direction::BOTH {
            let Some(rules) = p.spec.rules(direction) else {
                continue;
            };
            let subjects: BTreeSet<u32> = identities
                .iter()
                .filter(|id| id.namespace == p.namespace && p.spec.endpoint_selector.matches(id))
                .map(|id| id.id)
                .collect();
            if subjects.is_empty() {
                continue;
            }
            let rules = rules
                .iter()
                .enumerate()
                .map(|(i, rule)| ResolvedRule {
                    name: Arc::from(format!("{}/{} {}[{i}]", p.namespace, p.name, direction.name())),
                    auth_required: rule.authentication == AuthMode::Required,
                    peers: resolve_peers(rule, &p.namespace, identities),
                    ports: resolve_ports(rule),
                })
                .collect();
            dirs.push((direction, Selecting { subjects, rules }));
        }
        resolved.push((p, dirs));
    }
    let mut refused = BTreeMap::new();
    let mut namespace_cost: BTreeMap<&str, usize> = BTreeMap::new();
    let mut selecting: BTreeMap<Direction, Vec<Selecting>> = BTreeMap::new();
    for (p, dirs) in resolved {
        let refs: Vec<(Direction, &Selecting)> = dirs.iter().map(|(d, s)| (*d, s)).collect();
        let c = cost(&refs);
        let spent = namespace_cost.entry(p.namespace.as_str()).or_insert(0);
        let refusal = if c > budget.per_policy {
            Some(format!(
                "compiles to about {c} datapath entries (subjects x peers x 256-port blocks), over the \
                 per-policy budget of {}; select fewer endpoints or peers, or group ports into ranges",
                budget.per_policy
            ))
        } else if spent.saturating_add(c) > budget.per_namespace {
            Some(format!(
                "with the policies before it (by name) namespace {} would compile to about {} datapath \
                 entries, over the per-namespace budget of {}; this policy alone is {c}",
                p.namespace,
                spent.saturating_add(c),
                budget.per_namespace
            ))
        } else {
            None
        };
        match refusal {
            Some(why) => {
                // Refused, not ignored: its endpoints stay selected in its
                // directions with nothing allowed (fail closed, and only in
                // its own namespace).
                for (direction, s) in dirs {
                    selecting.entry(direction).or_default().push(Selecting {
                        subjects: s.subjects,
                        rules: Vec::new(),
                    });
                }
                refused.insert(format!("{}/{}", p.namespace, p.name), why);
            }
            None => {
                *spent += c;
                for (direction, s) in dirs {
                    selecting.entry(direction).or_default().push(s);
                }
            }
        }
    }
    (selecting, refused)
}

/// Compiles `policies` for `identities` (the identities in use; peers are
/// resolved among them too), within `budget`. Deterministic: policies are
/// taken in namespace/name order, rules in order.
pub fn compile(identities: &[IdentityRecord], policies: &[PolicyRecord], budget: Budget) -> CompiledPolicy {
    let (selecting, refused) = plan(identities, policies, budget);
    let mut out = CompiledPolicy {
        refused,
        ..Default::default()
    };

    let exempt = |rule: &str| Verdict {
        allowed: PortBits::ALL,
        authenticated: PortBits::NONE,
        final_: true,
        rule: Arc::from(rule),
    };
    let (exempt_cp, exempt_host, default_allow) = (
        exempt(EXEMPT_CONTROL_PLANE),
        exempt(EXEMPT_HOST),
        Verdict {
            final_: false,
            ..exempt(DEFAULT_ALLOW)
        },
    );
    for id in identities {
        let entries = out.by_subject.entry(id.id).or_default();
        for direction in Direction::BOTH {
            let mut slots: BTreeMap<Slot, Verdict> = BTreeMap::new();
            // What the true any-peer rules allow, apart from `cluster`.
            let mut any_peer: BTreeMap<Slot, Verdict> = BTreeMap::new();
            let mut has_cluster = false;
            let mut selected = false;
            for policy in selecting.get(&direction).into_iter().flatten() {
                if !policy.subjects.contains(&id.id) {
                    continue;
                }
                selected = true;
                for rule in &policy.rules {
                    for &peer in &rule.peers {
                        let peer_id = match peer {
                            Peer::Identity(i) => i,
                            Peer::Any | Peer::Cluster => reserved::UNKNOWN,
                        };
                        has_cluster |= peer == Peer::Cluster;
                        for (&(block, proto), &bits) in &rule.ports {
                            merge(
                                &mut slots,
                                (peer_id, block, proto),
                                bits,
                                rule.auth_required,
                                &rule.name,
                            );
                            if peer == Peer::Any {
                                merge(
                                    &mut any_peer,
                                    (0, block, proto),
                                    bits,
                                    rule.auth_required,
                                    &rule.name,
                                );
                            }
                        }
                    }
                }
            }
            if !selected {
                slots.insert((0, 0, 0), default_allow.clone());
            }
            if has_cluster {
                // `cluster` went into the any-peer entries; world and
                // remote-node are not workloads, so their own entries (plus
                // what the true any-peer rules allow) are final for them.
                for r in [reserved::WORLD, reserved::REMOTE_NODE] {
                    for (&(_, block, proto), v) in &any_peer {
                        merge(&mut slots, (r, block, proto), v.allowed, false, &v.rule);
                        let s = slots.get_mut(&(r, block, proto)).expect("merged above");
                        s.authenticated = s.authenticated.or(v.authenticated);
                    }
                    slots
                        .entry((r, 0, 0))
                        .or_insert_with(|| Verdict {
                            allowed: PortBits::NONE,
                            authenticated: PortBits::NONE,
                            final_: false,
                            rule: Arc::from(CLUSTER_EXCLUDES),
                        })
                        .final_ = true;
                }
            }
            // Policy can neither cut off nor demand authentication from the
            // control plane and the node itself.
            slots.retain(|(peer, _, _), _| *peer != reserved::HOST && *peer != reserved::CONTROL_PLANE);
            slots.insert((reserved::CONTROL_PLANE, 0, 0), exempt_cp.clone());
            slots.insert((reserved::HOST, 0, 0), exempt_host.clone());
            for ((peer, port_block, protocol), verdict) in slots {
                entries.insert(
                    Key {
                        subject: id.id,
                        peer,
                        port_block,
                        protocol,
                        direction: direction.number(),
                    },
                    verdict,
                );
            }
        }
    }
    out
}

/// Rule text of the final entries that keep world and remote-node out of a
/// `cluster` rule compiled into the any-peer entries.
pub const CLUSTER_EXCLUDES: &str = "keyway: cluster means workloads (not world or remote-node)";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::{
        NAMESPACE_LABEL, Operator, PolicySpec, PortProtocol, Requirement, SERVICE_ACCOUNT_LABEL, Selector,
    };

    const IN: u32 = 0;
    const EG: u32 = 1;
    const TCP: u8 = 6;
    const UDP: u8 = 17;

    fn compile(identities: &[IdentityRecord], policies: &[PolicyRecord]) -> CompiledPolicy {
        super::compile(identities, policies, Budget::default())
    }

    fn ident(id: u32, ns: &str, sa: &str, labels: &[(&str, &str)]) -> IdentityRecord {
        IdentityRecord {
            id,
            spiffe_id: format!("spiffe://td/ns/{ns}/sa/{sa}"),
            namespace: ns.into(),
            service_account: sa.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn app(app: &str) -> Selector {
        Selector {
            match_labels: BTreeMap::from([("app".into(), app.into())]),
            ..Default::default()
        }
    }

    fn tcp(port: u16) -> PortProtocol {
        PortProtocol::single(port, Protocol::Tcp)
    }

    fn range(port: u16, end: u16, protocol: Protocol) -> PortProtocol {
        PortProtocol {
            port,
            end_port: Some(end),
            protocol,
        }
    }

    fn policy(ns: &str, name: &str, spec: PolicySpec) -> PolicyRecord {
        PolicyRecord {
            namespace: ns.into(),
            name: name.into(),
            spec,
        }
    }

    fn from(sel: Selector, ports: Option<Vec<PortProtocol>>, auth: AuthMode) -> Rule {
        Rule {
            authentication: auth,
            endpoints: Some(vec![sel]),
            entities: None,
            ports,
        }
    }

    fn ingress(rules: Vec<Rule>) -> PolicySpec {
        PolicySpec {
            endpoint_selector: app("api"),
            ingress: Some(rules),
            egress: None,
        }
    }

    /// The datapath's answer: `None` dropped, `Some(auth)` allowed.
    fn decide(c: &CompiledPolicy, s: u32, peer: u32, port: u16, proto: u8, dir: u32) -> Option<bool> {
        c.decide(s, peer, port, proto, dir).map(|(_, auth)| auth)
    }

    fn rule_of(c: &CompiledPolicy, s: u32, peer: u32, port: u16, proto: u8, dir: u32) -> String {
        c.decide(s, peer, port, proto, dir)
            .map(|(r, _)| r.to_string())
            .unwrap_or_default()
    }

    /// (peer, port block, protocol) of the entries of one subject and direction.
    fn keys(c: &CompiledPolicy, subject: u32, direction: u32) -> Vec<(u32, u32, u32)> {
        c.subject(subject)
            .filter(|(k, _)| k.direction == direction)
            .map(|(k, _)| (k.peer, k.port_block, k.protocol))
            .collect()
    }

    fn ids() -> Vec<IdentityRecord> {
        vec![
            ident(256, "default", "frontend", &[("app", "frontend")]),
            ident(257, "default", "api", &[("app", "api")]),
            ident(258, "other", "frontend", &[("app", "frontend")]),
            ident(259, "default", "intruder", &[("app", "other")]),
        ]
    }

    /// The policy of DESIGN.md section 4.
    fn api_mtls(auth: AuthMode) -> PolicyRecord {
        policy(
            "default",
            "api-mtls",
            ingress(vec![from(app("frontend"), Some(vec![tcp(8080)]), auth)]),
        )
    }

    #[test]
    fn no_policy_allows_everything_plus_exemptions() {
        let c = compile(&ids(), &[]);
        for dir in [IN, EG] {
            assert_eq!(keys(&c, 256, dir), vec![(0, 0, 0), (1, 0, 0), (4, 0, 0)]);
            for peer in [259, 2, 3] {
                assert_eq!(decide(&c, 256, peer, 443, TCP, dir), Some(false));
                assert_eq!(decide(&c, 256, peer, 0, 1, dir), Some(false), "ICMP");
            }
        }
        assert_eq!(rule_of(&c, 256, 259, 80, TCP, IN), DEFAULT_ALLOW);
        assert_eq!(rule_of(&c, 256, 4, 80, TCP, EG), EXEMPT_CONTROL_PLANE);
        assert_eq!(rule_of(&c, 256, 1, 80, TCP, EG), EXEMPT_HOST);
        assert_eq!(c.len(), 4 * 6);
    }

    #[test]
    fn a_selected_endpoint_is_default_deny_in_that_direction_only() {
        let c = compile(&ids(), &[api_mtls(AuthMode::Required)]);
        // api ingress: only frontend (same namespace) on 8080/TCP, with auth.
        assert_eq!(keys(&c, 257, IN), vec![(1, 0, 0), (4, 0, 0), (256, 32, 6)]);
        assert_eq!(decide(&c, 257, 256, 8080, TCP, IN), Some(true));
        assert_eq!(
            rule_of(&c, 257, 256, 8080, TCP, IN),
            "default/api-mtls ingress[0]"
        );
        // Egress is not selected: default allow.
        assert_eq!(keys(&c, 257, EG), vec![(0, 0, 0), (1, 0, 0), (4, 0, 0)]);
        // Others are untouched.
        assert_eq!(decide(&c, 256, 259, 1, TCP, IN), Some(false));
        // The datapath's view: intruder denied, frontend on another port or
        // protocol denied, the control plane exempt.
        assert_eq!(decide(&c, 257, 259, 8080, TCP, IN), None);
        assert_eq!(decide(&c, 257, 256, 8081, TCP, IN), None);
        assert_eq!(decide(&c, 257, 256, 8080, UDP, IN), None);
        assert_eq!(decide(&c, 257, 4, 8080, TCP, IN), Some(false));
        assert_eq!(decide(&c, 257, 1, 8080, TCP, IN), Some(false));
    }

    #[test]
    fn an_empty_ingress_list_selects_and_denies() {
        let p = policy(
            "default",
            "deny",
            PolicySpec {
                endpoint_selector: Selector::default(),
                ingress: Some(vec![]),
                egress: None,
            },
        );
        let c = compile(&ids(), &[p]);
        for id in [256, 257, 259] {
            assert_eq!(keys(&c, id, IN), vec![(1, 0, 0), (4, 0, 0)]);
            assert_eq!(keys(&c, id, EG)[0], (0, 0, 0));
        }
        // Another namespace's endpoint is not selected by a policy in default.
        assert_eq!(keys(&c, 258, IN)[0], (0, 0, 0));
    }

    #[test]
    fn an_empty_rule_allows_nothing_and_ports_alone_allow_any_peer() {
        let c = compile(&ids(), &[policy("default", "p", ingress(vec![Rule::default()]))]);
        assert_eq!(keys(&c, 257, IN), vec![(1, 0, 0), (4, 0, 0)]);
        let ports_only = Rule {
            ports: Some(vec![tcp(80)]),
            ..Default::default()
        };
        let c = compile(&ids(), &[policy("default", "p", ingress(vec![ports_only]))]);
        assert_eq!(keys(&c, 257, IN), vec![(0, 1, 6), (1, 0, 0), (4, 0, 0)]);
        assert_eq!(decide(&c, 257, 259, 80, TCP, IN), Some(false));
        assert_eq!(decide(&c, 257, 2, 80, TCP, IN), Some(false), "world too");
        assert_eq!(decide(&c, 257, 259, 81, TCP, IN), None);
        let peers_only = from(app("frontend"), None, AuthMode::Disabled);
        let c = compile(&ids(), &[policy("default", "p", ingress(vec![peers_only]))]);
        assert_eq!(keys(&c, 257, IN), vec![(1, 0, 0), (4, 0, 0), (256, 0, 0)]);
        assert_eq!(decide(&c, 257, 256, 65535, UDP, IN), Some(false));
        assert_eq!(decide(&c, 257, 256, 0, 47, IN), Some(false), "any protocol");
    }

    #[test]
    fn peers_are_scoped_to_the_policy_namespace_unless_the_selector_names_one() {
        let mut other_ns = app("frontend");
        other_ns
            .match_labels
            .insert(NAMESPACE_LABEL.into(), "other".into());
        let any_ns = Selector {
            match_labels: BTreeMap::from([("app".into(), "frontend".into())]),
            match_expressions: vec![Requirement {
                key: NAMESPACE_LABEL.into(),
                operator: Operator::Exists,
                values: vec![],
            }],
        };
        let peers = |sel: Selector| {
            let p = policy("default", "p", ingress(vec![from(sel, None, AuthMode::Disabled)]));
            let c = compile(&ids(), &[p]);
            keys(&c, 257, IN)
                .into_iter()
                .map(|e| e.0)
                .filter(|p| *p >= 256)
                .collect::<Vec<_>>()
        };
        assert_eq!(peers(app("frontend")), vec![256]);
        assert_eq!(peers(other_ns), vec![258]);
        assert_eq!(peers(any_ns), vec![256, 258]);
    }

    #[test]
    fn pseudo_labels_and_expressions_select() {
        let sa = Selector {
            match_labels: BTreeMap::from([(SERVICE_ACCOUNT_LABEL.into(), "intruder".into())]),
            ..Default::default()
        };
        let not_frontend = Selector {
            match_expressions: vec![Requirement {
                key: "app".into(),
                operator: Operator::NotIn,
                values: vec!["frontend".into()],
            }],
            ..Default::default()
        };
        let no_app = Selector {
            match_expressions: vec![Requirement {
                key: "app".into(),
                operator: Operator::DoesNotExist,
                values: vec![],
            }],
            ..Default::default()
        };
        let in_set = Selector {
            match_expressions: vec![Requirement {
                key: "app".into(),
                operator: Operator::In,
                values: vec!["api".into(), "other".into()],
            }],
            ..Default::default()
        };
        let all = ids();
        let pick = |s: &Selector| {
            all.iter()
                .filter(|i| s.matches(i))
                .map(|i| i.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(pick(&sa), vec![259]);
        assert_eq!(pick(&not_frontend), vec![257, 259]);
        assert_eq!(pick(&no_app), Vec::<u32>::new());
        assert_eq!(pick(&in_set), vec![257, 259]);
        assert_eq!(pick(&Selector::default()), vec![256, 257, 258, 259]);
        // An endpointSelector naming another namespace selects nothing: the
        // policy's own namespace always applies to its subjects.
        let p = policy(
            "default",
            "p",
            PolicySpec {
                endpoint_selector: Selector {
                    match_labels: BTreeMap::from([(NAMESPACE_LABEL.into(), "other".into())]),
                    ..Default::default()
                },
                ingress: Some(vec![]),
                egress: None,
            },
        );
        let c = compile(&all, &[p]);
        assert_eq!(keys(&c, 258, IN)[0], (0, 0, 0));
    }

    #[test]
    fn any_protocol_means_tcp_and_udp_and_icmp_has_no_port() {
        let p = policy(
            "default",
            "p",
            PolicySpec {
                endpoint_selector: app("api"),
                ingress: None,
                egress: Some(vec![Rule {
                    ports: Some(vec![
                        PortProtocol::single(53, Protocol::Any),
                        PortProtocol::single(0, Protocol::Icmp),
                        PortProtocol::single(9000, Protocol::Sctp),
                        PortProtocol::single(0, Protocol::Udp),
                    ]),
                    ..Default::default()
                }]),
            },
        );
        let c = compile(&ids(), &[p]);
        assert_eq!(
            keys(&c, 257, EG),
            vec![
                (0, 0, 0),
                (0, 1, 6),
                (0, 1, 17),
                (0, 36, 132),
                (1, 0, 0),
                (4, 0, 0)
            ]
        );
        assert_eq!(decide(&c, 257, 259, 53, TCP, EG), Some(false));
        assert_eq!(decide(&c, 257, 259, 53, UDP, EG), Some(false));
        assert_eq!(decide(&c, 257, 259, 0, 1, EG), Some(false), "ICMP");
        assert_eq!(decide(&c, 257, 259, 0, 58, EG), Some(false), "ICMPv6");
        assert_eq!(decide(&c, 257, 259, 9000, 132, EG), Some(false));
        assert_eq!(
            decide(&c, 257, 259, 40000, UDP, EG),
            Some(false),
            "port 0: every UDP port"
        );
        assert_eq!(decide(&c, 257, 259, 40000, TCP, EG), None);
        assert_eq!(decide(&c, 257, 259, 54, TCP, EG), None);
    }

    #[test]
    fn port_ranges_cost_one_entry_per_256_port_block() {
        // 1000-2999 spans blocks 4..=12: nine entries for 2000 ports.
        let p = policy(
            "default",
            "p",
            ingress(vec![from(
                app("frontend"),
                Some(vec![range(1000, 2999, Protocol::Tcp)]),
                AuthMode::Required,
            )]),
        );
        let c = compile(&ids(), &[p]);
        let k = keys(&c, 257, IN);
        assert_eq!(k.iter().filter(|(peer, ..)| *peer == 256).count(), 9, "{k:?}");
        for port in [1000, 1001, 1500, 2047, 2048, 2999] {
            assert_eq!(decide(&c, 257, 256, port, TCP, IN), Some(true), "{port}");
        }
        for port in [999, 3000, 80] {
            assert_eq!(decide(&c, 257, 256, port, TCP, IN), None, "{port}");
        }
        // The whole port space is 256 entries, not 65535.
        let p = policy(
            "default",
            "p",
            ingress(vec![from(
                app("frontend"),
                Some(vec![range(1, 65535, Protocol::Udp)]),
                AuthMode::Disabled,
            )]),
        );
        let c = compile(&ids(), &[p]);
        assert_eq!(keys(&c, 257, IN).len(), 256 + 2);
        assert_eq!(decide(&c, 257, 256, 65535, UDP, IN), Some(false));
        assert_eq!(decide(&c, 257, 256, 1, UDP, IN), Some(false));
    }

    #[test]
    fn overlapping_rules_merge_and_authentication_wins() {
        // Two policies allow frontend on 8080; only the second wants auth.
        let plain = policy(
            "default",
            "a-plain",
            ingress(vec![from(
                app("frontend"),
                Some(vec![tcp(8080)]),
                AuthMode::Disabled,
            )]),
        );
        let c = compile(&ids(), &[api_mtls(AuthMode::Required), plain.clone()]);
        assert_eq!(decide(&c, 257, 256, 8080, TCP, IN), Some(true));
        assert_eq!(
            rule_of(&c, 257, 256, 8080, TCP, IN),
            "default/a-plain ingress[0]",
            "first policy by name keeps its rule name"
        );
    }

    #[test]
    fn a_general_authenticated_rule_covers_the_specific_ones() {
        // Frontend without auth on 8080, and anyone on 8080 with auth: auth.
        let any_peer_auth = Rule {
            authentication: AuthMode::Required,
            ports: Some(vec![tcp(8080)]),
            ..Default::default()
        };
        let c = compile(
            &ids(),
            &[policy(
                "default",
                "p",
                ingress(vec![
                    from(app("frontend"), Some(vec![tcp(8080)]), AuthMode::Disabled),
                    any_peer_auth.clone(),
                ]),
            )],
        );
        assert_eq!(decide(&c, 257, 256, 8080, TCP, IN), Some(true));
        // Frontend on every port without auth, anyone on 8080 with auth:
        // the overlap needs auth, the rest of frontend's ports do not.
        let c = compile(
            &ids(),
            &[policy(
                "default",
                "p",
                ingress(vec![
                    from(app("frontend"), None, AuthMode::Disabled),
                    any_peer_auth,
                ]),
            )],
        );
        assert_eq!(decide(&c, 257, 256, 8080, TCP, IN), Some(true));
        assert_eq!(decide(&c, 257, 256, 9999, TCP, IN), Some(false));
        assert_eq!(decide(&c, 257, 259, 8080, TCP, IN), Some(true));
        assert_eq!(decide(&c, 257, 259, 9999, TCP, IN), None);
        // No entry had to be added for the overlap: the datapath ORs what
        // every matching entry requires.
        assert_eq!(
            keys(&c, 257, IN),
            vec![(0, 32, 6), (1, 0, 0), (4, 0, 0), (256, 0, 0)]
        );
        // Frontend on every port with auth, frontend on 8080 without: auth.
        let c = compile(
            &ids(),
            &[policy(
                "default",
                "p",
                ingress(vec![
                    from(app("frontend"), None, AuthMode::Required),
                    from(app("frontend"), Some(vec![tcp(8080)]), AuthMode::Disabled),
                ]),
            )],
        );
        assert_eq!(decide(&c, 257, 256, 8080, TCP, IN), Some(true));
    }

    /// Brute force: for every combination of up to three rules (peers,
    /// single ports, ranges, every port of a protocol, any port), the
    /// datapath's answer equals the union of the rules.
    #[test]
    fn the_datapath_answer_is_always_the_union_of_the_rules() {
        let peers = [None, Some(app("frontend")), Some(app("other"))];
        let ports = [
            None,
            Some(vec![tcp(80)]),
            Some(vec![tcp(8080)]),
            Some(vec![range(70, 300, Protocol::Tcp)]),
            Some(vec![PortProtocol::single(0, Protocol::Tcp)]),
        ];
        let mut rules = Vec::new();
        for p in &peers {
            for pp in &ports {
                for auth in [AuthMode::Disabled, AuthMode::Required] {
                    rules.push(Rule {
                        authentication: auth,
                        endpoints: p.clone().map(|s| vec![s]),
                        entities: None,
                        ports: pp.clone(),
                    });
                }
            }
        }
        let covers_port = |r: &Rule, port: u16, proto: u8| match &r.ports {
            None => true,
            Some(v) => v.iter().any(|pp| {
                let proto_ok = matches!((pp.protocol, proto), (Protocol::Tcp, 6) | (Protocol::Udp, 17));
                let end = pp.end_port.unwrap_or(pp.port);
                proto_ok && (pp.port == 0 || (pp.port..=end).contains(&port))
            }),
        };
        let n = rules.len();
        for a in 0..n {
            for b in a..n {
                for c in b..n {
                    let set = vec![rules[a].clone(), rules[b].clone(), rules[c].clone()];
                    let compiled = compile(&ids(), &[policy("default", "p", ingress(set.clone()))]);
                    for peer in [256, 259, 258] {
                        for (port, proto) in [(80, 6), (8080, 6), (443, 6), (300, 6), (80, 17)] {
                            let covering: Vec<&Rule> = set
                                .iter()
                                .filter(|r| {
                                    let peer_ok = match &r.endpoints {
                                        None => r.ports.is_some(),
                                        Some(s) => {
                                            s.iter().any(|s| s.matches(&ids()[(peer - 256) as usize]))
                                                && peer != 258
                                        }
                                    };
                                    peer_ok && covers_port(r, port, proto)
                                })
                                .collect();
                            let want = (!covering.is_empty())
                                .then(|| covering.iter().any(|r| r.authentication == AuthMode::Required));
                            let got = decide(&compiled, 257, peer, port, proto, IN);
                            assert_eq!(got, want, "rules {set:?}, peer {peer}, port {port}/{proto}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn entities_and_exemptions() {
        let p = policy(
            "default",
            "p",
            PolicySpec {
                endpoint_selector: app("api"),
                ingress: Some(vec![Rule {
                    authentication: AuthMode::Required,
                    entities: Some(vec![Entity::World, Entity::Host, Entity::RemoteNode]),
                    ..Default::default()
                }]),
                egress: Some(vec![Rule {
                    entities: Some(vec![Entity::Cluster]),
                    ports: Some(vec![tcp(443)]),
                    ..Default::default()
                }]),
            },
        );
        let c = compile(&ids(), &[p]);
        // The host stays exempt (no auth demanded of it); world and
        // remote-node are ordinary peers.
        assert_eq!(
            keys(&c, 257, IN),
            vec![(1, 0, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0)]
        );
        assert_eq!(decide(&c, 257, 2, 443, TCP, IN), Some(true));
        assert_eq!(decide(&c, 257, 1, 443, TCP, IN), Some(false));
        assert_eq!(rule_of(&c, 257, 1, 443, TCP, IN), EXEMPT_HOST);
        // cluster = every workload identity, in every namespace: one
        // any-peer entry, with world and remote-node kept out.
        assert_eq!(
            keys(&c, 257, EG),
            vec![(0, 2, 6), (1, 0, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0)]
        );
        for peer in [256, 257, 258, 259, 100_000] {
            assert_eq!(decide(&c, 257, peer, 443, TCP, EG), Some(false), "{peer}");
        }
        assert_eq!(decide(&c, 257, 2, 443, TCP, EG), None, "world is not the cluster");
        assert_eq!(
            decide(&c, 257, 3, 443, TCP, EG),
            None,
            "remote-node is not the cluster"
        );
        assert_eq!(decide(&c, 257, 256, 80, TCP, EG), None);
        // Beside a true any-peer rule, world keeps what that rule allows.
        let p = policy(
            "default",
            "p",
            PolicySpec {
                endpoint_selector: app("api"),
                ingress: None,
                egress: Some(vec![
                    Rule {
                        entities: Some(vec![Entity::Cluster]),
                        ..Default::default()
                    },
                    Rule {
                        authentication: AuthMode::Required,
                        ports: Some(vec![tcp(53)]),
                        ..Default::default()
                    },
                ]),
            },
        );
        let c = compile(&ids(), &[p]);
        assert_eq!(decide(&c, 257, 2, 53, TCP, EG), Some(true));
        assert_eq!(decide(&c, 257, 2, 54, TCP, EG), None);
        assert_eq!(decide(&c, 257, 259, 54, TCP, EG), Some(false));
        assert_eq!(decide(&c, 257, 259, 53, TCP, EG), Some(true));
    }

    /// The audit's policy: 400 ports to `fromEntities: [cluster]`, across
    /// 100 workloads. Contiguous ports compile into a handful of entries per
    /// subject; 400 ports spread over the whole port space still compile to
    /// one any-peer entry per block; a selector that enumerates every
    /// identity (not the entity) is what the budget refuses, and then only
    /// that policy's endpoints are affected.
    #[test]
    fn the_400_port_cluster_policy_compiles_compactly_or_is_refused_within_its_namespace() {
        let mut identities: Vec<IdentityRecord> = (0..100)
            .map(|i| ident(1000 + i, "tenant", &format!("w{i}"), &[("app", "api")]))
            .collect();
        identities.push(ident(2000, "default", "bystander", &[("app", "api")]));
        let spread: Vec<PortProtocol> = (0..400).map(|i| tcp(100 + i * 160)).collect();
        let cluster_rule = |ports: Vec<PortProtocol>| Rule {
            entities: Some(vec![Entity::Cluster]),
            ports: Some(ports),
            ..Default::default()
        };
        let p = policy("tenant", "big", ingress(vec![cluster_rule(spread.clone())]));
        let c = compile(&identities, &[p]);
        assert!(c.refused.is_empty());
        // 400 ports land in 251 blocks: that many entries per subject, not
        // 100 peers x 400 ports.
        assert!(c.len() < 101 * 2 * 300, "{} entries", c.len());
        assert_eq!(decide(&c, 1000, 1050, 100 + 7 * 160, TCP, IN), Some(false));
        assert_eq!(decide(&c, 1000, 1050, 101, TCP, IN), None);
        // The same ports to every identity named one by one: 100 x 100 x 251
        // entries, over the per-policy budget: refused, and its endpoints
        // default-deny while the other namespace is untouched.
        let everyone = Selector {
            match_expressions: vec![Requirement {
                key: NAMESPACE_LABEL.into(),
                operator: Operator::Exists,
                values: vec![],
            }],
            ..Default::default()
        };
        let p = policy(
            "tenant",
            "big",
            ingress(vec![from(everyone, Some(spread), AuthMode::Disabled)]),
        );
        let c = compile(&identities, &[p]);
        let why = c.refused.get("tenant/big").expect("refused");
        assert!(why.contains("per-policy budget of 65536"), "{why}");
        assert!(c.len() < 1000, "nothing of it was built: {} entries", c.len());
        assert_eq!(
            decide(&c, 1000, 1050, 100, TCP, IN),
            None,
            "refused: default-deny"
        );
        assert_eq!(
            decide(&c, 1000, 1, 100, TCP, IN),
            Some(false),
            "the host stays exempt"
        );
        assert_eq!(
            decide(&c, 2000, 1050, 100, TCP, IN),
            Some(false),
            "another namespace is untouched"
        );
    }

    #[test]
    fn a_namespace_has_a_budget_across_its_policies() {
        let identities: Vec<IdentityRecord> = (0..10)
            .map(|i| ident(1000 + i, "tenant", &format!("w{i}"), &[("app", "api")]))
            .collect();
        let p = |name: &str| {
            policy(
                "tenant",
                name,
                ingress(vec![Rule {
                    ports: Some(vec![range(1, 65535, Protocol::Tcp)]),
                    ..Default::default()
                }]),
            )
        };
        // 10 subjects x 256 blocks = 2560 each; the third goes over 6000.
        let budget = Budget {
            per_policy: 3000,
            per_namespace: 6000,
        };
        let c = super::compile(&identities, &[p("a"), p("b"), p("c")], budget);
        assert_eq!(c.refused.keys().collect::<Vec<_>>(), vec!["tenant/c"]);
        assert!(c.refused["tenant/c"].contains("per-namespace budget of 6000"));
    }
}
