//! What the kernel tables should hold, computed from the node's Sync state
//! (pure, so it is tested without a kernel), and the changes between two
//! such views.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use keyway_common::{
    IpcacheValue, Ipv6Key, PolicyKey, PolicyValue, PortBits, absent_bit, namer_bit, policy_flags, probe_index,
};

use crate::state::NodeState;

/// A stable number for a policy rule's name: flow events and `explain`
/// carry the number, the agent maps it back. A hash, so it survives agent
/// restarts without a table in the kernel; 0 means "no rule".
pub fn rule_id(rule: &str) -> u32 {
    // FNV-1a, 32 bit.
    let mut h: u32 = 0x811c_9dc5;
    for b in rule.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

/// An IPv4 address as the datapath keys it: the packet's bytes, in memory order.
pub fn ip_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The address back from a datapath key.
pub fn ip_from_key(key: u32) -> Ipv4Addr {
    Ipv4Addr::from(key.to_ne_bytes())
}

/// An IPv6 address as the datapath keys it: the packet's 16 bytes.
pub fn ip6_key(ip: Ipv6Addr) -> Ipv6Key {
    Ipv6Key { addr: ip.octets() }
}

/// The kernel's view of ipcache and policy for one NodeState.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Tables {
    /// /32 entries, by [`ip_key`].
    pub ipcache: HashMap<u32, IpcacheValue>,
    /// Wider prefixes: (prefix length, masked [`ip_key`]).
    pub lpm: HashMap<(u32, u32), IpcacheValue>,
    /// /128 entries, by [`ip6_key`].
    pub ipcache6: HashMap<Ipv6Key, IpcacheValue>,
    /// Wider IPv6 prefixes: (prefix length, masked [`ip6_key`]).
    pub lpm6: HashMap<(u32, Ipv6Key), IpcacheValue>,
    pub policy: HashMap<PolicyKey, PolicyValue>,
    /// Rule names by [`rule_id`].
    pub rules: BTreeMap<u32, String>,
    /// Entries the datapath cannot hold (malformed CIDRs, out-of-range numbers), with why.
    pub skipped: Vec<String>,
}

impl Tables {
    pub fn from_state(state: &NodeState) -> Tables {
        Tables::from_state_with(state, FOLD_LIMIT)
    }

    /// [`Tables::from_state`] with another fold limit (see [`compile_with`]).
    pub fn from_state_with(state: &NodeState, fold_limit: usize) -> Tables {
        let mut t = Tables::default();
        for (cidr, e) in &state.ipcache {
            let node_id = match u16::try_from(e.node_id) {
                Ok(n) => n,
                Err(_) => {
                    t.skipped
                        .push(format!("ipcache {cidr}: node id {} is out of range", e.node_id));
                    continue;
                }
            };
            let value = IpcacheValue {
                identity: e.identity,
                node_id,
                ..IpcacheValue::default()
            };
            match parse_cidr(cidr) {
                Some((IpAddr::V4(ip), 32)) => {
                    t.ipcache.insert(ip_key(ip), value);
                }
                Some((IpAddr::V4(ip), len)) => {
                    t.lpm.insert((len, ip_key(mask(ip, len))), value);
                }
                Some((IpAddr::V6(ip), 128)) => {
                    t.ipcache6.insert(ip6_key(ip), value);
                }
                Some((IpAddr::V6(ip), len)) => {
                    t.lpm6.insert((len, ip6_key(mask6(ip, len))), value);
                }
                None => t
                    .skipped
                    .push(format!("ipcache {cidr}: not an IPv4 or IPv6 CIDR")),
            }
        }
        let mut entries = HashMap::new();
        for (&(subject, peer, block, protocol, direction), e) in &state.policy {
            let (Ok(port_block), Ok(proto), Ok(direction), Some(allowed), Some(authenticated)) = (
                u16::try_from(block),
                u8::try_from(protocol),
                u8::try_from(direction),
                crate::state::allowed(e),
                crate::state::authenticated(e),
            ) else {
                // Left out: the lookup then falls through to a less specific
                // entry or denies (fail closed).
                t.skipped.push(format!(
                    "policy {subject}->{peer} block {block} proto {protocol} dir {direction}: out of range or malformed"
                ));
                continue;
            };
            let id = rule_id(&e.rule);
            t.rules.entry(id).or_insert_with(|| e.rule.clone());
            entries.insert(
                PolicyKey {
                    subject,
                    peer,
                    port_block,
                    proto,
                    direction,
                },
                Entry {
                    rule_id: id,
                    r#final: e.r#final,
                    allowed,
                    authenticated: authenticated.and(allowed),
                },
            );
        }
        t.policy = compile_with(&entries, fold_limit);
        let (masks, named) = (absent_shapes(t.policy.keys()), named_peers(t.policy.keys()));
        t.mark(&masks, &named);
        t
    }

    /// Sets every ipcache value's absent shapes from `masks` (see
    /// [`absent_shapes`]) and the subjects that do not name it from `named`
    /// (see [`named_peers`]).
    pub fn mark(&mut self, masks: &HashMap<u32, u8>, named: &HashMap<u32, Namers>) {
        for v in self.values_mut() {
            v.absent = absent_of(masks, v.identity);
            v.unnamed_by = unnamed_of(named, v.identity);
        }
    }

