//! Keyway's TC programs, one on each side of a pod's host-side veth.
//!
//! Per packet (DESIGN.md section 6): parse Ethernet/IPv4 or IPv6 (walking
//! a bounded chain of extension headers)/L4, look up both identities in the
//! family's ipcache (exact /32 or /128 hash, then the CIDR trie, else
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
//!
//! IPv4 and IPv6 run the same code ([`Family`]) over maps of their own, so
//! an IPv4 packet's keys stay four bytes. ARP and IPv6 link-scope control
//! (neighbour discovery, router solicitation, MLD) are never judged by
//! policy.
#![no_std]
#![no_main]
// BPF load instructions written out, for packet reads the compiler would
// otherwise split into bytes (see `load_ipv6`).
#![feature(asm_experimental_arch)]

use core::mem::size_of;

use aya_ebpf::bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::helpers::r#gen::bpf_jiffies64;
use aya_ebpf::helpers::r#gen::bpf_redirect_neigh;
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf};
use aya_ebpf::programs::TcContext;
use keyway_common::{
    AuthKey, AuthSignal, AuthValue, Config, EndpointInfo, FlowEvent, FlowKey, FlowKey6, FlowState,
    IPV6_MAX_EXT_HEADERS, IpcacheValue, Ipv4LpmKey, Ipv6Key, PolicyKey, PolicyValue, auth_key, config_flags,
    direction, drop_reason, endpoint_flags, flow_kind, hook, icmp_key, identity, maps, prog_index,
    resolve_policy, skipped_probes,
};

// Map names must match `keyway_common::maps` (the loader checks every one).
#[map(name = "KEYWAY_IPCACHE")]
static IPCACHE: HashMap<u32, IpcacheValue> = HashMap::pinned(maps::IPCACHE_MAX, BPF_F_NO_PREALLOC);
#[map(name = "KEYWAY_IPCACHE_LPM")]
static IPCACHE_LPM: LpmTrie<Ipv4LpmKey, IpcacheValue> =
    LpmTrie::pinned(maps::IPCACHE_LPM_MAX, BPF_F_NO_PREALLOC);
#[map(name = "KEYWAY_IPCACHE6")]
static IPCACHE6: HashMap<Ipv6Key, IpcacheValue> = HashMap::pinned(maps::IPCACHE6_MAX, BPF_F_NO_PREALLOC);
#[map(name = "KEYWAY_IPCACHE6_LPM")]
static IPCACHE6_LPM: LpmTrie<Ipv6Key, IpcacheValue> =
    LpmTrie::pinned(maps::IPCACHE6_LPM_MAX, BPF_F_NO_PREALLOC);
#[map(name = "KEYWAY_ENDPOINTS")]
static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(maps::ENDPOINTS_MAX, 0);
#[map(name = "KEYWAY_PORTS")]
static PORTS: HashMap<u32, EndpointInfo> = HashMap::pinned(maps::PORTS_MAX, 0);
#[map(name = "KEYWAY_ENDPOINTS6")]
static ENDPOINTS6: HashMap<Ipv6Key, EndpointInfo> = HashMap::pinned(maps::ENDPOINTS6_MAX, 0);
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
#[map(name = "KEYWAY_FLOW_TABLE6")]
static FLOW_TABLE6: LruHashMap<FlowKey6, FlowState> = LruHashMap::pinned(maps::FLOW_TABLE6_MAX, 0);
#[map(name = "KEYWAY_CONFIG")]
static CONFIG: Array<Config> = Array::pinned(1, 0);
/// The IPv6 programs, tail-called by the IPv4 ones for IPv6 frames
/// ([`keyway_common::prog_index`]): each family's program is verified, and
/// gets its stack, on its own, and IPv4 pays nothing for IPv6.
#[map(name = "KEYWAY_PROGS")]
static PROGS: ProgramArray = ProgramArray::pinned(2, 0);
/// Scratch space for the IPv6 program's flow keys (per CPU, not pinned).
/// The policy key `lookup_policy` probes with, built here rather than on
/// the stack: the IPv6 programs' frames and its own share 512 bytes.
#[map(name = "KEYWAY_SCRATCH_PKEY")]
static SCRATCH_PKEY: PerCpuArray<PolicyKey> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "KEYWAY_SCRATCH6")]
static SCRATCH6: PerCpuArray<FlowKey6> = PerCpuArray::with_max_entries(1, 0);
/// The last ipcache read of a subject (the endpoint a hook guards) at each
/// interface, per CPU and not pinned. The endpoint behind an interface is
/// the subject of nearly every packet it sends or receives, and an array
/// slot costs a few instructions where a hash lookup costs kernel calls.
/// Slot `ifindex % MEMO_SLOTS`; a read is used only for the same
/// interface, address and epoch. The agent bumps the epoch after every
/// ipcache write, and, when an update changes the ipcache and the policy
/// both, also before the policy writes, then waits for the program runs
/// under way (`Datapath::write_tables`): a memo never outlives what it
/// remembers by more than a cached verdict does. The slot also remembers,
/// once the from-pod hook has asked, whether the endpoint map puts the
/// address behind the interface (the source check); the agent bumps the
/// epoch after every endpoint map write too.
#[map(name = "KEYWAY_SUBJECT_MEMO")]
static SUBJECT_MEMO: PerCpuArray<Memo<u32>> = PerCpuArray::with_max_entries(MEMO_SLOTS, 0);
#[map(name = "KEYWAY_SUBJECT_MEMO6")]
static SUBJECT_MEMO6: PerCpuArray<Memo<Ipv6Key>> = PerCpuArray::with_max_entries(MEMO_SLOTS, 0);
const MEMO_SLOTS: u32 = 1024;

