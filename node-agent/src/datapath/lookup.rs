//! Point lookups in the kernel's tables, made the way the programs make
//! them (auth-bpf/ebpf `evaluate`), for `node-agent explain`. One trait, two
//! implementations: the pinned maps the kernel reads, and an in-memory view
//! built from [`Tables`] for tests. [`evaluate`] mirrors the kernel's full
//! evaluation step by step and keeps every intermediate fact.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use keyway_common::{
    AuthKey, AuthValue, Config, EndpointInfo, IpcacheValue, Ipv4LpmKey, Ipv6Key, PolicyKey, PolicyProbe,
    PolicyValue, auth_key, direction, drop_reason, hook, identity, maps, policy_probes, resolve_policy,
    skipped_probes,
};

use super::tables::{Tables, ip_key, ip6_key, masked};
use super::{DatapathError, open_pinned};

/// Capability: the lookups one evaluation of the datapath makes.
pub trait Lookup {
    /// The exact /32 or /128 ipcache entry.
    fn ipcache(&self, ip: IpAddr) -> Result<Option<IpcacheValue>, DatapathError>;
    /// The longest CIDR of the family's LPM trie containing `ip`, with its
    /// prefix length.
    fn ipcache_lpm(&self, ip: IpAddr) -> Result<Option<(u32, IpcacheValue)>, DatapathError>;
    fn policy(&self, key: &PolicyKey) -> Result<Option<PolicyValue>, DatapathError>;
    /// The auth entry's expiry (kernel monotonic ns).
    fn auth(&self, key: &AuthKey) -> Result<Option<u64>, DatapathError>;
    /// The local endpoint at `ip` (this node's datapath guards its veth).
    fn endpoint(&self, ip: IpAddr) -> Result<Option<EndpointInfo>, DatapathError>;
    fn config(&self) -> Result<Config, DatapathError>;
}

/// The pinned maps of a running (or earlier) agent, opened read-only in
/// spirit: nothing here writes.
pub struct PinnedLookup {
    ipcache: BpfHashMap<MapData, u32, IpcacheValue>,
    lpm: LpmTrie<MapData, Ipv4LpmKey, IpcacheValue>,
    policy: BpfHashMap<MapData, PolicyKey, PolicyValue>,
    auth: BpfHashMap<MapData, AuthKey, AuthValue>,
    endpoints: BpfHashMap<MapData, u32, EndpointInfo>,
    /// The IPv6 maps; `None` when the agent that pinned the maps predates them.
    v6: Option<PinnedV6>,
    config: Array<MapData, Config>,
}

struct PinnedV6 {
    ipcache: BpfHashMap<MapData, Ipv6Key, IpcacheValue>,
    lpm: LpmTrie<MapData, Ipv6Key, IpcacheValue>,
    endpoints: BpfHashMap<MapData, Ipv6Key, EndpointInfo>,
}

impl std::fmt::Debug for PinnedLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedLookup").finish_non_exhaustive()
    }
}

fn convert<T>(pin_dir: &Path, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map>,
    T::Error: std::fmt::Display,
{
    T::try_from(open_pinned(pin_dir, name)?).map_err(|e| DatapathError::map(name, e))
}

/// A miss is `None`; anything else is an error.
fn found<V>(name: &'static str, r: Result<V, aya::maps::MapError>) -> Result<Option<V>, DatapathError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(aya::maps::MapError::KeyNotFound | aya::maps::MapError::ElementNotFound) => Ok(None),
        Err(e) => Err(DatapathError::map(name, e)),
    }
}

impl PinnedLookup {
    pub fn open(pin_dir: &Path) -> Result<PinnedLookup, DatapathError> {
        Ok(PinnedLookup {
            ipcache: convert(pin_dir, maps::IPCACHE)?,
            lpm: convert(pin_dir, maps::IPCACHE_LPM)?,
            policy: convert(pin_dir, maps::POLICY)?,
            auth: convert(pin_dir, maps::AUTH)?,
            endpoints: convert(pin_dir, maps::ENDPOINTS)?,
            v6: (|| {
                Ok::<_, DatapathError>(PinnedV6 {
                    ipcache: convert(pin_dir, maps::IPCACHE6)?,
                    lpm: convert(pin_dir, maps::IPCACHE6_LPM)?,
                    endpoints: convert(pin_dir, maps::ENDPOINTS6)?,
                })
            })()
            .ok(),
            config: convert(pin_dir, maps::CONFIG)?,
        })
    }