    /// The ipcache to write before the policy changes from `old_policy` to
    /// this one's: a shape is skipped only if it is absent on both sides
    /// (and a pair's own keys only if neither side's filter lets its
    /// subject name the peer),
    /// so no packet judged between the two writes skips an entry either
    /// policy has (skipping one that requires authentication could let a
    /// packet through without it). After the policy, `self` is written.
    pub fn between(&self, old_policy: &HashMap<PolicyKey, PolicyValue>) -> Tables {
        let old = absent_shapes(old_policy.keys());
        let old_named = named_peers(old_policy.keys());
        let mut t = Tables {
            ipcache: self.ipcache.clone(),
            lpm: self.lpm.clone(),
            ipcache6: self.ipcache6.clone(),
            lpm6: self.lpm6.clone(),
            ..Tables::default()
        };
        for v in t.values_mut() {
            v.absent &= absent_of(&old, v.identity);
            v.unnamed_by = unnamed_by_both(v.unnamed_by, unnamed_of(&old_named, v.identity));
        }
        t
    }

    /// Every ipcache value, both families, exact and prefix.
    fn values_mut(&mut self) -> impl Iterator<Item = &mut IpcacheValue> {
        self.ipcache
            .values_mut()
            .chain(self.lpm.values_mut())
            .chain(self.ipcache6.values_mut())
            .chain(self.lpm6.values_mut())
    }
}

/// One policy entry as the control plane sends it: the packet is allowed
/// when any entry it matches allows it, and needs authentication when any
/// of those says so; the rule reported is the most specific match's; a
/// `final` entry ends the lookup (the less specific ones never apply to the
/// packets it is probed for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub rule_id: u32,
    pub r#final: bool,
    pub allowed: PortBits,
    /// A subset of `allowed`.
    pub authenticated: PortBits,
}

/// The kernel's policy table for the control plane's `entries`: for every
/// key the kernel can find first, the complete verdict of the entries a
/// packet probing it matches (see [`keyway_common::PolicyValue`]), so the
/// datapath stops at the first entry it finds.
///
/// For a subject, direction and packet (peer, port block, protocol), the
/// entries in lookup order are exact (E), any-port (AP), any-peer (W) and
/// any-peer-and-port (WA). The kernel probes the same four keys and takes
/// the first that exists, so each key holds:
/// - exact: E, AP, W and WA folded together;
/// - any-port: AP and WA;
/// - any-peer: W and WA;
/// - any-peer-and-port: WA.
///
/// Each is cut after a final entry. One more kind of key is written: where
/// a pair has an any-port entry, an exact key for every block its subject
/// has an any-peer entry for. Without it, a packet of that block would stop
/// at the any-port key and miss the any-peer entry. That costs
/// (any-port pairs x any-peer blocks) entries per subject and direction.
/// The node spends at most [`FOLD_LIMIT`] such entries, cheapest subjects
/// first; a subject left over gets none, and its any-port entries are
/// flagged [`keyway_common::policy_flags::WITH_ANY_PEER`] instead (the
/// kernel then reads the any-peer key too: one lookup more for that
/// subject, and no product a tenant's policy can blow up the node's map
/// with).
pub fn compile(entries: &HashMap<PolicyKey, Entry>) -> HashMap<PolicyKey, PolicyValue> {
    compile_with(entries, FOLD_LIMIT)
}

/// The most exact keys [`compile`] adds on a node by folding subjects'
/// any-peer port entries into their any-port pairs (about 9 MiB of kernel
/// memory at 144 bytes a value).
pub const FOLD_LIMIT: usize = 65_536;