/// One remembered ipcache read (see [`SUBJECT_MEMO`]). Zeroed, it matches
/// nothing: no interface has index 0.
#[repr(C)]
#[derive(Clone, Copy)]
struct Memo<A> {
    ifindex: u32,
    epoch: u32,
    addr: A,
    value: IpcacheValue,
    /// [`OWN_UNKNOWN`], [`OWN_YES`] or [`OWN_NO`]: whether `addr` is an
    /// address of the endpoint behind `ifindex`.
    own: u32,
}
const OWN_UNKNOWN: u32 = 0;
const OWN_YES: u32 = 1;
const OWN_NO: u32 = 2;
#[map(name = "KEYWAY_DROPS")]
static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(maps::DROPS_SLOTS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: usize = 40;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
/// Fragment offset bits of the IPv4 frag_off field (host order).
const IP_OFFSET_MASK: u16 = 0x1fff;
const IP_MORE_FRAGMENTS: u16 = 0x2000;

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

/// `keyway_from_pod` for IPv6 frames (tail-called, never attached).
#[classifier]
pub fn keyway_from_pod6(ctx: TcContext) -> i32 {
    run6(&ctx, hook::FROM_POD)
}

/// `keyway_to_pod` for IPv6 frames (tail-called, never attached).
#[classifier]
pub fn keyway_to_pod6(ctx: TcContext) -> i32 {
    run6(&ctx, hook::TO_POD)
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
    match ethertype(&ctx) {
        Ok(ETH_P_IP) => match parse4(&ctx) {
            Ok(pkt) if owns_source(pkt.src_ip, ifindex) => TC_ACT_OK as i32,
            _ => TC_ACT_SHOT as i32,
        },
        Ok(ETH_P_IPV6) => {
            let mut pkt = unparsed6();
            match parse6(&ctx, hook::FROM_POD, &mut pkt) {
                Ok(Parsed6::Packet) if owns_source(pkt.src_ip, ifindex) => TC_ACT_OK as i32,
                _ => TC_ACT_SHOT as i32,
            }
        }
        _ => TC_ACT_SHOT as i32,
    }
}

/// Only the parse: the part of `keyway_source_check` that is not the check.
#[classifier]
pub fn keyway_parse_only(ctx: TcContext) -> i32 {
    match ethertype(&ctx) {
        Ok(ETH_P_IP) if parse4(&ctx).is_ok() => TC_ACT_OK as i32,
        Ok(ETH_P_IPV6)
            if matches!(
                parse6(&ctx, hook::FROM_POD, &mut unparsed6()),
                Ok(Parsed6::Packet)
            ) =>
        {
            TC_ACT_OK as i32
        }
        _ => TC_ACT_SHOT as i32,
    }
}

/// Never attached: the agent runs it (BPF_PROG_TEST_RUN) to tie jiffies
/// to `CLOCK_MONOTONIC` (see [`kernel_ns`]). Writes jiffies, the precise
/// monotonic clock, and jiffies again over the first 24 bytes of the
/// packet it is given (a tick fell between the reads when the two differ),
/// a byte at a time: no alignment is assumed.
#[classifier]
pub fn keyway_clock(ctx: TcContext) -> i32 {
    let Some(p) = ptr_at::<[u64; 3]>(&ctx, 0) else {
        return TC_ACT_SHOT as i32;
    };
    // SAFETY: 24 bytes within the packet (checked just above), which a TC
    // program may write.
    unsafe {
        let before = bpf_jiffies64();
        let ns = bpf_ktime_get_ns();
        let after = bpf_jiffies64();
        core::ptr::write_unaligned(p as *mut [u64; 3], [before, ns, after]);
    }
    TC_ACT_OK as i32
}

/// An address family: its address type and the maps keyed by it. Every
/// function generic over it is compiled once per family.
trait Family: Copy + PartialEq {
    /// 4 or 6, as flow events carry it.
    const FAMILY: u8;
    /// The family's ICMP: its protocol number, echo request and reply types.
    const ICMP: (u8, u8, u8);
    /// The flow table entry of `p` (with `rev`, of its reverse) seen at
    /// hook `at` of `ifindex`.
    fn flow_get(p: &Packet<Self>, rev: bool, at: u8, ifindex: u32) -> Option<*mut FlowState>;
    /// Writes the entry [`Family::flow_get`] finds for `p`.
    fn flow_insert(p: &Packet<Self>, at: u8, ifindex: u32, state: &FlowState);
    /// The exact entry, then the CIDR trie, else WORLD.
    fn ipcache(self) -> IpcacheValue;
    /// This CPU's memo slot for the subject at `ifindex` (see [`SUBJECT_MEMO`]).
    fn memo(ifindex: u32) -> Option<*mut Memo<Self>>;
    fn endpoint(self) -> Option<&'static EndpointInfo>;
    /// The address as a flow event carries it.
    fn event_bytes(self) -> [u8; 16];
    /// `self == other`, word by word and without branches.
    fn same(&self, other: &Self) -> bool;
}

const WORLD: IpcacheValue = IpcacheValue {
    identity: identity::WORLD,
    node_id: 0,
    absent: 0,
    _pad: 0,
    unnamed_by: [0; 2],
};

impl Family for u32 {
    const FAMILY: u8 = 4;
    const ICMP: (u8, u8, u8) = (IPPROTO_ICMP, 8, 0);

    #[inline(always)]
    fn flow_get(p: &Packet<u32>, rev: bool, at: u8, ifindex: u32) -> Option<*mut FlowState> {
        FLOW_TABLE.get_ptr_mut(&flow_key4(p, rev, at, ifindex))
    }

    #[inline(always)]
    fn flow_insert(p: &Packet<u32>, at: u8, ifindex: u32, state: &FlowState) {
        let _ = FLOW_TABLE.insert(&flow_key4(p, false, at, ifindex), state, 0);
    }

    #[inline(always)]
    fn ipcache(self) -> IpcacheValue {
        if let Some(v) = unsafe { IPCACHE.get(&self) } {
            return copy_ipcache(v);
        }
        match IPCACHE_LPM.get(&Key::new(32, Ipv4LpmKey { addr: self })) {
            Some(v) => copy_ipcache(v),
            None => WORLD,
        }
    }

    #[inline(always)]
    fn memo(ifindex: u32) -> Option<*mut Memo<Self>> {
        SUBJECT_MEMO.get_ptr_mut(ifindex % MEMO_SLOTS)
    }

    #[inline(always)]
    fn endpoint(self) -> Option<&'static EndpointInfo> {
        unsafe { ENDPOINTS.get(&self) }
    }

    #[inline(always)]
    fn event_bytes(self) -> [u8; 16] {
        let b = self.to_ne_bytes();
        [b[0], b[1], b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    }

    #[inline(always)]
    fn same(&self, other: &Self) -> bool {
        self == other
    }
}

impl Family for Ipv6Key {
    const FAMILY: u8 = 6;
    const ICMP: (u8, u8, u8) = (IPPROTO_ICMPV6, 128, 129);

    #[inline(always)]
    fn flow_get(p: &Packet<Ipv6Key>, rev: bool, at: u8, ifindex: u32) -> Option<*mut FlowState> {
        FLOW_TABLE6.get_ptr_mut(flow_key6(p, rev, at, ifindex)?)
    }

    #[inline(always)]
    fn flow_insert(p: &Packet<Ipv6Key>, at: u8, ifindex: u32, state: &FlowState) {
        if let Some(key) = flow_key6(p, false, at, ifindex) {
            let _ = FLOW_TABLE6.insert(key, state, 0);
        }
    }

    #[inline(always)]
    fn ipcache(self) -> IpcacheValue {
        if let Some(v) = unsafe { IPCACHE6.get(&self) } {
            return copy_ipcache(v);
        }
        match IPCACHE6_LPM.get(&Key::new(128, self)) {
            Some(v) => copy_ipcache(v),
            None => WORLD,
        }
    }

    #[inline(always)]
    fn memo(ifindex: u32) -> Option<*mut Memo<Self>> {
        SUBJECT_MEMO6.get_ptr_mut(ifindex % MEMO_SLOTS)
    }

    #[inline(always)]
    fn endpoint(self) -> Option<&'static EndpointInfo> {
        unsafe { ENDPOINTS6.get(&self) }
    }

    #[inline(always)]
    fn event_bytes(self) -> [u8; 16] {
        self.addr
    }

    #[inline(always)]
    fn same(&self, other: &Self) -> bool {
        let (a, b) = (words(self), words(other));
        (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) == 0
    }
}

