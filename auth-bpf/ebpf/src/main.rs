//! Keyway's TC programs, one on each side of a pod's host-side veth.
//!
//! Per packet (DESIGN.md section 6): parse Ethernet/IPv4/L4, look up both
//! identities in the ipcache (exact /32 hash, then the CIDR trie, else
//! WORLD), look up the policy entry of the endpoint this hook guards (most
//! specific first: exact, any port, any peer, any peer and port), and when
//! the entry requires mutual authentication look up the auth map and compare
//! the expiry with kernel time. A missing or expired auth entry drops the
//! packet with AUTH_REQUIRED and signals the agent, at most once per key per
//! interval. Allowed packets for a local endpoint are redirected to its veth;
//! the rest go to the stack.
//!
//! The flow table remembers each flow's verdict so established flows skip
//! the lookups; the agent bumps `Config::epoch` whenever a change could turn
//! an allowed flow into a denied one, which sends every flow back through a
//! full evaluation. The same table makes flow events per flow (new flow,
//! verdict change, and a reminder per report interval while a flow keeps
//! being dropped), never per forwarded packet.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::helpers::r#gen::bpf_redirect_neigh;
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::TcContext;
use keyway_common::{
    AuthKey, AuthSignal, AuthValue, Config, EndpointInfo, FlowEvent, FlowKey, FlowState, IpcacheValue,
    Ipv4LpmKey, PolicyKey, PolicyValue, absent_bit, auth_type, config_flags, direction, drop_reason,
    endpoint_flags, flow_kind, hook, identity, maps, policy_flags, policy_probes,
};

// Map names must match `keyway_common::maps` (the loader checks every one).
#[map(name = "KEYWAY_IPCACHE")]
static IPCACHE: HashMap<u32, IpcacheValue> = HashMap::pinned(maps::IPCACHE_MAX, BPF_F_NO_PREALLOC);
#[map(name = "KEYWAY_IPCACHE_LPM")]
static IPCACHE_LPM: LpmTrie<Ipv4LpmKey, IpcacheValue> =
    LpmTrie::pinned(maps::IPCACHE_LPM_MAX, BPF_F_NO_PREALLOC);
#[map(name = "KEYWAY_ENDPOINTS")]
static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(maps::ENDPOINTS_MAX, 0);
#[map(name = "KEYWAY_POLICY")]
static POLICY: HashMap<PolicyKey, PolicyValue> = HashMap::pinned(maps::POLICY_MAX, BPF_F_NO_PREALLOC);
#[map(name = "KEYWAY_AUTH")]
static AUTH: HashMap<AuthKey, AuthValue> = HashMap::pinned(maps::AUTH_MAX, BPF_F_NO_PREALLOC);
#[map(name = "KEYWAY_AUTH_DEDUP")]
static AUTH_DEDUP: LruHashMap<AuthKey, u64> = LruHashMap::pinned(maps::AUTH_DEDUP_MAX, 0);
#[map(name = "KEYWAY_SIGNALS")]
static SIGNALS: RingBuf = RingBuf::pinned(maps::SIGNALS_BYTES, 0);
#[map(name = "KEYWAY_FLOWS")]
static FLOWS: RingBuf = RingBuf::pinned(maps::FLOWS_BYTES, 0);
#[map(name = "KEYWAY_FLOW_TABLE")]
static FLOW_TABLE: LruHashMap<FlowKey, FlowState> = LruHashMap::pinned(maps::FLOW_TABLE_MAX, 0);
#[map(name = "KEYWAY_CONFIG")]
static CONFIG: Array<Config> = Array::pinned(1, 0);
#[map(name = "KEYWAY_DROPS")]
static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(maps::DROPS_SLOTS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
/// Fragment offset bits of the IPv4 frag_off field (host order).
const IP_OFFSET_MASK: u16 = 0x1fff;

/// TC ingress of the host-side veth: what the pod sends.
#[classifier]
pub fn keyway_from_pod(ctx: TcContext) -> i32 {
    process(&ctx, hook::FROM_POD)
}

/// TC egress of the host-side veth: what the pod receives.
#[classifier]
pub fn keyway_to_pod(ctx: TcContext) -> i32 {
    process(&ctx, hook::TO_POD)
}

/// Does nothing: the baseline the benchmarks measure the gate against
/// (never attached by the agent).
#[classifier]
pub fn keyway_empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}