/// [`compile`] with another fold limit (the tests use 0 and unlimited).
pub fn compile_with(
    entries: &HashMap<PolicyKey, Entry>,
    fold_limit: usize,
) -> HashMap<PolicyKey, PolicyValue> {
    let get = |subject, peer, port_block, proto, direction| {
        entries.get(&PolicyKey {
            subject,
            peer,
            port_block,
            proto,
            direction,
        })
    };
    // Any-peer blocks per (subject, direction), for the extra exact keys.
    let mut blocks: HashMap<(u32, u8), Vec<(u16, u8)>> = HashMap::new();
    for k in entries.keys() {
        if k.peer == 0 && k.port_block != 0 {
            blocks
                .entry((k.subject, k.direction))
                .or_default()
                .push((k.port_block, k.proto));
        }
    }
    // Any-port pairs per (subject, direction) that folding would multiply.
    let mut pairs: HashMap<(u32, u8), usize> = HashMap::new();
    for (k, e) in entries {
        if k.peer != 0 && k.port_block == 0 && !e.r#final {
            *pairs.entry((k.subject, k.direction)).or_default() += 1;
        }
    }
    // What folding costs each (subject, direction), folded cheapest first
    // while the node's budget lasts: a policy with a large product (one
    // tenant's, say) is the one left unfolded, and the node's map never
    // holds more than `fold_limit` keys of this kind.
    let mut costs: Vec<(usize, u32, u8)> = pairs
        .iter()
        .map(|(&(s, d), &n)| (n.saturating_mul(blocks.get(&(s, d)).map_or(0, Vec::len)), s, d))
        .filter(|&(cost, _, _)| cost > 0)
        .collect();
    costs.sort_unstable();
    let mut spent = 0usize;
    let mut folded: std::collections::HashSet<(u32, u8)> = std::collections::HashSet::new();
    for (cost, s, d) in costs {
        if spent.saturating_add(cost) > fold_limit {
            break;
        }
        spent += cost;
        folded.insert((s, d));
    }
    let folds = |s: u32, d: u8| !blocks.contains_key(&(s, d)) || folded.contains(&(s, d));
    let mut out = HashMap::with_capacity(entries.len());
    for (k, e) in entries {
        let (s, d) = (k.subject, k.direction);
        let value = match (k.peer == 0, k.port_block == 0) {
            // Exact: E, AP, W, WA.
            (false, false) => fold(&[
                (0, Some(*e), None),
                (1, get(s, k.peer, 0, 0, d).copied(), Some(k.proto)),
                (2, get(s, 0, k.port_block, k.proto, d).copied(), None),
                (3, get(s, 0, 0, 0, d).copied(), Some(k.proto)),
            ]),
            // Any-port: AP, WA (both per protocol).
            (false, true) => {
                let fold_here = folds(s, d);
                if !e.r#final && fold_here {
                    for &(block, proto) in blocks.get(&(s, d)).map(Vec::as_slice).unwrap_or(&[]) {
                        let exact = PolicyKey {
                            subject: s,
                            peer: k.peer,
                            port_block: block,
                            proto,
                            direction: d,
                        };
                        if entries.contains_key(&exact) {
                            continue;
                        }
                        let v = fold(&[
                            (1, Some(*e), Some(proto)),
                            (2, get(s, 0, block, proto, d).copied(), None),
                            (3, get(s, 0, 0, 0, d).copied(), Some(proto)),
                        ]);
                        out.insert(exact, v);
                    }
                }
                if !e.r#final && !fold_here {
                    // Alone: the kernel unites it with the packet's
                    // any-peer key, which carries that key's own final cut.
                    let mut v = fold(&[(1, Some(*e), None)]);
                    v.flags |= policy_flags::WITH_ANY_PEER;
                    v
                } else {
                    fold(&[(1, Some(*e), None), (3, get(s, 0, 0, 0, d).copied(), None)])
                }
            }
            // Any-peer: W, WA.
            (true, false) => fold(&[
                (2, Some(*e), None),
                (3, get(s, 0, 0, 0, d).copied(), Some(k.proto)),
            ]),
            (true, true) => fold(&[(3, Some(*e), None)]),
        };
        out.insert(*k, value);
    }
    out
}

/// Folds the entries a packet probing one key matches, most specific
/// first: (shape, entry, `Some(protocol)` for an any-port entry read as a
/// whole protocol: every bit when its `protocol` bit is set, none
/// otherwise). Stops after a final entry.
fn fold(layers: &[(u8, Option<Entry>, Option<u8>)]) -> PolicyValue {
    let mut v = PolicyValue::default();
    let mut attributed = 0;
    for &(shape, entry, whole) in layers {
        let Some(e) = entry else { continue };
        let widen = |bits: PortBits| match whole {
            Some(proto) if bits.get(proto) => PortBits::ALL,
            Some(_) => PortBits::NONE,
            None => bits,
        };
        let (allowed, authenticated) = (widen(e.allowed), widen(e.authenticated));
        let new = allowed.and_not(v.allowed);
        if !new.is_empty() {
            match attributed {
                0 => {
                    v.rule_id = e.rule_id;
                    v.first = new;
                    v.origins[0] = shape;
                }
                1 => {
                    v.second_rule_id = e.rule_id;
                    v.second = new;
                    v.origins[1] = shape;
                }
                _ => {
                    // The rest: every bit not in first or second. A third
                    // layer with new bits is the last (see PolicyValue).
                    debug_assert!(attributed == 2, "a fourth layer adds bits: {layers:?}");
                    v.rest_rule_id = e.rule_id;
                    v.origins[2] = shape;
                }
            }
            attributed += 1;
        }
        v.allowed = v.allowed.or(allowed);
        v.authenticated = v.authenticated.or(authenticated);
        if e.r#final {
            break;
        }
    }
    v
}

/// For each subject identity with policy entries, the lookups it has no
/// entry for (bits of [`IpcacheValue::absent`]): the kernel skips those
/// probes. An identity with no entry at all has every shape absent.
pub fn absent_shapes<'a>(keys: impl IntoIterator<Item = &'a PolicyKey>) -> HashMap<u32, u8> {
    let mut present: HashMap<u32, u8> = HashMap::new();
    for k in keys {
        *present.entry(k.subject).or_default() |= absent_bit(k.direction, probe_index(k.peer, k.port_block));
    }
    present.into_iter().map(|(s, p)| (s, !p)).collect()
}

/// `identity`'s absent shapes in `masks`: all when it has no entry.
pub fn absent_of(masks: &HashMap<u32, u8>, identity: u32) -> u8 {
    masks.get(&identity).copied().unwrap_or(u8::MAX)
}