/// An ipcache value read out of its map, field by field: a whole-value copy
/// is split at the padding byte, and the nine bytes from there on are
/// copied one at a time.
#[inline(always)]
fn copy_ipcache(v: &IpcacheValue) -> IpcacheValue {
    IpcacheValue {
        identity: v.identity,
        node_id: v.node_id,
        absent: v.absent,
        _pad: 0,
        unnamed_by: v.unnamed_by,
    }
}

/// An IPv6 key as the four 32-bit words it is moved and compared in (the
/// bytes in memory order).
#[inline(always)]
fn words(k: &Ipv6Key) -> [u32; 4] {
    // SAFETY: `Ipv6Key` is 16 bytes aligned to 4, with no padding.
    unsafe { *(k as *const Ipv6Key as *const [u32; 4]) }
}

/// The 4 packet bytes at `p` as a `u32` in memory order, in one load. The
/// caller has checked that they are within the packet (the verifier checks
/// it too). Written as a BPF instruction because Rust cannot know the
/// alignment: `read_unaligned` compiles to byte loads on a target without
/// unaligned access. The kernel takes unaligned packet loads where the
/// architecture handles them, and where it does not, it checks alignment as
/// if the IP header were 4-byte aligned (NET_IP_ALIGN), which puts every
/// word this reads at a multiple of four: IPv4 addresses at 26 and 30 into
/// the frame, IPv6 ones at 22 and 38, an ICMPv6 error's quoted ones at 70
/// and 86, and the transport header (ports) after any of them.
#[inline(always)]
unsafe fn load_u32(p: *const u8) -> u32 {
    let v: u64;
    // SAFETY: a load only, of bytes the caller vouches for.
    unsafe {
        core::arch::asm!(
            "{v} = *(u32 *)({p} + 0)",
            p = in(reg) p,
            v = out(reg) v,
            options(nostack, readonly, preserves_flags),
        );
    }
    v as u32
}

/// The IPv6 address in the 16 packet bytes at `p`, in four [`load_u32`]s.
#[inline(always)]
unsafe fn load_ipv6(p: *const u8) -> Ipv6Key {
    // SAFETY: loads of bytes the caller vouches for; four words are an
    // `Ipv6Key` (16 bytes, aligned to 4).
    unsafe {
        let w = [
            load_u32(p),
            load_u32(p.add(4)),
            load_u32(p.add(8)),
            load_u32(p.add(12)),
        ];
        core::mem::transmute::<[u32; 4], Ipv6Key>(w)
    }
}

#[inline(always)]
fn flow_key4(p: &Packet<u32>, rev: bool, at: u8, ifindex: u32) -> FlowKey {
    let (src_ip, dst_ip, src_port, dst_port) = p.ends(rev);
    FlowKey {
        src_ip,
        dst_ip,
        src_port: src_port | p.echo_id,
        dst_port: dst_port | p.echo_id,
        proto: p.proto,
        hook: at,
        icmp: icmp_of(p.icmp, rev),
        ifindex,
    }
}

/// An IPv6 flow key, built in this CPU's scratch slot: the IPv6 program's
/// stack has no room for one. Valid until the next call on this CPU (a
/// program run is never preempted by another on the same CPU).
#[inline(always)]
fn flow_key6(p: &Packet<Ipv6Key>, rev: bool, at: u8, ifindex: u32) -> Option<&'static FlowKey6> {
    let k = SCRATCH6.get_ptr_mut(0)?;
    let (src_ip, dst_ip, src_port, dst_port) = p.ends(rev);
    // SAFETY: this CPU's slot of a per-CPU array; nothing else runs on this
    // CPU while the program does.
    unsafe {
        (*k).src_ip = src_ip;
        (*k).dst_ip = dst_ip;
        (*k).src_port = src_port | p.echo_id;
        (*k).dst_port = dst_port | p.echo_id;
        (*k).proto = p.proto;
        (*k).hook = at;
        (*k).icmp = icmp_of(p.icmp, rev);
        (*k).ifindex = ifindex;
        Some(&*k)
    }
}

/// The flow key's `icmp` bytes of a packet (with `rev`, of its reverse)
/// from [`Packet::icmp`].
#[inline(always)]
fn icmp_of(icmp: u32, rev: bool) -> [u8; 2] {
    let b = icmp.to_ne_bytes();
    if rev { [b[2], b[3]] } else { [b[0], b[1]] }
}

#[derive(Clone, Copy)]
struct Packet<A: Family> {
    src_ip: A,
    dst_ip: A,
    /// Network byte order; 0 for protocols without ports (what policy
    /// matches).
    src_port: u16,
    dst_port: u16,
    proto: u8,
    /// The `icmp` bytes of the packet's flow key, then of its reverse's
    /// (see [`icmp_key`] and [`icmp_of`]); 0 when no ICMP header was read.
    icmp: u32,
    /// An ICMP message's 16 bits after the checksum (an echo's identifier),
    /// else 0: in both ports of the flow key, so that an echo reply matches
    /// only its request.
    echo_id: u16,
}

impl<A: Family> Packet<A> {
    /// Source and destination addresses and ports, swapped with `rev` (the
    /// reply direction's).
    #[inline(always)]
    fn ends(&self, rev: bool) -> (A, A, u16, u16) {
        if rev {
            (self.dst_ip, self.src_ip, self.dst_port, self.src_port)
        } else {
            (self.src_ip, self.dst_ip, self.src_port, self.dst_port)
        }
    }
}

/// An IPv6 packet for `parse6` to fill in: all zero, so that every field
/// is defined whatever it finds. (A packet returned inside an enum is
/// undefined on the enum's other paths, and the compiler may spill those
/// registers unset there, which the verifier refuses.)
#[inline(always)]
fn unparsed6() -> Packet<Ipv6Key> {
    Packet {
        src_ip: Ipv6Key::default(),
        dst_ip: Ipv6Key::default(),
        src_port: 0,
        dst_port: 0,
        proto: 0,
        icmp: 0,
        echo_id: 0,
    }
}

/// What `parse6` found.
enum Parsed6 {
    /// A packet to judge, in the `Packet` it was given.
    Packet,
    /// IPv6 link-scope control that stays on the link: neighbour discovery
    /// and router messages (hop limit 255) or MLD (hop limit 1), never
    /// judged by policy: [`link_control`]'s verdict on the address it
    /// speaks for (a neighbour advertisement's target, else the source).
    LinkControl(i32),
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
    match ethertype(ctx) {
        Ok(ETH_P_IP) => run4(ctx, at),
        Ok(ETH_P_IPV6) => {
            let index = if at == hook::FROM_POD {
                prog_index::FROM_POD6
            } else {
                prog_index::TO_POD6
            };
            // Does not return unless the IPv6 program is missing: then
            // IPv6 is not let through unjudged.
            let _ = unsafe { PROGS.tail_call(ctx, index) };
            shot(drop_reason::UNSUPPORTED_L3)
        }
        Ok(ETH_P_ARP) => arp(ctx, at),
        Ok(_) => shot(drop_reason::UNSUPPORTED_L3),
        Err(reason) => shot(reason),
    }
}