/// Only the from-pod source check (the parse and one endpoint-map lookup),
/// so the benchmarks can say what the check costs (never attached by the
/// agent). OK when the source is the interface's own, SHOT otherwise.
#[classifier]
pub fn keyway_source_check(ctx: TcContext) -> i32 {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match parse(&ctx) {
        Ok(Some(pkt)) if owns_source(pkt.src_ip, ifindex) => TC_ACT_OK as i32,
        _ => TC_ACT_SHOT as i32,
    }
}

/// Only the parse: the part of `keyway_source_check` that is not the check.
#[classifier]
pub fn keyway_parse_only(ctx: TcContext) -> i32 {
    match parse(&ctx) {
        Ok(Some(_)) => TC_ACT_OK as i32,
        _ => TC_ACT_SHOT as i32,
    }
}

#[derive(Clone, Copy)]
struct Packet {
    src_ip: u32,
    dst_ip: u32,
    src_port: u16,
    dst_port: u16,
    proto: u8,
}

impl Packet {
    fn reversed(&self) -> Packet {
        Packet {
            src_ip: self.dst_ip,
            dst_ip: self.src_ip,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
        }
    }

    fn key(&self, at: u8, ifindex: u32) -> FlowKey {
        FlowKey {
            src_ip: self.src_ip,
            dst_ip: self.dst_ip,
            src_port: self.src_port,
            dst_port: self.dst_port,
            proto: self.proto,
            hook: at,
            _pad: [0; 2],
            ifindex,
        }
    }
}

/// The outcome of a full evaluation.
#[derive(Clone, Copy)]
struct Verdict {
    forwarded: bool,
    reason: u8,
    rule_id: u32,
    auth_required: bool,
    auth_expiry_ns: u64,
    src_identity: u32,
    dst_identity: u32,
}

const fn opposite(at: u8) -> u8 {
    if at == hook::FROM_POD {
        hook::TO_POD
    } else {
        hook::FROM_POD
    }
}