/// Per direction (index `direction & 1`), the [`namer_bit`]s of the
/// subjects that name one identity as their peer.
pub type Namers = [u32; 2];

/// For each identity some subject's policy names as its peer (an exact or
/// any-port entry with it), per direction, the bits of the subjects that
/// name it. With it as the peer of a subject whose bit is not among them,
/// the kernel skips the exact and any-port probes
/// ([`IpcacheValue::unnamed_by`]): such a packet costs the any-peer lookups
/// alone.
pub fn named_peers<'a>(keys: impl IntoIterator<Item = &'a PolicyKey>) -> HashMap<u32, Namers> {
    let mut named: HashMap<u32, Namers> = HashMap::new();
    for k in keys {
        if k.peer != keyway_common::identity::UNKNOWN {
            named.entry(k.peer).or_default()[usize::from(k.direction & 1)] |= namer_bit(k.subject);
        }
    }
    named
}

/// The subjects that do not name `identity`, per direction, as
/// [`IpcacheValue::unnamed_by`] holds them: all but the bits `named` lists.
pub fn unnamed_of(named: &HashMap<u32, Namers>, identity: u32) -> [u32; 2] {
    let n = named.get(&identity).copied().unwrap_or_default();
    [!n[0], !n[1]]
}

/// The subjects that name an identity on neither side, per direction: a
/// probe skipped with these is skipped by both.
pub fn unnamed_by_both(a: [u32; 2], b: [u32; 2]) -> [u32; 2] {
    [a[0] & b[0], a[1] & b[1]]
}

/// One write to the kernel's policy map.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PolicyWrite {
    Upsert(PolicyKey, PolicyValue),
    Delete(PolicyKey),
}

/// The writes that turn policy table `old` into `new`, in the order that
/// gives every packet judged in between the old verdict or the new one:
/// upserts most specific shape first, then deletes least specific first.
/// The kernel takes the first entry it finds, in shape order, and each
/// entry is the verdict for the packets that stop at it: so a packet stops
/// at its old first entry (old value) until its new first entry, more
/// specific or rewritten, is in; and an old entry goes only after every
/// less specific old one, so nothing stale is found once it is gone.
///
/// An entry flagged `WITH_ANY_PEER` (only past [`FOLD_LIMIT`]) is united by
/// the kernel with a less specific one, so between their writes a packet
/// can meet one half old and the other new. Where such an entry is added,
/// changed or removed, it is first written as what either side allows,
/// all of it requiring authentication (see [`transitional`]), and its new
/// value (or its removal)
/// goes once the any-peer entries are new and before the more specific
/// old entries go: meanwhile a packet is never let through unless the old or
/// the new policy lets it, nor without authentication unless one of them
/// does (a flow of that subject's may have to authenticate for that
/// while).
pub fn policy_writes(
    old: &HashMap<PolicyKey, PolicyValue>,
    new: &HashMap<PolicyKey, PolicyValue>,
) -> Vec<PolicyWrite> {
    let shape = |k: &PolicyKey| probe_index(k.peer, k.port_block);
    let mut d = diff(old, new);
    d.upserts.sort_by_key(|(k, _)| (shape(k), *k));
    d.deletes.sort_by_key(|k| (std::cmp::Reverse(shape(k)), *k));
    let flagged = |v: Option<&PolicyValue>| v.is_some_and(|v| v.flags & policy_flags::WITH_ANY_PEER != 0);
    let mut last = Vec::new();
    let mut interim = Vec::new();
    d.upserts.retain(|(k, v)| {
        let o = old.get(k);
        if !flagged(o) && v.flags & policy_flags::WITH_ANY_PEER == 0 {
            return true;
        }
        interim.push((*k, transitional(o, Some(v))));
        last.push(PolicyWrite::Upsert(*k, *v));
        false
    });
    d.deletes.retain(|k| {
        if !flagged(old.get(k)) {
            return true;
        }
        interim.push((*k, transitional(old.get(k), None)));
        last.push(PolicyWrite::Delete(*k));
        false
    });
    d.upserts.extend(interim);
    d.upserts.sort_by_key(|(k, _)| (shape(k), *k));
    // The flagged entries' own values once their any-peer halves are all
    // new, before the more specific old entries that stopped packets short
    // of them go.
    let (any_peer, specific): (Vec<_>, Vec<_>) = d.deletes.into_iter().partition(|k| shape(k) >= 2);
    d.upserts
        .into_iter()
        .map(|(k, v)| PolicyWrite::Upsert(k, v))
        .chain(any_peer.into_iter().map(PolicyWrite::Delete))
        .chain(last)
        .chain(specific.into_iter().map(PolicyWrite::Delete))
        .collect()
}