    fn v6(&self) -> Result<&PinnedV6, DatapathError> {
        self.v6.as_ref().ok_or_else(|| {
            DatapathError::Load(
                "the pinned maps have no IPv6 tables (an agent older than IPv6 support pinned them)".into(),
            )
        })
    }
}

impl Lookup for PinnedLookup {
    fn ipcache(&self, ip: IpAddr) -> Result<Option<IpcacheValue>, DatapathError> {
        match ip {
            IpAddr::V4(ip) => found(maps::IPCACHE, self.ipcache.get(&ip_key(ip), 0)),
            IpAddr::V6(ip) => found(maps::IPCACHE6, self.v6()?.ipcache.get(&ip6_key(ip), 0)),
        }
    }

    fn ipcache_lpm(&self, ip: IpAddr) -> Result<Option<(u32, IpcacheValue)>, DatapathError> {
        // A lookup in an LPM trie is a longest-prefix match, as in the kernel.
        // The trie does not say which prefix matched: the longest stored
        // prefix containing `ip` is the one the lookup returned.
        let mut len = 0;
        let v = match ip {
            IpAddr::V4(v4) => {
                let Some(v) = found(
                    maps::IPCACHE_LPM,
                    self.lpm.get(&Key::new(32, Ipv4LpmKey { addr: ip_key(v4) }), 0),
                )?
                else {
                    return Ok(None);
                };
                for k in self.lpm.keys() {
                    let k = k.map_err(|e| DatapathError::map(maps::IPCACHE_LPM, e))?;
                    if k.prefix_len() >= len
                        && IpAddr::from(k.data().addr.to_ne_bytes()) == masked(ip, k.prefix_len())
                    {
                        len = k.prefix_len();
                    }
                }
                v
            }
            IpAddr::V6(v6) => {
                let t = self.v6()?;
                let Some(v) = found(maps::IPCACHE6_LPM, t.lpm.get(&Key::new(128, ip6_key(v6)), 0))? else {
                    return Ok(None);
                };
                for k in t.lpm.keys() {
                    let k = k.map_err(|e| DatapathError::map(maps::IPCACHE6_LPM, e))?;
                    if k.prefix_len() >= len && IpAddr::from(k.data().addr) == masked(ip, k.prefix_len()) {
                        len = k.prefix_len();
                    }
                }
                v
            }
        };
        Ok(Some((len, v)))
    }

    fn policy(&self, key: &PolicyKey) -> Result<Option<PolicyValue>, DatapathError> {
        found(maps::POLICY, self.policy.get(key, 0))
    }

    fn auth(&self, key: &AuthKey) -> Result<Option<u64>, DatapathError> {
        Ok(found(maps::AUTH, self.auth.get(key, 0))?.map(|v| v.expiry_ns))
    }

    fn endpoint(&self, ip: IpAddr) -> Result<Option<EndpointInfo>, DatapathError> {
        match ip {
            IpAddr::V4(ip) => found(maps::ENDPOINTS, self.endpoints.get(&ip_key(ip), 0)),
            IpAddr::V6(ip) => found(maps::ENDPOINTS6, self.v6()?.endpoints.get(&ip6_key(ip), 0)),
        }
    }

    fn config(&self) -> Result<Config, DatapathError> {
        self.config
            .get(&0, 0)
            .map_err(|e| DatapathError::map(maps::CONFIG, e))
    }
}

/// The tables in memory: what [`Tables::from_state`] computes, plus auth
/// entries, endpoints and the config slot.
#[derive(Debug, Clone, Default)]
pub struct MemoryLookup {
    pub tables: Tables,
    pub auth: HashMap<AuthKey, u64>,
    pub endpoints: HashMap<IpAddr, EndpointInfo>,
    pub config: Config,
}

impl Lookup for MemoryLookup {
    fn ipcache(&self, ip: IpAddr) -> Result<Option<IpcacheValue>, DatapathError> {
        Ok(match ip {
            IpAddr::V4(ip) => self.tables.ipcache.get(&ip_key(ip)).copied(),
            IpAddr::V6(ip) => self.tables.ipcache6.get(&ip6_key(ip)).copied(),
        })
    }

    fn ipcache_lpm(&self, ip: IpAddr) -> Result<Option<(u32, IpcacheValue)>, DatapathError> {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        Ok((0..=max).rev().find_map(|len| {
            match masked(ip, len) {
                IpAddr::V4(m) => self.tables.lpm.get(&(len, ip_key(m))),
                IpAddr::V6(m) => self.tables.lpm6.get(&(len, ip6_key(m))),
            }
            .map(|v| (len, *v))
        }))
    }