#[inline(always)]
fn process(ctx: &TcContext, at: u8) -> i32 {
    let cfg = match CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    };
    let pkt = match parse(ctx) {
        Ok(Some(p)) => p,
        Ok(None) => return arp(ctx, at, &cfg),
        Err(reason) => {
            count_drop(reason);
            return TC_ACT_SHOT as i32;
        }
    };
    // At TC ingress and egress of the host-side veth, the veth itself.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // On a bridge, every frame a pod sends teaches the bridge where its
    // source MAC lives: one from another pod's MAC would steer that pod's
    // traffic here. Checked on every packet, cached flows included.
    if at == hook::FROM_POD
        && cfg.flags & config_flags::BRIDGED_PORTS != 0
        && !from_own_mac(ctx, pkt.src_ip, ifindex, 6)
    {
        count_drop(drop_reason::SOURCE_SPOOFED);
        return TC_ACT_SHOT as i32;
    }
    let key = pkt.key(at, ifindex);
    let cached = FLOW_TABLE.get_ptr_mut(&key);
    let mut now = 0u64;
    let mut prev = FlowState::default();
    let mut known = false;
    if let Some(st) = cached {
        // SAFETY: the pointer comes from a successful map lookup and stays
        // valid for this program run; a concurrent update can only change
        // the value, which is read by copy.
        prev = unsafe { *st };
        known = true;
        if cfg.flags & config_flags::NO_VERDICT_CACHE == 0 && prev.forwarded == 1 && prev.epoch == cfg.epoch {
            if prev.auth_expiry_ns == 0 {
                return forward(prev.redirect_ifindex);
            }
            now = unsafe { bpf_ktime_get_ns() };
            if now < prev.auth_expiry_ns {
                return forward(prev.redirect_ifindex);
            }
        }
    }
    if now == 0 {
        now = unsafe { bpf_ktime_get_ns() };
    }

    // What a pod sends must come from one of its own addresses: the ipcache
    // maps addresses to identities, so a forged source would otherwise be
    // judged (and reported) as the pod it impersonates. Same-node traffic is
    // redirected past the stack, so rp_filter never sees it.
    let spoofed = at == hook::FROM_POD && !owns_source(pkt.src_ip, ifindex);
    // On a bridge, L2 decides which port a frame leaves on, and a pod can
    // answer ARP for another pod's address (or the bridge floods a frame
    // it has not learnt yet): a packet for a bridged endpoint is delivered
    // only on that endpoint's own port. Off (no lookup) on nodes with no
    // bridge ports.
    let misdelivered = !spoofed
        && at == hook::TO_POD
        && cfg.flags & config_flags::BRIDGED_PORTS != 0
        && !leaves_on_own_port(pkt.dst_ip, ifindex);
    let refused = spoofed || misdelivered;
    let mut v = if refused {
        let (reason, src_identity) = if spoofed {
            (drop_reason::SOURCE_SPOOFED, identity::UNKNOWN)
        } else {
            (drop_reason::MISDELIVERED, lookup_ip(pkt.src_ip).identity)
        };
        Verdict {
            forwarded: false,
            reason,
            rule_id: 0,
            auth_required: false,
            auth_expiry_ns: 0,
            src_identity,
            dst_identity: lookup_ip(pkt.dst_ip).identity,
        }
    } else {
        evaluate(&cfg, &pkt, at, now, true)
    };
    let mut is_reply = false;
    if !refused && !v.forwarded && known && prev.is_reply == 1 {
        // The reply direction of a flow that was allowed the other way:
        // allowed while the original direction still would be.
        let orig = evaluate(&cfg, &pkt.reversed(), opposite(at), now, false);
        if orig.forwarded {
            v = Verdict {
                src_identity: orig.dst_identity,
                dst_identity: orig.src_identity,
                ..orig
            };
            is_reply = true;
        }
    }
    let redirect_ifindex = if v.forwarded && at == hook::FROM_POD {
        match unsafe { ENDPOINTS.get(&pkt.dst_ip) } {
            Some(ep) if ep.flags & endpoint_flags::BRIDGED == 0 => ep.ifindex,
            _ => 0,
        }
    } else {
        0
    };

    // Flow events: one per new flow and per verdict change; while a flow
    // keeps being dropped, one reminder per report interval.
    let changed = known && (prev.forwarded == 1) != v.forwarded
        || known && !v.forwarded && prev.drop_reason != v.reason;
    let fresh = !known || (prev.last_report_ns == 0 && prev.is_reply == 1);
    let kind = if fresh {
        if is_reply { 0 } else { flow_kind::NEW }
    } else if changed {
        flow_kind::VERDICT_CHANGE
    } else if !v.forwarded && now.wrapping_sub(prev.last_report_ns) >= cfg.flow_report_interval_ns {
        flow_kind::DROP
    } else {
        0
    };
    let mut last_report_ns = prev.last_report_ns;
    if kind != 0 && cfg.flags & config_flags::FLOW_CAPTURE != 0 {
        emit_flow(ctx, &pkt, &v, kind, at, now);
        last_report_ns = now;
    } else if kind != 0 {
        last_report_ns = now;
    }
    let state = FlowState {
        epoch: cfg.epoch,
        forwarded: v.forwarded as u8,
        drop_reason: v.reason,
        is_reply: (is_reply || prev.is_reply == 1) as u8,
        _pad: 0,
        rule_id: v.rule_id,
        redirect_ifindex,
        auth_expiry_ns: v.auth_expiry_ns,
        last_report_ns,
        src_identity: v.src_identity,
        dst_identity: v.dst_identity,
    };
    // Map writes cost more than lookups: write only what changed.
    let unchanged = known
        && prev.epoch == state.epoch
        && prev.forwarded == state.forwarded
        && prev.drop_reason == state.drop_reason
        && prev.is_reply == state.is_reply
        && prev.rule_id == state.rule_id
        && prev.redirect_ifindex == state.redirect_ifindex
        && prev.auth_expiry_ns == state.auth_expiry_ns
        && prev.last_report_ns == state.last_report_ns;
    if !unchanged {
        let _ = FLOW_TABLE.insert(&key, &state, 0);
    }

    if !v.forwarded {
        count_drop(v.reason);
        return TC_ACT_SHOT as i32;
    }
    // Once per flow and epoch: the cached path never gets here again.
    let was_forwarded = known && prev.forwarded == 1 && prev.epoch == cfg.epoch;
    if !is_reply && !was_forwarded {
        // Let the replies of an allowed flow back in, at the other hook of the
        // same veth. Their first packet takes the full path (to find the
        // redirect target) and from then on the cache.
        // A key already known is a flow of its own, first seen in that
        // direction: it is never turned into a reply (which would let it
        // ride on this flow's verdict instead of its own).
        let rkey = pkt.reversed().key(opposite(at), ifindex);
        let placeholder = FlowState {
            is_reply: 1,
            epoch: cfg.epoch.wrapping_sub(1),
            ..FlowState::default()
        };
        let _ = FLOW_TABLE.insert(&rkey, &placeholder, BPF_NOEXIST as u64);
    }
    forward(redirect_ifindex)
}