/// What a `WITH_ANY_PEER` entry holds while it changes (see
/// [`policy_writes`]): every bit either side allows, each requiring
/// authentication, united with the any-peer entries only if every side
/// that has the entry unites it too (an entry that does not, a final one
/// among others, stops packets short of the any-peer entries, and uniting
/// meanwhile would reach the ones it cuts off).
fn transitional(old: Option<&PolicyValue>, new: Option<&PolicyValue>) -> PolicyValue {
    let base = new.or(old).copied().unwrap_or_default();
    let allowed = old
        .map_or(PortBits::NONE, |o| o.allowed)
        .or(new.map_or(PortBits::NONE, |n| n.allowed));
    PolicyValue {
        allowed,
        authenticated: allowed,
        flags: (base.flags & !policy_flags::WITH_ANY_PEER)
            | if [old, new]
                .iter()
                .all(|v| v.is_none_or(|v| v.flags & policy_flags::WITH_ANY_PEER != 0))
            {
                policy_flags::WITH_ANY_PEER
            } else {
                0
            },
        // The bits only the other side allows, reported as its rule.
        rest_rule_id: if base.rest_rule_id != 0 {
            base.rest_rule_id
        } else {
            old.or(new).map_or(0, |v| v.rule_id)
        },
        ..base
    }
}

/// Upserts and deletes that turn one map's content into another's.
#[derive(Debug, PartialEq)]
pub struct MapDiff<K, V> {
    pub upserts: Vec<(K, V)>,
    pub deletes: Vec<K>,
}

impl<K, V> MapDiff<K, V> {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

pub fn diff<K: Copy + Eq + std::hash::Hash, V: Copy + PartialEq>(
    old: &HashMap<K, V>,
    new: &HashMap<K, V>,
) -> MapDiff<K, V> {
    MapDiff {
        upserts: new
            .iter()
            .filter(|(k, v)| old.get(k) != Some(v))
            .map(|(k, v)| (*k, *v))
            .collect(),
        deletes: old.keys().filter(|k| !new.contains_key(k)).copied().collect(),
    }
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u32)> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, Some(len.parse::<u32>().ok()?)),
        None => (s.parse::<IpAddr>().ok()?, None),
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    if len > max {
        return None;
    }
    // An IPv4-mapped IPv6 prefix (::ffff:a.b.c.d) is IPv4: the packets it
    // names carry IPv4 headers.
    match ip {
        IpAddr::V6(v6) if len >= 96 => match v6.to_ipv4_mapped() {
            Some(v4) => Some((IpAddr::V4(v4), len - 96)),
            None => Some((ip, len)),
        },
        _ => Some((ip, len)),
    }
}

pub(crate) fn mask(ip: Ipv4Addr, len: u32) -> Ipv4Addr {
    let bits = u32::from(ip);
    let m = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Ipv4Addr::from(bits & m)
}

pub(crate) fn mask6(ip: Ipv6Addr, len: u32) -> Ipv6Addr {
    let bits = u128::from(ip);
    let m = if len == 0 { 0 } else { u128::MAX << (128 - len) };
    Ipv6Addr::from(bits & m)
}