/// Counts a drop for `reason` and drops.
#[inline(always)]
fn shot(reason: u8) -> i32 {
    count_drop(reason);
    TC_ACT_SHOT as i32
}

#[inline(always)]
fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    }
}

#[inline(always)]
fn run4(ctx: &TcContext, at: u8) -> i32 {
    match parse4(ctx) {
        Ok(pkt) => {
            let cfg = config();
            if at == hook::TO_POD && pkt.proto == IPPROTO_ICMP && related4(ctx, &cfg, &pkt) {
                return TC_ACT_OK as i32;
            }
            judge(ctx, at, &cfg, pkt)
        }
        Err(reason) => shot(reason),
    }
}

#[inline(always)]
fn run6(ctx: &TcContext, at: u8) -> i32 {
    let mut pkt = unparsed6();
    match parse6(ctx, at, &mut pkt) {
        Ok(Parsed6::Packet) => {
            let cfg = config();
            if at == hook::TO_POD && pkt.proto == IPPROTO_ICMPV6 && related6(ctx, &cfg, &pkt) {
                return TC_ACT_OK as i32;
            }
            judge(ctx, at, &cfg, pkt)
        }
        Ok(Parsed6::LinkControl(verdict)) => verdict,
        Err(reason) => shot(reason),
    }
}

/// ICMP errors for a pod: destination unreachable (fragmentation needed
/// included), time exceeded, parameter problem, and in ICMPv6 packet too
/// big. Each quotes the packet it is about, one the pod sent. The error is
/// let through when that packet's flow is one this datapath forwarded from
/// this pod, at this interface, in the current epoch, its authentication
/// unexpired: what conntrack calls related. The error must be addressed to
/// the quoted packet's source, and nothing is cached for it. Anything else
/// is judged as the ICMP packet it is. Path MTU discovery needs this: the
/// router that sends a packet too big is no peer any policy names, and
/// without it a path with a smaller MTU is a black hole.
///
/// Only errors that fit in the linear part of the packet are matched (a
/// node's own errors are), the quoted IPv4 header without options, the
/// ICMPv6 error right after the IPv6 header and the quoted IPv6 header
/// followed by its transport header.
#[inline(always)]
fn related4(ctx: &TcContext, cfg: &Config, pkt: &Packet<u32>) -> bool {
    let Some(ip) = ptr_at::<[u8; 20]>(ctx, ETH_HLEN) else {
        return false;
    };
    let (ihl, frag) = unsafe {
        (
            (((*ip)[0] & 0x0f) as usize) * 4,
            u16::from_be_bytes([(*ip)[6], (*ip)[7]]),
        )
    };
    // Not a fragment, first or later: a real error is never fragmented.
    if frag & (IP_OFFSET_MASK | IP_MORE_FRAGMENTS) != 0 {
        return false;
    }
    // The ICMP header, the quoted IPv4 header and its first eight bytes
    // (an echo request's identifier included).
    let Some(q) = ptr_at::<[u8; 36]>(ctx, ETH_HLEN + (ihl & 0x3c)) else {
        return false;
    };
    let q = unsafe { &*q };
    if !(q[0] == 3 || q[0] == 11 || q[0] == 12) || q[8] != 0x45 {
        return false;
    }
    if u16::from_be_bytes([q[14], q[15]]) & IP_OFFSET_MASK != 0 {
        return false;
    }
    let proto = q[17];
    let with_ports = has_ports(proto);
    // A portless flow's key names no connection: of those, only an error
    // about an echo request the pod sent.
    let echo = proto == IPPROTO_ICMP && q[28] == 8;
    if !with_ports && !echo {
        return false;
    }
    let inner = Packet {
        src_ip: u32::from_ne_bytes([q[20], q[21], q[22], q[23]]),
        dst_ip: u32::from_ne_bytes([q[24], q[25], q[26], q[27]]),
        src_port: if with_ports {
            u16::from_ne_bytes([q[28], q[29]])
        } else {
            0
        },
        dst_port: if with_ports {
            u16::from_ne_bytes([q[30], q[31]])
        } else {
            0
        },
        proto,
        icmp: if echo {
            u32::from_ne_bytes([8, icmp_key::MESSAGE, 0, 0])
        } else {
            0
        },
        echo_id: if echo {
            u16::from_ne_bytes([q[32], q[33]])
        } else {
            0
        },
    };
    if inner.src_ip != pkt.dst_ip {
        return false;
    }
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    live(
        cfg,
        <u32 as Family>::flow_get(&inner, false, hook::FROM_POD, ifindex),
    )
}

/// [`related4`] for IPv6; the quoted flow's key is built in the scratch
/// slot, as the IPv6 program's stack has no room for it.
#[inline(always)]
fn related6(ctx: &TcContext, cfg: &Config, pkt: &Packet<Ipv6Key>) -> bool {
    // Right after the fixed header: no extension header between.
    let Some(next) = ptr_at::<u8>(ctx, ETH_HLEN + 6) else {
        return false;
    };
    if unsafe { *next } != IPPROTO_ICMPV6 {
        return false;
    }
    // The ICMPv6 header, the quoted IPv6 header and eight bytes after it.
    let Some(q) = ptr_at::<[u8; 56]>(ctx, ETH_HLEN + IPV6_HLEN) else {
        return false;
    };
    let q = q as *const u8;
    let (t, proto) = unsafe { (*q, *q.add(14)) };
    if !(1..=4).contains(&t) {
        return false;
    }
    let with_ports = has_ports(proto);
    let echo = proto == IPPROTO_ICMPV6 && unsafe { *q.add(48) } == 128;
    if !with_ports && !echo {
        return false;
    }
    let Some(k) = SCRATCH6.get_ptr_mut(0) else {
        return false;
    };
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: `q` is within the packet (checked by `ptr_at`); `k` is this
    // CPU's scratch slot (see `flow_key6`).
    unsafe {
        let src = load_ipv6(q.add(16));
        if !src.same(&pkt.dst_ip) {
            return false;
        }
        (*k).src_ip = src;
        (*k).dst_ip = load_ipv6(q.add(32));
        // An echo request's key has its identifier in both ports.
        let (sport, dport) = if echo { (52, 52) } else { (48, 50) };
        (*k).src_port = core::ptr::read_unaligned(q.add(sport) as *const u16);
        (*k).dst_port = core::ptr::read_unaligned(q.add(dport) as *const u16);
        (*k).proto = proto;
        (*k).hook = hook::FROM_POD;
        (*k).icmp = if echo {
            [128, icmp_key::MESSAGE]
        } else {
            [0, icmp_key::NONE]
        };
        (*k).ifindex = ifindex;
        live(cfg, FLOW_TABLE6.get_ptr_mut(&*k))
    }
}