    fn policy(&self, key: &PolicyKey) -> Result<Option<PolicyValue>, DatapathError> {
        Ok(self.tables.policy.get(key).copied())
    }

    fn auth(&self, key: &AuthKey) -> Result<Option<u64>, DatapathError> {
        Ok(self.auth.get(key).copied())
    }

    fn endpoint(&self, ip: IpAddr) -> Result<Option<EndpointInfo>, DatapathError> {
        Ok(self.endpoints.get(&ip).copied())
    }

    fn config(&self) -> Result<Config, DatapathError> {
        Ok(self.config)
    }
}

/// Where an address's identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpSource {
    /// The /32 hash.
    Exact,
    /// The LPM trie, with the prefix length that matched.
    Prefix(u32),
    /// Neither: the datapath calls it WORLD.
    World,
}

/// The ipcache lookup the kernel makes: exact /32 or /128, then the trie,
/// else WORLD.
pub fn lookup_ip(t: &dyn Lookup, ip: IpAddr) -> Result<(IpcacheValue, IpSource), DatapathError> {
    if let Some(v) = t.ipcache(ip)? {
        return Ok((v, IpSource::Exact));
    }
    if let Some((len, v)) = t.ipcache_lpm(ip)? {
        return Ok((v, IpSource::Prefix(len)));
    }
    Ok((
        IpcacheValue {
            identity: identity::WORLD,
            node_id: 0,
            ..IpcacheValue::default()
        },
        IpSource::World,
    ))
}

/// What the kernel's policy lookup found: the entry that decided (the
/// first found), the rule that allows the packet (the most specific
/// matching one of the control plane's entries) and whether any matching
/// entry requires authentication (the union of the rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyHit {
    /// The shape of the control plane's entry the rule was written as.
    pub probe: PolicyProbe,
    /// That entry's key.
    pub key: PolicyKey,
    /// The kernel's entry that decided, found at `found`.
    pub value: PolicyValue,
    pub found: PolicyKey,
    pub rule_id: u32,
    pub auth_required: bool,
}

/// The kernel's policy lookup, by the same function
/// ([`keyway_common::resolve_policy`], `port` in host order), less the
/// probes `skipped` names (the kernel's [`skipped_probes`] of the subject's
/// and the peer's ipcache values), keeping the entry that decided.
#[allow(clippy::too_many_arguments, reason = "the kernel's inputs, one each")]
pub fn lookup_policy(
    t: &dyn Lookup,
    subject: u32,
    peer: u32,
    port: u16,
    proto: u8,
    dir: u8,
    skipped: u8,
) -> Result<Option<PolicyHit>, DatapathError> {
    // What the lookup found, key by key: the entry that decided is one. (By
    // key, not by shape: with identity 0 as the peer, the exact and any-peer
    // probes are the same key.)
    let mut seen: Vec<(PolicyKey, PolicyValue)> = Vec::with_capacity(4);
    let decision = resolve_policy(subject, peer, port, proto, dir, skipped, |key| {
        let value = t.policy(key)?;
        if let Some(v) = value {
            seen.push((*key, v));
        }
        Ok::<_, DatapathError>(value)
    })?;
    let Some(d) = decision else {
        return Ok(None);
    };
    let probes = policy_probes(subject, peer, port, proto, dir);
    let found = probes[usize::from(d.probe) & 3].1;
    let Some(&(_, value)) = seen.iter().find(|(k, _)| *k == found) else {
        return Err(DatapathError::Load(format!(
            "policy lookup: the deciding entry {found:?} was not among those read"
        )));
    };
    let (probe, key, _) = probes[usize::from(d.origin) & 3];
    Ok(Some(PolicyHit {
        probe,
        key,
        value,
        found,
        rule_id: d.rule_id,
        auth_required: d.auth_required,
    }))
}

/// The auth check of an entry that requires it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthCheck {
    pub key: AuthKey,
    /// The entry's expiry, if there is one.
    pub expiry_ns: Option<u64>,
    /// True when the entry exists and `now < expiry` (what the kernel checks).
    pub valid: bool,
}

/// Everything one full evaluation at one hook saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evaluation {
    pub hook: u8,
    pub src: (IpcacheValue, IpSource),
    pub dst: (IpcacheValue, IpSource),
    pub subject: u32,
    pub peer: u32,
    pub direction: u8,
    /// The destination port looked up (host order; 0 without ports).
    pub port: u16,
    pub policy: Option<PolicyHit>,
    pub auth: Option<AuthCheck>,
    pub forwarded: bool,
    /// A [`drop_reason`] number.
    pub reason: u8,
}