/// `ip` with all but its first `len` bits cleared, either family.
pub fn masked(ip: IpAddr, len: u32) -> IpAddr {
    match ip {
        IpAddr::V4(ip) => IpAddr::V4(mask(ip, len)),
        IpAddr::V6(ip) => IpAddr::V6(mask6(ip, len)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::keyway as pb;

    fn state() -> NodeState {
        let mut s = NodeState::default();
        for (cidr, id, node) in [
            ("10.0.0.1/32", 300, 1),
            ("10.1.0.0/16", 2, 0),
            ("fd00::1/128", 301, 1),
            ("fd00:1::/64", 2, 0),
            ("::ffff:10.2.0.0/112", 2, 0),
            ("10.0.0.0/33", 2, 0),
        ] {
            s.ipcache.insert(
                cidr.into(),
                pb::IpcacheEntry {
                    cidr: cidr.into(),
                    identity: id,
                    node_id: node,
                    ..Default::default()
                },
            );
        }
        {
            let (k, e) =
                crate::state::port_entry((300, 301, 8080, 6, 0), true, "default/api-mtls ingress[0]");
            s.policy.insert(k, e);
        }
        s
    }

    #[test]
    fn exact_addresses_go_to_the_hash_and_prefixes_to_the_trie() {
        let t = Tables::from_state(&state());
        let v = t.ipcache[&ip_key(Ipv4Addr::new(10, 0, 0, 1))];
        assert_eq!((v.identity, v.node_id), (300, 1));
        assert_eq!(t.lpm[&(16, ip_key(Ipv4Addr::new(10, 1, 0, 0)))].identity, 2);
        let v = t.ipcache6[&ip6_key("fd00::1".parse().unwrap())];
        assert_eq!((v.identity, v.node_id), (301, 1));
        assert_eq!(t.lpm6[&(64, ip6_key("fd00:1::".parse().unwrap()))].identity, 2);
        assert_eq!(
            t.lpm[&(16, ip_key(Ipv4Addr::new(10, 2, 0, 0)))].identity,
            2,
            "an IPv4-mapped prefix is an IPv4 one"
        );
        assert_eq!(
            t.skipped,
            vec!["ipcache 10.0.0.0/33: not an IPv4 or IPv6 CIDR".to_string()],
            "what cannot be held is reported, not silently dropped"
        );
    }

    #[test]
    fn policy_ports_are_blocks_with_bits_and_rules_are_named() {
        let t = Tables::from_state(&state());
        let (k, v) = t.policy.iter().next().unwrap();
        assert_eq!(k.port_block, keyway_common::port_block(8080));
        assert_eq!((k.subject, k.peer, k.proto, k.direction), (300, 301, 6, 0));
        assert!(v.allowed.get((8080 & 0xff) as u8) && v.authenticated.get((8080 & 0xff) as u8));
        assert_eq!(v.allowed.count(), 1);
        assert_eq!(t.rules[&v.rule_id], "default/api-mtls ingress[0]");
    }

    #[test]
    fn a_subject_skips_only_the_lookups_it_has_no_entry_for() {
        use keyway_common::direction::{EGRESS, INGRESS};
        let t = Tables::from_state(&state());
        // 300 has one exact ingress entry: every other shape, and every
        // egress one, is absent.
        let v = t.ipcache[&ip_key(Ipv4Addr::new(10, 0, 0, 1))];
        assert_eq!(v.absent, !absent_bit(INGRESS, 0));
        // An identity with no entry at all skips everything: it is denied
        // either way.
        assert_eq!(t.lpm[&(16, ip_key(Ipv4Addr::new(10, 1, 0, 0)))].absent, u8::MAX);
        // The shapes, in probe order.
        let key = |peer, port_block, direction| PolicyKey {
            subject: 7,
            peer,
            port_block,
            proto: 6,
            direction,
        };
        let masks = absent_shapes(&[key(9, 0, EGRESS), key(0, 32, INGRESS), key(0, 0, INGRESS)]);
        assert_eq!(
            !masks[&7],
            absent_bit(EGRESS, 1) | absent_bit(INGRESS, 2) | absent_bit(INGRESS, 3)
        );
    }

    #[test]
    fn while_the_policy_changes_no_lookup_either_side_needs_is_skipped() {
        let old = Tables::from_state(&state());
        // The new policy adds an any-peer entry for 300 (one that could
        // require authentication), and drops the exact one.
        let mut s = state();
        s.policy.clear();
        let (k, e) = crate::state::port_entry((300, 0, 8080, 6, 0), true, "default/any ingress[0]");
        s.policy.insert(k, e);
        let new = Tables::from_state(&s);
        let ip = ip_key(Ipv4Addr::new(10, 0, 0, 1));
        let between = new.between(&old.policy);
        let (exact, any_peer) = (absent_bit(0, 0), absent_bit(0, 2));
        assert_eq!(old.ipcache[&ip].absent & (exact | any_peer), any_peer);
        assert_eq!(new.ipcache[&ip].absent & (exact | any_peer), exact);
        assert_eq!(
            between.ipcache[&ip].absent & (exact | any_peer),
            0,
            "both probed meanwhile"
        );
    }

    /// A small deterministic generator (the tests need no crate for it).
    struct Lcg(u64);
    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }

    /// A random policy over two subjects, peers 5 and 6 (7 is named by
    /// none), both directions, TCP and UDP, ports 0-3 of blocks 1 and 2:
    /// all four shapes, final entries and authentication mixed.
    fn random_state(r: &mut Lcg, round: usize) -> NodeState {
        let mut state = NodeState::default();
        for i in 0..r.below(12) + 1 {
            let subject = 1 + r.below(2) as u32;
            let peer = [0, 0, 5, 6][r.below(4) as usize];
            let direction = r.below(2) as u32;
            let (block, proto) = match r.below(3) {
                0 => (0, 0),
                b => (b as u32, [6, 17][r.below(2) as usize]),
            };
            let mut allowed = PortBits::NONE;
            let mut auth = PortBits::NONE;
            for _ in 0..r.below(3) + 1 {
                // Ports 0-3 of the block, or TCP and UDP in an any-port entry.
                let bit = if block == 0 {
                    [6, 17][r.below(2) as usize]
                } else {
                    r.below(4) as u8
                };
                allowed.set(bit);
                if r.below(2) == 0 {
                    auth.set(bit);
                }
            }
            if r.below(8) == 0 {
                allowed = PortBits::ALL;
            }
            let entry = pb::PolicyEntry {
                key: Some(pb::PolicyKey {
                    subject,
                    peer,
                    port_block: block,
                    protocol: proto,
                    direction,
                }),
                rule: format!("r{round}-{i}"),
                allowed: allowed.to_bytes().to_vec(),
                authenticated: auth.to_bytes().to_vec(),
                r#final: r.below(5) == 0,
            };
            state
                .policy
                .insert((subject, peer, block, proto, direction), entry);
        }
        state
    }

    /// Every packet `random_state`'s policies can tell apart: (subject,
    /// peer, direction, proto, port).
    fn packets() -> impl Iterator<Item = (u32, u32, u8, u8, u16)> {
        (1..=2).flat_map(|s| {
            [5, 6, 7].into_iter().flat_map(move |p| {
                (0..2u8).flat_map(move |d| {
                    [6u8, 17].into_iter().flat_map(move |proto| {
                        [0u16, 1, 3, 256, 258, 300]
                            .into_iter()
                            .map(move |port| (s, p, d, proto, port))
                    })
                })
            })
        })
    }

    /// What the kernel decides from `t`'s policy: the rule's name and
    /// whether it needs authentication.
    fn kernel_decides(t: &Tables, (s, p, d, proto, port): (u32, u32, u8, u8, u16)) -> Option<(String, bool)> {
        use crate::datapath::lookup::{MemoryLookup, lookup_policy};
        let memory = MemoryLookup {
            tables: t.clone(),
            ..MemoryLookup::default()
        };
        lookup_policy(&memory, s, p, port, proto, d, 0)
            .expect("in memory")
            .map(|h| {
                (
                    t.rules
                        .get(&h.rule_id)
                        .cloned()
                        .unwrap_or_else(|| format!("#{}", h.rule_id)),
                    h.auth_required,
                )
            })
    }

    /// The compiled table, read the kernel's way (the first entry found
    /// decides), gives every packet the verdict, rule and authentication the
    /// control plane's entries give it read the reference way
    /// (`NodeState::decide`: every matching entry, up to a final one), over
    /// random policies mixing all four shapes, final entries and
    /// authentication; folded (the default) and with no fold at all (every
    /// any-port entry united with the any-peer keys in the kernel).
    #[test]
    fn the_compiled_table_decides_every_packet_as_the_control_planes_entries_do() {
        use crate::datapath::lookup::{MemoryLookup, lookup_policy};
        let mut r = Lcg(0x9e37_79b9_7f4a_7c15);
        let (mut checked, mut one_lookup) = (0, 0);
        for round in 0..400 {
            let state = random_state(&mut r, round);
            for fold_limit in [FOLD_LIMIT, 0] {
                let t = Tables::from_state_with(&state, fold_limit);
                let memory = MemoryLookup {
                    tables: t.clone(),
                    ..MemoryLookup::default()
                };
                for (subject, peer, direction, proto, port) in packets() {
                    let want = state.decide(subject, peer, port, proto, u32::from(direction));
                    let got =
                        lookup_policy(&memory, subject, peer, port, proto, direction, 0).expect("in memory");
                    let got_named = got.map(|h| (t.rules[&h.rule_id].as_str(), h.auth_required));
                    assert_eq!(
                        got_named,
                        want,
                        "subject {subject} peer {peer} dir {direction} proto {proto} port {port} fold limit \
                         {fold_limit}, policy {:?}",
                        state.policy.values().collect::<Vec<_>>()
                    );
                    if let Some(h) = got {
                        assert_eq!(
                            state.policy[&(
                                h.key.subject,
                                h.key.peer,
                                u32::from(h.key.port_block),
                                u32::from(h.key.proto),
                                u32::from(direction)
                            )]
                                .rule,
                            t.rules[&h.rule_id],
                            "explain names the entry the rule was written as"
                        );
                    }
                    let first = keyway_common::policy_probes(subject, peer, port, proto, direction)[0].1;
                    if want.is_some() && t.policy.contains_key(&first) {
                        one_lookup += 1;
                    }
                    checked += 1;
                }
            }
        }
        assert!(
            checked > 50_000 && one_lookup > 1_000,
            "{checked} packets, {one_lookup} decided by the first key"
        );
    }

    /// While one policy is written over another, entry by entry in
    /// [`policy_writes`] order, every packet judged in between gets the old
    /// policy's verdict or the new one's, never a mix (a mix could, for
    /// one, drop an authentication both require). With nothing folded
    /// (entries the kernel unites), the weaker guarantee: a packet is let
    /// through, or let through without authentication, only if the old or
    /// the new policy does so.
    #[test]
    fn mid_update_every_packet_gets_the_old_verdict_or_the_new_one() {
        for fold_limit in [FOLD_LIMIT, 0] {
            mid_update_with(fold_limit);
        }
    }

    fn mid_update_with(fold_limit: usize) {
        let mut r = Lcg(0x5eed_0fc0_ffee);
        let mut states = 0;
        for round in 0..1000 {
            let (old_state, new_state) = (random_state(&mut r, round), random_state(&mut r, round + 1000));
            let (old, new) = (
                Tables::from_state_with(&old_state, fold_limit),
                Tables::from_state_with(&new_state, fold_limit),
            );
            let mut mid = old.clone();
            mid.rules.extend(new.rules.clone());
            let verdicts: Vec<_> = packets()
                .map(|pkt| (pkt, kernel_decides(&old, pkt), kernel_decides(&new, pkt)))
                .collect();
            for w in policy_writes(&old.policy, &new.policy) {
                match w {
                    PolicyWrite::Upsert(k, v) => mid.policy.insert(k, v),
                    PolicyWrite::Delete(k) => mid.policy.remove(&k),
                };
                for (pkt, was, will) in &verdicts {
                    let now = kernel_decides(&mid, *pkt);
                    if fold_limit > 0 {
                        assert!(
                            now == *was || now == *will,
                            "{pkt:?} mid-update: {now:?}, neither the old {was:?} nor the new {will:?}"
                        );
                    } else {
                        let allows = |v: &Option<(String, bool)>| v.is_some();
                        let allows_bare = |v: &Option<(String, bool)>| matches!(v, Some((_, false)));
                        assert!(
                            !allows(&now) || allows(was) || allows(will),
                            "{pkt:?} let through mid-update, by neither policy ({was:?}, {will:?})"
                        );
                        assert!(
                            !allows_bare(&now) || allows_bare(was) || allows_bare(will),
                            "{pkt:?} let through without authentication mid-update, which neither \
                             policy does ({was:?}, {will:?})"
                        );
                    }
                }
                states += 1;
            }
            assert_eq!(mid.policy, new.policy);
        }
        assert!(states > 1_000, "{states} intermediate states");
    }

    /// Folding costs (any-port pairs x any-peer blocks) keys per subject;
    /// the node spends at most its limit, cheapest subjects first, and a
    /// subject left over (a tenant's policy with a large product) is flagged
    /// for the kernel to unite instead, at no extra keys.
    #[test]
    fn the_fold_is_spent_cheapest_first_within_the_nodes_limit() {
        let entry = Entry {
            rule_id: 1,
            r#final: false,
            allowed: PortBits::ALL,
            authenticated: PortBits::NONE,
        };
        let key = |subject, peer, port_block, proto| PolicyKey {
            subject,
            peer,
            port_block,
            proto,
            direction: 0,
        };
        let mut entries = HashMap::new();
        // Subject 1: 3 any-port peers x 2 any-peer blocks = 6 extra keys.
        // Subject 2: 10 x 10 = 100.
        for (subject, n) in [(1u32, (3u32, 2u16)), (2, (10, 10))] {
            for p in 0..n.0 {
                entries.insert(key(subject, 100 + p, 0, 0), entry);
            }
            for b in 0..n.1 {
                entries.insert(key(subject, 0, 1 + b, 6), entry);
            }
        }
        let flagged = |t: &HashMap<PolicyKey, PolicyValue>, subject| {
            t.iter()
                .filter(|(k, v)| k.subject == subject && v.flags & policy_flags::WITH_ANY_PEER != 0)
                .count()
        };
        let t = compile_with(&entries, 50);
        assert_eq!(
            t.len(),
            entries.len() + 6,
            "subject 1's six extra keys, none of subject 2's"
        );
        assert_eq!((flagged(&t, 1), flagged(&t, 2)), (0, 10));
        let t = compile_with(&entries, 106);
        assert_eq!(t.len(), entries.len() + 106);
        assert_eq!((flagged(&t, 1), flagged(&t, 2)), (0, 0));
        let t = compile_with(&entries, 5);
        assert_eq!(t.len(), entries.len());
        assert_eq!((flagged(&t, 1), flagged(&t, 2)), (3, 10));
    }

    /// The kernel skips a subject's absent shapes and, for a peer whose
    /// filter says this subject does not name it, the pair's own keys:
    /// over random policies, no skipped probe is ever one with an entry,
    /// in the old table, the new one, or (with the marks `between` writes)
    /// either while one replaces the other.
    #[test]
    fn the_marks_never_skip_an_entry_either_side_has() {
        use keyway_common::skipped_probes;
        let mut r = Lcg(0x0ddb_a110);
        let mut skipped = 0;
        for round in 0..400 {
            let fold_limit = if round % 2 == 0 { FOLD_LIMIT } else { 0 };
            let old = Tables::from_state_with(&random_state(&mut r, round), fold_limit);
            let new = Tables::from_state_with(&random_state(&mut r, round + 1000), fold_limit);
            let marks = |t: &Tables| (absent_shapes(t.policy.keys()), named_peers(t.policy.keys()));
            let ((ma, na), (mb, nb)) = (marks(&old), marks(&new));
            for (s, p, d, proto, port) in packets() {
                let views = [
                    (absent_of(&ma, s), unnamed_of(&na, p), vec![&old.policy]),
                    (absent_of(&mb, s), unnamed_of(&nb, p), vec![&new.policy]),
                    (
                        absent_of(&ma, s) & absent_of(&mb, s),
                        unnamed_by_both(unnamed_of(&na, p), unnamed_of(&nb, p)),
                        vec![&old.policy, &new.policy],
                    ),
                ];
                for (absent, unnamed, tables) in views {
                    let skip = skipped_probes(absent, &unnamed, s, d);
                    for (i, (_, key, _)) in keyway_common::policy_probes(s, p, port, proto, d)
                        .iter()
                        .enumerate()
                    {
                        if skip & absent_bit(d, i as u8) != 0 {
                            skipped += 1;
                            assert!(
                                tables.iter().all(|t| !t.contains_key(key)),
                                "probe {i} of {:?} skipped, but {key:?} has an entry",
                                (s, p, d, proto, port)
                            );
                        }
                    }
                }
            }
        }
        assert!(skipped > 10_000, "{skipped} probes skipped");
    }

    #[test]
    fn rule_ids_are_stable_and_never_zero() {
        assert_eq!(rule_id("a"), rule_id("a"));
        assert_ne!(rule_id("a"), rule_id("b"));
        assert_ne!(rule_id(""), 0);
    }

    #[test]
    fn diff_sends_only_changes() {
        let a: HashMap<u32, u32> = [(1, 1), (2, 2), (3, 3)].into();
        let b: HashMap<u32, u32> = [(1, 1), (2, 20), (4, 4)].into();
        let mut d = diff(&a, &b);
        d.upserts.sort();
        assert_eq!(d.upserts, vec![(2, 20), (4, 4)]);
        assert_eq!(d.deletes, vec![3]);
        assert!(diff(&b, &b).is_empty());
    }
}