/// Whether a flow table entry is a verdict to forward that still holds.
#[inline(always)]
fn live(cfg: &Config, st: Option<*mut FlowState>) -> bool {
    let Some(st) = st else {
        return false;
    };
    // SAFETY: from a successful map lookup, valid for this program run.
    let (forwarded, epoch, expiry) = unsafe { ((*st).forwarded, (*st).epoch, (*st).auth_expiry_ns) };
    forwarded == 1 && epoch == cfg.epoch && (expiry == 0 || kernel_ns(cfg) < expiry)
}

#[inline(always)]
fn judge<A: Family>(ctx: &TcContext, at: u8, cfg: &Config, pkt: Packet<A>) -> i32 {
    let cfg = *cfg;
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
    let cached = A::flow_get(&pkt, false, at, ifindex);
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
            now = kernel_ns(&cfg);
            if now < prev.auth_expiry_ns {
                return forward(prev.redirect_ifindex);
            }
        }
    }
    // The clock is read only when something needs it (an auth entry's
    // expiry, a drop's report interval, an event): a helper call costs as
    // much as a map lookup here, and an allowed flow with no
    // authentication needs none.

    // What a pod sends must come from one of its own addresses: the ipcache
    // maps addresses to identities, so a forged source would otherwise be
    // judged (and reported) as the pod it impersonates. Same-node traffic is
    // redirected past the stack, so rp_filter never sees it.
    let spoofed = at == hook::FROM_POD && !owns_source_memo(pkt.src_ip, ifindex, &cfg);
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
            (drop_reason::MISDELIVERED, pkt.src_ip.ipcache().identity)
        };
        Verdict {
            forwarded: false,
            reason,
            rule_id: 0,
            auth_required: false,
            auth_expiry_ns: 0,
            src_identity,
            dst_identity: pkt.dst_ip.ipcache().identity,
        }
    } else {
        evaluate(&cfg, &pkt, ifindex, at, &mut now, true, false)
    };
    // The reply direction of a flow allowed the other way: decided on a
    // flow's first packet by the other direction's entry, and remembered
    // in its own. A key already forwarded as a flow of its own, first seen
    // in this direction, is never turned into a reply (which would let it
    // ride on the other flow's verdict instead of its own). A key only
    // ever dropped is no flow yet, as conntrack confirms no entry for a
    // dropped packet: otherwise whoever sends the reverse tuple first (a
    // host off the cluster forging a server's address, one port after
    // another) would keep the replies of a pod's later flows out.
    let settled = known & (prev.forwarded | prev.is_reply != 0);
    let reply_dir = if settled {
        prev.is_reply == 1
    } else {
        !refused && allowed_other_way(&pkt, at, ifindex)
    };
    let mut is_reply = false;
    if !refused && !v.forwarded && reply_dir {
        // Allowed while the original direction still would be.
        let orig = evaluate(&cfg, &pkt, ifindex, opposite(at), &mut now, false, true);
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
        match pkt.dst_ip.endpoint() {
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
    } else if !v.forwarded
        && clock(&cfg, &mut now).wrapping_sub(prev.last_report_ns) >= cfg.flow_report_interval_ns
    {
        flow_kind::DROP
    } else {
        0
    };
    let mut last_report_ns = prev.last_report_ns;
    if kind != 0 && cfg.flags & config_flags::FLOW_CAPTURE != 0 {
        emit_flow(ifindex, &pkt, &v, kind, at, clock(&cfg, &mut now));
        last_report_ns = now;
    } else if kind != 0 {
        last_report_ns = clock(&cfg, &mut now);
    }
    let state = FlowState {
        epoch: cfg.epoch,
        forwarded: v.forwarded as u8,
        drop_reason: v.reason,
        is_reply: (is_reply || reply_dir) as u8,
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
        A::flow_insert(&pkt, at, ifindex, &state);
    }

    if !v.forwarded {
        count_drop(v.reason);
        return TC_ACT_SHOT as i32;
    }
    forward(redirect_ifindex)
}

/// Whether the reverse of `pkt`, at the other hook of the same interface,
/// is a flow of its own (not itself a reply) that was forwarded: then `pkt`
/// is its reply. Looked up on the first packet of every flow and on every
/// packet of a flow only ever dropped, rather than an entry written for the
/// reply of every new flow on the chance of one: a flow-table write costs
/// several lookups.
#[inline(always)]
fn allowed_other_way<A: Family>(pkt: &Packet<A>, at: u8, ifindex: u32) -> bool {
    match A::flow_get(pkt, true, opposite(at), ifindex) {
        // SAFETY: from a successful map lookup, valid for this program run.
        Some(st) => unsafe { (*st).forwarded == 1 && (*st).is_reply == 0 },
        None => false,
    }
}

/// [`kernel_ns`], read into `now` the first time a run needs it (0: not
/// yet).
#[inline(always)]
fn clock(cfg: &Config, now: &mut u64) -> u64 {
    if *now == 0 {
        *now = kernel_ns(cfg);
    }
    *now
}