/// The kernel's `evaluate` for a new flow `src -> dst` (port in host order,
/// ignored unless `proto` carries ports) at `at` (a [`hook`]), at kernel
/// time `now_ns`. At the from-pod hook the kernel first checks that the
/// source is an address of the endpoint behind the interface the packet came
/// in on: `via` (an ifindex), or when `None` the source endpoint's own.
#[allow(clippy::too_many_arguments, reason = "the kernel's inputs, one each")]
pub fn evaluate(
    t: &dyn Lookup,
    src_ip: IpAddr,
    dst_ip: IpAddr,
    port: u16,
    proto: u8,
    at: u8,
    via: Option<u32>,
    now_ns: u64,
) -> Result<Evaluation, DatapathError> {
    let cfg = t.config()?;
    let src = lookup_ip(t, src_ip)?;
    let dst = lookup_ip(t, dst_ip)?;
    if at == hook::FROM_POD {
        let owner = t.endpoint(src_ip)?.map(|ep| ep.ifindex);
        if owner.is_none() || via.is_some_and(|v| Some(v) != owner) {
            return Ok(Evaluation {
                hook: at,
                src: (
                    IpcacheValue {
                        identity: identity::UNKNOWN,
                        ..src.0
                    },
                    src.1,
                ),
                dst,
                subject: identity::UNKNOWN,
                peer: dst.0.identity,
                direction: direction::EGRESS,
                port,
                policy: None,
                auth: None,
                forwarded: false,
                reason: drop_reason::SOURCE_SPOOFED,
            });
        }
    }
    // The programs read ports only for TCP, UDP and SCTP.
    let port = if matches!(proto, 6 | 17 | 132) { port } else { 0 };
    let (subject, peer, peer_node, dir) = if at == hook::FROM_POD {
        (src.0.identity, dst.0.identity, dst.0.node_id, direction::EGRESS)
    } else {
        (dst.0.identity, src.0.identity, src.0.node_id, direction::INGRESS)
    };
    let mut e = Evaluation {
        hook: at,
        src,
        dst,
        subject,
        peer,
        direction: dir,
        port,
        policy: None,
        auth: None,
        forwarded: false,
        reason: drop_reason::POLICY_DENIED,
    };
    let (subject_value, peer_value) = if at == hook::FROM_POD {
        (src.0, dst.0)
    } else {
        (dst.0, src.0)
    };
    let skipped = skipped_probes(subject_value.absent, &peer_value.unnamed_by, subject, dir);
    e.policy = lookup_policy(t, subject, peer, port, proto, dir, skipped)?;
    let Some(hit) = e.policy else {
        return Ok(e);
    };
    if !hit.auth_required {
        e.forwarded = true;
        e.reason = drop_reason::NONE;
        return Ok(e);
    }
    let key = auth_key(subject, peer, peer_node, cfg.local_node_id);
    let expiry_ns = t.auth(&key)?;
    let valid = expiry_ns.is_some_and(|x| now_ns < x);
    e.auth = Some(AuthCheck {
        key,
        expiry_ns,
        valid,
    });
    if valid {
        e.forwarded = true;
        e.reason = drop_reason::NONE;
    } else {
        e.reason = drop_reason::AUTH_REQUIRED;
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With identity 0 as the peer, the exact and any-peer probes are one
    /// key: the entry that decided is still named (it once made `explain`
    /// panic, looking the entry up by shape).
    #[test]
    fn a_peer_with_identity_zero_is_explained() {
        let mut memory = MemoryLookup::default();
        let (key, bit) = keyway_common::policy_probe(400, identity::UNKNOWN, 8080, 6, direction::INGRESS, 0);
        let mut allowed = keyway_common::PortBits::NONE;
        allowed.set(bit);
        let value = PolicyValue {
            rule_id: 7,
            origins: [2, 0, 0],
            allowed,
            first: allowed,
            ..PolicyValue::default()
        };
        memory.tables.policy.insert(key, value);
        let hit = lookup_policy(&memory, 400, identity::UNKNOWN, 8080, 6, direction::INGRESS, 0)
            .unwrap()
            .expect("allowed");
        assert_eq!((hit.rule_id, hit.found, hit.value), (7, key, value));
        assert!(!hit.auth_required);
    }
}