#[inline(always)]
fn forward(ifindex: u32) -> i32 {
    if ifindex == 0 {
        return TC_ACT_OK as i32;
    }
    // The kernel resolves the next hop's L2 address on the target veth, so
    // the pod sees a well-formed frame from its gateway.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// Identities of both ends, the policy entry of the endpoint this hook
/// guards, and the auth check. `signal` is false when evaluating the
/// original direction of a reply (its misses were signalled already).
#[inline(always)]
fn evaluate(cfg: &Config, pkt: &Packet, at: u8, now: u64, signal: bool) -> Verdict {
    let src = lookup_ip(pkt.src_ip);
    let dst = lookup_ip(pkt.dst_ip);
    let (subject, peer, peer_node, dir, absent) = if at == hook::FROM_POD {
        (
            src.identity,
            dst.identity,
            dst.node_id,
            direction::EGRESS,
            src.absent,
        )
    } else {
        (
            dst.identity,
            src.identity,
            src.node_id,
            direction::INGRESS,
            dst.absent,
        )
    };
    let mut v = Verdict {
        forwarded: false,
        reason: drop_reason::POLICY_DENIED,
        rule_id: 0,
        auth_required: false,
        auth_expiry_ns: 0,
        src_identity: src.identity,
        dst_identity: dst.identity,
    };
    let (rule_id, auth_required) = match lookup_policy(subject, peer, pkt.dst_port, pkt.proto, dir, absent) {
        Some(e) => e,
        None => return v,
    };
    v.rule_id = rule_id;
    if !auth_required {
        v.forwarded = true;
        v.reason = drop_reason::NONE;
        return v;
    }
    v.auth_required = true;
    let node = if peer_node == 0 {
        cfg.local_node_id
    } else {
        peer_node
    };
    let akey = AuthKey {
        local_id: subject,
        remote_id: peer,
        remote_node_id: node,
        auth_type: auth_type::MTLS_SPIFFE,
        _pad: 0,
    };
    if let Some(a) = unsafe { AUTH.get(&akey) } {
        let expiry = a.expiry_ns;
        if now < expiry {
            v.forwarded = true;
            v.reason = drop_reason::NONE;
            v.auth_expiry_ns = expiry;
            return v;
        }
    }
    v.reason = drop_reason::AUTH_REQUIRED;
    if signal {
        signal_missing_auth(cfg, &akey, now);
    }
    v
}

/// False when `src` is a bridged endpoint behind `ifindex` and the MAC at
/// `mac_at` in the frame (6: the Ethernet source) is not that endpoint's.
/// (Whether `src` belongs behind `ifindex` at all is the source check's
/// question.)
#[inline(always)]
fn from_own_mac(ctx: &TcContext, src: u32, ifindex: u32, mac_at: usize) -> bool {
    match unsafe { ENDPOINTS.get(&src) } {
        Some(ep) if ep.flags & endpoint_flags::BRIDGED != 0 && ep.ifindex == ifindex => {
            match ptr_at::<[u8; 6]>(ctx, mac_at) {
                Some(p) => (unsafe { *p }) == ep.mac,
                None => false,
            }
        }
        _ => true,
    }
}

/// Whether `src` is an address of the endpoint behind `ifindex`.
#[inline(always)]
fn owns_source(src: u32, ifindex: u32) -> bool {
    match unsafe { ENDPOINTS.get(&src) } {
        Some(ep) => ep.ifindex == ifindex,
        None => false,
    }
}

/// ARP is never judged by policy. But on a bridge, a pod's ARP must speak
/// for its own address only: a reply or announcement naming another pod's
/// address as its sender would steer that pod's traffic to this port (where
/// the to-pod check would then drop it). So while any attached interface
/// is a bridge port, ARP a pod sends must name one of its own addresses as
/// the sender, from its own MAC. Dropped otherwise as source-spoofed
/// (counted; ARP makes no flow event). That includes address probes
/// (sender 0.0.0.0, RFC 5227): they name no address whose MAC they could be
/// held to, and Linux sends none when an address is added.
#[inline(always)]
fn arp(ctx: &TcContext, at: u8, cfg: &Config) -> i32 {
    if at != hook::FROM_POD || cfg.flags & config_flags::BRIDGED_PORTS == 0 {
        return TC_ACT_OK as i32;
    }
    // Ethernet/IPv4 ARP: hardware and protocol types and sizes, operation
    // and sender hardware address (14 bytes), then the sender's address.
    let spa = match ptr_at::<[u8; 4]>(ctx, ETH_HLEN + 14) {
        Some(p) => u32::from_ne_bytes(unsafe { *p }),
        None => {
            count_drop(drop_reason::MALFORMED);
            return TC_ACT_SHOT as i32;
        }
    };
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // The sender hardware address is what a neighbour's cache takes for
    // `spa`: it, too, must be the pod's own MAC.
    if spa != 0
        && owns_source(spa, ifindex)
        && from_own_mac(ctx, spa, ifindex, 6)
        && from_own_mac(ctx, spa, ifindex, ETH_HLEN + 8)
    {
        return TC_ACT_OK as i32;
    }
    count_drop(drop_reason::SOURCE_SPOOFED);
    TC_ACT_SHOT as i32
}

/// False when `dst` is a bridged local endpoint behind another port.
#[inline(always)]
fn leaves_on_own_port(dst: u32, ifindex: u32) -> bool {
    match unsafe { ENDPOINTS.get(&dst) } {
        Some(ep) => ep.flags & endpoint_flags::BRIDGED == 0 || ep.ifindex == ifindex,
        None => true,
    }
}

#[inline(always)]
fn lookup_ip(ip: u32) -> IpcacheValue {
    if let Some(v) = unsafe { IPCACHE.get(&ip) } {
        return *v;
    }
    let key = Key::new(32, Ipv4LpmKey { addr: ip });
    if let Some(v) = IPCACHE_LPM.get(&key) {
        return *v;
    }
    IpcacheValue {
        identity: identity::WORLD,
        node_id: 0,
        absent: 0,
        _pad: 0,
    }
}

/// Most specific first (`keyway_common::policy_probes`): exact, any port,
/// any peer, any peer and any port. An entry matches when the packet's bit
/// (its port in the block, or its protocol in an any-port entry) is allowed.
/// The packet is allowed when any entry matches, and needs authentication
/// when any matching entry says so: the union of the rules, which is why the
/// lookup goes on after a match without authentication, and stops at the
/// first that requires it or at a final entry. The rule reported is the
/// most specific match's. A probe of a shape the subject has no entry of
/// (`absent`, the subject's ipcache bits, see `IpcacheValue::absent`) is not
/// made: it could only miss.
#[inline(always)]
fn lookup_policy(subject: u32, peer: u32, port: u16, proto: u8, dir: u8, absent: u8) -> Option<(u32, bool)> {
    let probes = policy_probes(subject, peer, u16::from_be(port), proto, dir);
    let mut rule: Option<u32> = None;
    let mut i = 0;
    while i < probes.len() {
        if absent & absent_bit(dir, i as u8) != 0 {
            i += 1;
            continue;
        }
        let (_, key, bit) = probes[i];
        if let Some(v) = unsafe { POLICY.get(&key) } {
            if v.allowed.get(bit) {
                let first = match rule {
                    Some(r) => r,
                    None => v.rule_id,
                };
                rule = Some(first);
                if v.authenticated.get(bit) {
                    return Some((first, true));
                }
            }
            if v.flags & policy_flags::FINAL != 0 {
                break;
            }
        }
        i += 1;
    }
    match rule {
        Some(r) => Some((r, false)),
        None => None,
    }
}

/// At most one signal per key per interval. The check and the write are not
/// one atomic step (the BPF target has no compare-and-swap in Rust), so two
/// CPUs dropping the same pair in the same instant may both signal; the
/// agent keeps one handshake per key in flight, so that costs nothing.
#[inline(always)]
fn signal_missing_auth(cfg: &Config, key: &AuthKey, now: u64) {
    match AUTH_DEDUP.get_ptr_mut(key) {
        Some(last) => {
            // SAFETY: a map value pointer, valid for this program run.
            let seen = unsafe { core::ptr::read_volatile(last) };
            if now.wrapping_sub(seen) < cfg.signal_interval_ns {
                return;
            }
            unsafe { core::ptr::write_volatile(last, now) };
        }
        None => {
            if AUTH_DEDUP.insert(key, &now, BPF_NOEXIST as u64).is_err() {
                return;
            }
        }
    }
    let _ = SIGNALS.output(
        &AuthSignal {
            key: *key,
            _pad: [0; 4],
            ts_ns: now,
        },
        0,
    );
}

#[inline(always)]
fn emit_flow(ctx: &TcContext, pkt: &Packet, v: &Verdict, kind: u8, at: u8, now: u64) {
    let _ = FLOWS.output(
        &FlowEvent {
            ts_ns: now,
            src_ip: pkt.src_ip,
            dst_ip: pkt.dst_ip,
            src_identity: v.src_identity,
            dst_identity: v.dst_identity,
            src_port: pkt.src_port,
            dst_port: pkt.dst_port,
            proto: pkt.proto,
            kind,
            forwarded: v.forwarded as u8,
            drop_reason: v.reason,
            ifindex: unsafe { (*ctx.skb.skb).ifindex },
            rule_id: v.rule_id,
            hook: at,
            auth_required: v.auth_required as u8,
            _pad: [0; 6],
        },
        0,
    );
}

#[inline(always)]
fn count_drop(reason: u8) {
    if let Some(c) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot, only this CPU writes it.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// `Ok(None)`: not ours to judge (ARP). `Err`: drop with this reason.
#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Option<Packet>, u8> {
    let ethertype = match ptr_at::<u16>(ctx, 12) {
        Some(p) => u16::from_be(unsafe { *p }),
        None => return Err(drop_reason::MALFORMED),
    };
    if ethertype == ETH_P_ARP {
        return Ok(None);
    }
    if ethertype != ETH_P_IP {
        return Err(drop_reason::UNSUPPORTED_L3);
    }
    let ip = match ptr_at::<[u8; 20]>(ctx, ETH_HLEN) {
        Some(p) => p,
        None => return Err(drop_reason::MALFORMED),
    };
    let (ihl, proto, frag) = unsafe {
        let h = &*ip;
        (
            ((h[0] & 0x0f) as usize) * 4,
            h[9],
            u16::from_be_bytes([h[6], h[7]]) & IP_OFFSET_MASK,
        )
    };
    if ihl < 20 {
        return Err(drop_reason::MALFORMED);
    }
    let (src_ip, dst_ip) = unsafe {
        let h = ip as *const u8;
        (
            core::ptr::read_unaligned(h.add(12) as *const u32),
            core::ptr::read_unaligned(h.add(16) as *const u32),
        )
    };
    let mut pkt = Packet {
        src_ip,
        dst_ip,
        src_port: 0,
        dst_port: 0,
        proto,
    };
    let has_ports = proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
    if has_ports && frag == 0 {
        let off = ETH_HLEN + (ihl & 0x3c);
        let ports = match ptr_at::<[u16; 2]>(ctx, off) {
            Some(p) => unsafe { *p },
            // Headers beyond the linear part: copy them out.
            None => match ctx.load::<[u16; 2]>(off) {
                Ok(p) => p,
                Err(_) => return Err(drop_reason::MALFORMED),
            },
        };
        pkt.src_port = ports[0];
        pkt.dst_port = ports[1];
    }
    Ok(Some(pkt))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