/// The datapath's clock: `CLOCK_MONOTONIC` at tick resolution, what the
/// agent writes auth expiries in. From jiffies, as the agent has tied them
/// to that clock (`Config::jiffy_ns`): the verifier turns `bpf_jiffies64`
/// into one load, where a helper call (`bpf_ktime_get_coarse_ns`) costs as
/// much as a map lookup. The kernel moves jiffies on by one for every tick
/// of monotonic time, so this reads at most a tick behind (and, from how the
/// agent measures the tie, microseconds ahead at most). The agent writes
/// the tie before any program can run. Without it (a zero `jiffy_ns`) the
/// clock reads the end of time: every auth entry has expired, and nothing
/// that needs one passes.
#[inline(always)]
fn kernel_ns(cfg: &Config) -> u64 {
    let jiffies = unsafe { bpf_jiffies64() };
    let j = cfg.jiffy_ns;
    // All ones when `j` is 0, else 0 (`j | -j` has the top bit set for any
    // other value). Written out as instructions: the compiler turns the
    // same arithmetic in Rust back into a branch, one more path for the
    // verifier through everything after each read of the clock.
    let unset: u64;
    // SAFETY: register arithmetic only.
    unsafe {
        core::arch::asm!(
            "{u} = {j}",
            "{u} = -{u}",
            "{u} |= {j}",
            "{u} >>= 63",
            "{u} ^= 1",
            "{u} = -{u}",
            j = in(reg) j,
            u = out(reg) unset,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    jiffies.wrapping_mul(j).wrapping_add(cfg.clock_base_ns) | unset
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

/// [`Family::ipcache`] of `addr`, the subject at `ifindex`, through this
/// CPU's memo of the last one read there (see [`SUBJECT_MEMO`]).
#[inline(always)]
fn subject_of<A: Family>(addr: &A, ifindex: u32, cfg: &Config) -> IpcacheValue {
    if cfg.flags & config_flags::NO_SUBJECT_MEMO != 0 {
        return addr.ipcache();
    }
    let Some(m) = A::memo(ifindex) else {
        return addr.ipcache();
    };
    // SAFETY: this CPU's slot, valid for this run; a program run does not
    // migrate, and no other run on this CPU interleaves with it (the
    // per-CPU scratch maps rely on the same).
    let m = unsafe { &mut *m };
    if m.ifindex == ifindex && m.epoch == cfg.epoch && m.addr.same(addr) {
        return m.value;
    }
    let value = addr.ipcache();
    memo_fill(m, ifindex, cfg.epoch, *addr, value, OWN_UNKNOWN);
    value
}

/// Makes `m` remember `addr` at `ifindex` in `epoch`. Field by field: a
/// whole `Memo` built first would take stack the IPv6 programs do not have.
#[inline(always)]
fn memo_fill<A: Family>(m: &mut Memo<A>, ifindex: u32, epoch: u32, addr: A, value: IpcacheValue, own: u32) {
    m.ifindex = ifindex;
    m.epoch = epoch;
    m.addr = addr;
    m.value = value;
    m.own = own;
}

/// [`owns_source`] through this CPU's memo of the subject at `ifindex`
/// (see [`SUBJECT_MEMO`]), which a pod's own source is at the from-pod
/// hook. A source that is not the pod's never takes the slot: a pod
/// forging addresses would otherwise only evict its own memo.
#[inline(always)]
fn owns_source_memo<A: Family>(src: A, ifindex: u32, cfg: &Config) -> bool {
    if cfg.flags & config_flags::NO_SUBJECT_MEMO != 0 {
        return owns_source(src, ifindex);
    }
    let Some(m) = A::memo(ifindex) else {
        return owns_source(src, ifindex);
    };
    // SAFETY: as in `subject_of`.
    let m = unsafe { &mut *m };
    let hit = m.ifindex == ifindex && m.epoch == cfg.epoch && m.addr.same(&src);
    if hit && m.own != OWN_UNKNOWN {
        return m.own == OWN_YES;
    }
    let own = owns_source(src, ifindex);
    if hit {
        m.own = if own { OWN_YES } else { OWN_NO };
    } else if own {
        memo_fill(m, ifindex, cfg.epoch, src, src.ipcache(), OWN_YES);
    }
    own
}

/// Identities of both ends, the policy entry of the endpoint this hook
/// guards, and the auth check, of `pkt` or with `rev` of its reverse.
/// `signal` is false when evaluating the original direction of a reply
/// (its misses were signalled already).
#[inline(always)]
fn evaluate<A: Family>(
    cfg: &Config,
    pkt: &Packet<A>,
    ifindex: u32,
    at: u8,
    now: &mut u64,
    signal: bool,
    rev: bool,
) -> Verdict {
    let (src_ip, dst_ip, _, dst_port) = pkt.ends(rev);
    let (subject_ip, peer_ip, dir) = if at == hook::FROM_POD {
        (src_ip, dst_ip, direction::EGRESS)
    } else {
        (dst_ip, src_ip, direction::INGRESS)
    };
    let s = subject_of(&subject_ip, ifindex, cfg);
    let p = peer_ip.ipcache();
    let (subject, peer, peer_node) = (s.identity, p.identity, p.node_id);
    // And for a peer this subject does not name, the pair's own keys.
    let absent = skipped_probes(s.absent, &p.unnamed_by, subject, dir);
    let (src_identity, dst_identity) = if at == hook::FROM_POD {
        (subject, peer)
    } else {
        (peer, subject)
    };
    let mut v = Verdict {
        forwarded: false,
        reason: drop_reason::POLICY_DENIED,
        rule_id: 0,
        auth_required: false,
        auth_expiry_ns: 0,
        src_identity,
        dst_identity,
    };
    let found = lookup_policy(
        subject,
        peer,
        u64::from(u16::from_be(dst_port))
            | u64::from(pkt.proto) << 16
            | u64::from(dir) << 24
            | u64::from(absent) << 32,
    );
    if found == 0 {
        return v;
    }
    let (rule_id, auth_required) = (found as u32, found & POLICY_AUTH != 0);
    v.rule_id = rule_id;
    if !auth_required {
        v.forwarded = true;
        v.reason = drop_reason::NONE;
        return v;
    }
    v.auth_required = true;
    let akey = auth_key(subject, peer, peer_node, cfg.local_node_id);
    if let Some(a) = unsafe { AUTH.get(&akey) } {
        let expiry = a.expiry_ns;
        if clock(cfg, now) < expiry {
            v.forwarded = true;
            v.reason = drop_reason::NONE;
            v.auth_expiry_ns = expiry;
            return v;
        }
    }
    v.reason = drop_reason::AUTH_REQUIRED;
    if signal {
        signal_missing_auth(cfg, &akey, clock(cfg, now));
    }
    v
}

/// False when `src` is a bridged endpoint behind `ifindex` and the MAC at
/// `mac_at` in the frame (6: the Ethernet source) is not that endpoint's.
/// (Whether `src` belongs behind `ifindex` at all is the source check's
/// question.)
#[inline(always)]
fn from_own_mac<A: Family>(ctx: &TcContext, src: A, ifindex: u32, mac_at: usize) -> bool {
    match src.endpoint() {
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
fn owns_source<A: Family>(src: A, ifindex: u32) -> bool {
    match src.endpoint() {
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
fn arp(ctx: &TcContext, at: u8) -> i32 {
    if at != hook::FROM_POD || config().flags & config_flags::BRIDGED_PORTS == 0 {
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

/// IPv6 neighbour discovery, router solicitation and MLD are to IPv6 what
/// ARP is to IPv4: never judged by policy. `parse6` only calls a packet
/// that when its hop limit says it cannot have been routed (255 for
/// neighbour discovery, as RFC 4861 makes receivers require; 1 for MLD),
/// and, from a pod, only when it stays on the link: a router forwards a
/// neighbour solicitation like any other packet, so one a pod sends to an
/// address off its link is judged as the ICMPv6 packet it is.
///
/// On a bridge, like ARP, what a pod sends must speak for its own
/// addresses, from its own MAC: the address a message speaks for (`claim`:
/// an advertisement's target, else the source), unless link-local or
/// unspecified, must be the pod's own. Otherwise a pod could advertise
/// another pod's address with its own MAC and have the neighbours send it
/// that pod's traffic. And the frame must come from the MAC of the pod
/// placed behind the port, whatever it claims: the bridge learns where a
/// MAC lives from every frame, a router solicitation from a link-local
/// address included. Dropped as source-spoofed.
#[inline(always)]
fn link_control(ctx: &TcContext, at: u8, claim: Ipv6Key) -> i32 {
    if at != hook::FROM_POD || config().flags & config_flags::BRIDGED_PORTS == 0 {
        return TC_ACT_OK as i32;
    }
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let ok = if is_link_scope(&claim) || claim.same(&Ipv6Key::default()) {
        match unsafe { PORTS.get(&ifindex) } {
            // A routed pod's interface, which no bridge learns from.
            Some(port) if port.flags & endpoint_flags::ROUTED != 0 => true,
            // A bridge port: only from the MAC of the pod placed behind it
            // (none placed: nothing).
            Some(port) => {
                port.flags & endpoint_flags::BRIDGED != 0
                    && match ptr_at::<[u8; 6]>(ctx, 6) {
                        Some(p) => (unsafe { *p }) == port.mac,
                        None => false,
                    }
            }
            // An interface the agent has not written yet: nothing.
            None => false,
        }
    } else {
        owns_source(claim, ifindex) && from_own_mac(ctx, claim, ifindex, 6)
    };
    if ok {
        return TC_ACT_OK as i32;
    }
    shot(drop_reason::SOURCE_SPOOFED)
}

/// fe80::/10 (link-local unicast) or ff02::/16 (link-local multicast).
#[inline(always)]
fn is_link_scope(a: &Ipv6Key) -> bool {
    (a.addr[0] == 0xfe && a.addr[1] & 0xc0 == 0x80) || (a.addr[0] == 0xff && a.addr[1] & 0x0f == 0x02)
}

/// False when `dst` is a bridged local endpoint behind another port.
#[inline(always)]
fn leaves_on_own_port<A: Family>(dst: A, ifindex: u32) -> bool {
    match dst.endpoint() {
        Some(ep) => ep.flags & endpoint_flags::BRIDGED == 0 || ep.ifindex == ifindex,
        None => true,
    }
}

/// Most specific first (`keyway_common::policy_probes`): exact, any port,
/// any peer, any peer and any port. An entry matches when the packet's bit
/// (its port in the block, or its protocol in an any-port entry) is allowed.
/// [`lookup_policy`]'s result bits: the packet is allowed (the rule is
/// the low 32 bits), and it needs authentication.
const POLICY_ALLOWED: u64 = 1 << 32;
const POLICY_AUTH: u64 = 1 << 33;

/// `keyway_common::resolve_policy`, the lookup `explain` makes too: the
/// first entry found, in `policy_probes` order, decides (the agent compiled
/// into it what every less specific entry the packet also matches says), so
/// a pair the subject's policy names costs one lookup. A probe of a shape
/// the subject has no entry of (`absent`, the subject's ipcache bits, see
/// `IpcacheValue::absent`) is not made: it could only miss. Each key is
/// built in per-CPU scratch, not on the stack.
///
/// `packed` is the destination port (host order) | proto << 16 | direction
/// << 24 | absent << 32; returns 0 when the packet is not allowed, else the
/// rule | [`POLICY_ALLOWED`] (| [`POLICY_AUTH`]). Inlined: a BPF-to-BPF
/// call and return cost about 7 ns here (the return goes through the
/// kernel's return thunk on CPUs that need one). It was a function of its
/// own while the reply placeholder's write made the verifier walk the rest
/// of the program twice; inlined then, it took both IPv4 programs over the
/// verifier's million instructions, and now verifies in fewer than the
/// call did.
#[inline(always)]
fn lookup_policy(subject: u32, peer: u32, packed: u64) -> u64 {
    let port = packed as u16;
    let proto = (packed >> 16) as u8;
    let dir = (packed >> 24) as u8;
    let absent = (packed >> 32) as u8;
    let Some(key) = SCRATCH_PKEY.get_ptr_mut(0) else {
        return 0;
    };
    let found = resolve_policy(subject, peer, port, proto, dir, absent, |k| {
        // SAFETY: a per-CPU map value pointer, valid for this run and this
        // CPU's alone; the map's values live as long as the program.
        unsafe { *key = *k };
        Ok::<_, core::convert::Infallible>(unsafe { POLICY.get(&*key) })
    });
    match found {
        Ok(Some(d)) if d.auth_required => u64::from(d.rule_id) | POLICY_ALLOWED | POLICY_AUTH,
        Ok(Some(d)) => u64::from(d.rule_id) | POLICY_ALLOWED,
        _ => 0,
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
fn emit_flow<A: Family>(ifindex: u32, pkt: &Packet<A>, v: &Verdict, kind: u8, at: u8, now: u64) {
    if A::FAMILY == 6 {
        emit_flow_in_place(ifindex, pkt, v, kind, at, now);
        return;
    }
    let _ = FLOWS.output(
        &FlowEvent {
            ts_ns: now,
            src_ip: pkt.src_ip.event_bytes(),
            dst_ip: pkt.dst_ip.event_bytes(),
            src_identity: v.src_identity,
            dst_identity: v.dst_identity,
            src_port: pkt.src_port,
            dst_port: pkt.dst_port,
            proto: pkt.proto,
            kind,
            forwarded: v.forwarded as u8,
            drop_reason: v.reason,
            ifindex,
            rule_id: v.rule_id,
            hook: at,
            auth_required: v.auth_required as u8,
            family: A::FAMILY,
            _pad: [0; 5],
        },
        0,
    );
}

/// `emit_flow` writing the event field by field in place: the IPv6
/// program's stack has no room to build it.
#[inline(always)]
fn emit_flow_in_place<A: Family>(ifindex: u32, pkt: &Packet<A>, v: &Verdict, kind: u8, at: u8, now: u64) {
    let Some(mut slot) = FLOWS.reserve::<FlowEvent>(0) else {
        return;
    };
    // SAFETY: a reserved ring buffer slot of the event's size, ours until
    // submitted; every field is written before it is.
    unsafe {
        let e = slot.as_mut_ptr();
        (*e).ts_ns = now;
        (*e).src_ip = pkt.src_ip.event_bytes();
        (*e).dst_ip = pkt.dst_ip.event_bytes();
        (*e).src_identity = v.src_identity;
        (*e).dst_identity = v.dst_identity;
        (*e).src_port = pkt.src_port;
        (*e).dst_port = pkt.dst_port;
        (*e).proto = pkt.proto;
        (*e).kind = kind;
        (*e).forwarded = v.forwarded as u8;
        (*e).drop_reason = v.reason;
        (*e).ifindex = ifindex;
        (*e).rule_id = v.rule_id;
        (*e).hook = at;
        (*e).auth_required = v.auth_required as u8;
        (*e).family = A::FAMILY;
        (*e)._pad = [0; 5];
    }
    slot.submit(0);
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

/// The frame's ethertype. `Err`: drop with this reason.
#[inline(always)]
fn ethertype(ctx: &TcContext) -> Result<u16, u8> {
    match ptr_at::<u16>(ctx, 12) {
        Some(p) => Ok(u16::from_be(unsafe { *p })),
        None => Err(drop_reason::MALFORMED),
    }
}

#[inline(always)]
fn parse4(ctx: &TcContext) -> Result<Packet<u32>, u8> {
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
        (load_u32(h.add(12)), load_u32(h.add(16)))
    };
    let mut pkt = Packet {
        src_ip,
        dst_ip,
        src_port: 0,
        dst_port: 0,
        proto,
        icmp: 0,
        echo_id: 0,
    };
    if frag == 0 {
        ports(ctx, ETH_HLEN + (ihl & 0x3c), &mut pkt)?;
    }
    Ok(pkt)
}

/// The IPv6 header, then up to [`IPV6_MAX_EXT_HEADERS`] extension headers
/// to the transport header. A chain longer than that, one cut short, or a
/// routing header that still has segments to visit (the packet's real
/// destination is not its destination address) is dropped with
/// `IPV6_EXT_HEADERS`. A later fragment has no ports, as in IPv4.
/// Link-scope control (see [`link_control`]) seen at hook `at` is told
/// apart.
#[inline(always)]
fn parse6(ctx: &TcContext, at: u8, pkt: &mut Packet<Ipv6Key>) -> Result<Parsed6, u8> {
    let ip = match ptr_at::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN) {
        Some(p) => p,
        None => return Err(drop_reason::MALFORMED),
    };
    let (mut next, hop_limit, src_ip, dst_ip) = unsafe {
        let h = ip as *const u8;
        (*h.add(6), *h.add(7), load_ipv6(h.add(8)), load_ipv6(h.add(24)))
    };
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut later_fragment = false;
    let mut fragmented = false;
    let mut walked = 0usize;
    // Linux walks these to the upper layer (mobility, HIP and shim6 it
    // delivers as protocols of their own, and so are they here); after a
    // later fragment what follows is payload, not headers.
    while !later_fragment {
        let len = match next {
            // Hop-by-hop and destination options, routing: (length + 1) * 8
            // bytes.
            0 | 43 | 60 => 0,
            // Fragment: 8 bytes.
            44 => 1,
            // Authentication header: (length + 2) * 4 bytes.
            51 => 2,
            _ => break,
        };
        if walked == IPV6_MAX_EXT_HEADERS {
            return Err(drop_reason::IPV6_EXT_HEADERS);
        }
        walked += 1;
        let h = match ctx.load::<[u8; 4]>(off) {
            Ok(h) => h,
            Err(_) => return Err(drop_reason::IPV6_EXT_HEADERS),
        };
        if next == 43 && h[3] != 0 {
            return Err(drop_reason::IPV6_EXT_HEADERS);
        }
        if next == 44 {
            fragmented = true;
            later_fragment = u16::from_be_bytes([h[2], h[3]]) >> 3 != 0;
        }
        next = h[0];
        off += match len {
            0 => (h[1] as usize + 1) * 8,
            1 => 8,
            _ => (h[1] as usize + 2) * 4,
        };
    }
    // What is cut short after extension headers is an extension header
    // that lied about its length.
    let cut_short = if walked == 0 {
        drop_reason::MALFORMED
    } else {
        drop_reason::IPV6_EXT_HEADERS
    };
    // Neighbour discovery and MLD are never fragmented (RFC 6980): a
    // fragmented one is judged like any packet.
    if next == IPPROTO_ICMPV6 && !fragmented {
        let t = match ctx.load::<u8>(off) {
            Ok(t) => t,
            Err(_) => return Err(cut_short),
        };
        // A pod is never a router: a router advertisement or redirect from
        // one would have its neighbours route through it, and an MLD query
        // from one speaks for the router too.
        if at == hook::FROM_POD && (t == 134 || t == 137 || t == 130) {
            return Err(drop_reason::SOURCE_SPOOFED);
        }
        // Router solicitation and advertisement, neighbour solicitation and
        // advertisement, redirect; MLD query, report, done, v2 report.
        let nd = (133..=137).contains(&t) && hop_limit == 255;
        let mld = (t == 130 || t == 131 || t == 132 || t == 143) && hop_limit == 1;
        // From a pod: to a link-local or link-scope multicast address, or
        // to a pod of this node (a neighbour on a bridge).
        let on_link = at != hook::FROM_POD || is_link_scope(&dst_ip) || dst_ip.endpoint().is_some();
        if (nd || mld) && on_link {
            // What the message speaks for: a neighbour advertisement, its
            // target address (what a neighbour's cache will map to the
            // sender's MAC); a duplicate address probe (a solicitation from
            // ::), the address it probes (its answer takes the address
            // from whoever holds it); anything else, its source.
            if t == 136 || (t == 135 && src_ip.same(&Ipv6Key::default())) {
                return match ctx.load::<[u8; 16]>(off + 8) {
                    Ok(addr) => Ok(Parsed6::LinkControl(link_control(ctx, at, Ipv6Key { addr }))),
                    Err(_) => Err(cut_short),
                };
            }
            return Ok(Parsed6::LinkControl(link_control(ctx, at, src_ip)));
        }
    }
    pkt.src_ip = src_ip;
    pkt.dst_ip = dst_ip;
    pkt.proto = next;
    if !later_fragment && ports(ctx, off, pkt).is_err() {
        return Err(cut_short);
    }
    Ok(Parsed6::Packet)
}

/// The transport protocols whose flows the datapath keys by ports.
#[inline(always)]
const fn has_ports(proto: u8) -> bool {
    proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP
}

/// Source and destination ports at `off`, for the protocols that have
/// them; for the family's ICMP, the type and identifier its flow key
/// holds (see [`icmp_key`]). An ICMP message shorter than its 8-byte header
/// is malformed, as the kernel has it.
#[inline(always)]
fn ports<A: Family>(ctx: &TcContext, off: usize, pkt: &mut Packet<A>) -> Result<(), u8> {
    let (icmp, echo_request, echo_reply) = A::ICMP;
    // Not `pkt.proto == icmp`: the verifier would then know the protocol
    // on one side and explore everything after twice (here it learns only
    // of `is_icmp`, which nothing after reads).
    let is_icmp = ((u32::from(pkt.proto ^ icmp) + 255) >> 8) == 0;
    if !is_icmp && !has_ports(pkt.proto) {
        return Ok(());
    }
    // Ports are the first four bytes; ICMP's header is eight. Read as two
    // words (see `load_u32`: the transport header is at a multiple of four
    // as the verifier models it).
    let (w0, w1) = match ptr_at::<[u8; 8]>(ctx, off) {
        Some(p) => unsafe {
            let p = p as *const u8;
            (load_u32(p), load_u32(p.add(4)))
        },
        // Headers beyond the linear part: copy them out.
        None => match ctx.load::<[u32; 2]>(off) {
            Ok(w) => (w[0], w[1]),
            Err(_) => return Err(drop_reason::MALFORMED),
        },
    };
    let (h, h4) = (w0.to_ne_bytes(), w1.to_ne_bytes());
    if is_icmp {
        // An echo reply's reverse is its echo request; any other type's is
        // marked as answering none (`t ^ echo_reply` is 0 only for an echo
        // reply). Arithmetic, not branches: each branch would be one more
        // path for the verifier through everything after.
        let t = h[0];
        let answers_none = ((u32::from(t ^ echo_reply) + 255) >> 8) as u8;
        pkt.icmp = u32::from_ne_bytes([
            t,
            icmp_key::MESSAGE,
            t ^ echo_reply ^ echo_request,
            icmp_key::MESSAGE + answers_none,
        ]);
        pkt.echo_id = u16::from_ne_bytes([h4[0], h4[1]]);
    } else {
        pkt.src_port = u16::from_ne_bytes([h[0], h[1]]);
        pkt.dst_port = u16::from_ne_bytes([h[2], h[3]]);
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
