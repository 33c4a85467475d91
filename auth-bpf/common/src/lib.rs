//! Types the kernel programs and user space both see. `no_std` so the eBPF
//! programs can use them; every map key and value here is `#[repr(C)]` with
//! explicit padding fields, so the kernel and user space agree on every byte
//! and no uninitialised padding ever becomes part of a hash key.
//!
//! IPv4 and IPv6 have maps of their own (the IPv4 keys stay four bytes, so
//! IPv4 packets pay nothing for IPv6). Addresses are in network byte order,
//! as they sit in the packet: an IPv4 address is a `u32` read from memory,
//! an IPv6 one an [`Ipv6Key`]. Ports likewise. Times are `CLOCK_MONOTONIC`
//! nanoseconds, read in the kernel at tick resolution (from jiffies, see
//! [`Config::jiffy_ns`]; the agent writes auth expiries one tick early, see
//! `node_agent::datapath::kernel_clock_lag_ns`).
#![no_std]

/// Numeric security identities as the datapath sees them (DESIGN.md section 2).
///
/// The control plane allocates user identities from [`identity::FIRST_USER`];
/// the reserved ones below it never map to a workload.
pub mod identity {
    /// No identity known for the address.
    pub const UNKNOWN: u32 = 0;
    /// The node itself (host network namespace).
    pub const HOST: u32 = 1;
    /// Anything outside the cluster.
    pub const WORLD: u32 = 2;
    /// Another node of the cluster.
    pub const REMOTE_NODE: u32 = 3;
    /// The Keyway control plane.
    pub const CONTROL_PLANE: u32 = 4;
    /// The first identity the control plane hands to workloads.
    pub const FIRST_USER: u32 = 256;

    /// True for identities that name a class of peer, not a workload.
    pub const fn is_reserved(id: u32) -> bool {
        id < FIRST_USER
    }
}

/// Map names, pinned under [`PIN_DIR`] so an agent restart keeps traffic flowing.
pub mod maps {
    pub const PIN_DIR: &str = "/sys/fs/bpf/keyway";
    pub const IPCACHE: &str = "KEYWAY_IPCACHE";
    pub const IPCACHE_LPM: &str = "KEYWAY_IPCACHE_LPM";
    pub const ENDPOINTS: &str = "KEYWAY_ENDPOINTS";
    pub const POLICY: &str = "KEYWAY_POLICY";
    pub const AUTH: &str = "KEYWAY_AUTH";
    pub const AUTH_DEDUP: &str = "KEYWAY_AUTH_DEDUP";
    pub const SIGNALS: &str = "KEYWAY_SIGNALS";
    pub const FLOWS: &str = "KEYWAY_FLOWS";
    pub const FLOW_TABLE: &str = "KEYWAY_FLOW_TABLE";
    pub const CONFIG: &str = "KEYWAY_CONFIG";
    pub const DROPS: &str = "KEYWAY_DROPS";
    pub const IPCACHE6: &str = "KEYWAY_IPCACHE6";
    pub const IPCACHE6_LPM: &str = "KEYWAY_IPCACHE6_LPM";
    pub const ENDPOINTS6: &str = "KEYWAY_ENDPOINTS6";
    pub const FLOW_TABLE6: &str = "KEYWAY_FLOW_TABLE6";
    /// The IPv6 programs, by [`super::prog_index`].
    pub const PROGS: &str = "KEYWAY_PROGS";
    /// Every interface the programs are attached to, by ifindex: for a
    /// bridge port the endpoint of the pod placed behind it
    /// ([`super::endpoint_flags::BRIDGED`], its MAC), or an empty entry
    /// while none is; a routed pod's interface flagged
    /// [`super::endpoint_flags::ROUTED`]. For what a pod sends on a bridge
    /// that names none of its addresses (IPv6 neighbour discovery from its
    /// link-local address): only from that MAC, and nothing from an
    /// interface not written yet.
    pub const PORTS: &str = "KEYWAY_PORTS";

    /// Every pinned map, for tools that inspect or clean a pin directory.
    pub const ALL: [&str; 17] = [
        IPCACHE,
        IPCACHE_LPM,
        IPCACHE6,
        IPCACHE6_LPM,
        ENDPOINTS,
        ENDPOINTS6,
        POLICY,
        AUTH,
        AUTH_DEDUP,
        SIGNALS,
        FLOWS,
        FLOW_TABLE,
        FLOW_TABLE6,
        CONFIG,
        DROPS,
        PROGS,
        PORTS,
    ];

    /// Capacities. Hash maps other than the flow table are not preallocated,
    /// so a node pays kernel memory for the entries it holds, not for these.
    pub const IPCACHE_MAX: u32 = 1 << 20;
    pub const IPCACHE_LPM_MAX: u32 = 16 << 10;
    pub const IPCACHE6_MAX: u32 = 1 << 20;
    pub const IPCACHE6_LPM_MAX: u32 = 16 << 10;
    pub const ENDPOINTS_MAX: u32 = 4 << 10;
    pub const ENDPOINTS6_MAX: u32 = 4 << 10;
    pub const PORTS_MAX: u32 = 4 << 10;
    pub const POLICY_MAX: u32 = 2 << 20;
    /// Cilium's default auth map size.
    pub const AUTH_MAX: u32 = 512 << 10;
    pub const AUTH_DEDUP_MAX: u32 = 16 << 10;
    pub const FLOW_TABLE_MAX: u32 = 64 << 10;
    pub const FLOW_TABLE6_MAX: u32 = 64 << 10;
    pub const SIGNALS_BYTES: u32 = 256 << 10;
    pub const FLOWS_BYTES: u32 = 1 << 20;
    /// Slots of the per-CPU drop counter array, indexed by drop reason.
    pub const DROPS_SLOTS: u32 = 8;
}

/// The two programs: which side of a pod's host-side veth they sit on.
pub mod hook {
    /// TC ingress of the host-side veth: packets leaving the pod.
    pub const FROM_POD: u8 = 1;
    /// TC egress of the host-side veth: packets entering the pod.
    pub const TO_POD: u8 = 2;
}

/// Slots of [`maps::PROGS`]: the IPv6 program of each hook, which the IPv4
/// one (the one attached) tail-calls for IPv6 frames.
pub mod prog_index {
    pub const FROM_POD6: u32 = 0;
    pub const TO_POD6: u32 = 1;
}

/// Why a packet was dropped. Stable numbers: they travel in flow events.
pub mod drop_reason {
    pub const NONE: u8 = 0;
    /// No policy entry allows the identity pair.
    pub const POLICY_DENIED: u8 = 1;
    /// Policy requires mutual authentication and the pair has no valid entry.
    pub const AUTH_REQUIRED: u8 = 2;
    /// The packet could not be parsed.
    pub const MALFORMED: u8 = 3;
    /// Not IPv4, IPv6 or ARP (or IPv6 while the IPv6 programs are not
    /// loaded).
    pub const UNSUPPORTED_L3: u8 = 4;
    /// A pod sent a packet whose source address is not one of its own (the
    /// endpoint behind the interface it came in on): a forged sender. Also
    /// a pod speaking as a router (an IPv6 router advertisement, redirect
    /// or MLD query), and on a bridge ARP or neighbour discovery for an
    /// address or from a MAC not its own.
    pub const SOURCE_SPOOFED: u8 = 5;
    /// A packet for a pod on a bridge reached another pod's bridge port (an
    /// answer to ARP from the wrong pod, or a frame the bridge flooded): it
    /// is delivered only on its own pod's port.
    pub const MISDELIVERED: u8 = 6;
    /// An IPv6 packet whose extension headers could not be walked to the
    /// transport header: more than [`super::IPV6_MAX_EXT_HEADERS`] of them,
    /// one cut short, or a routing header with segments left (its real
    /// destination is not the one the packet names). Never judged on a
    /// guess.
    pub const IPV6_EXT_HEADERS: u8 = 7;

    /// The name used in flow lines and metrics.
    pub const fn name(reason: u8) -> &'static str {
        match reason {
            NONE => "none",
            POLICY_DENIED => "policy-denied",
            AUTH_REQUIRED => "auth-required",
            MALFORMED => "malformed",
            UNSUPPORTED_L3 => "unsupported-l3",
            SOURCE_SPOOFED => "source-spoofed",
            MISDELIVERED => "misdelivered",
            IPV6_EXT_HEADERS => "ipv6-extension-headers",
            _ => "unknown",
        }
    }
}

/// Bits of [`Config::flags`].
pub mod config_flags {
    /// Emit per-flow events to the flow ring buffer.
    pub const FLOW_CAPTURE: u8 = 1;
    /// Evaluate every packet in full, ignoring cached flow verdicts
    /// (benchmarks use it to measure the full lookup path).
    pub const NO_VERDICT_CACHE: u8 = 2;
    /// Some attached interfaces are bridge ports: the to-pod program checks
    /// that a packet for a [`super::endpoint_flags::BRIDGED`] endpoint leaves
    /// on its port, and the from-pod program checks ARP senders.
    pub const BRIDGED_PORTS: u8 = 4;
    /// Read the subject's ipcache entry from the maps on every evaluation,
    /// never from the programs' per-CPU memo of the last one read at its
    /// interface (benchmarks use it to measure an endpoint's first
    /// evaluation in an epoch).
    pub const NO_SUBJECT_MEMO: u8 = 8;
}

/// Policy direction, seen from the subject endpoint.
pub mod direction {
    pub const INGRESS: u8 = 0;
    pub const EGRESS: u8 = 1;
}

/// The datapath's single configuration slot (array map, index 0), written by
/// the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Bumped by the agent whenever a change may turn an allowed flow into a
    /// denied one (ipcache, policy, endpoints, an auth entry removed or
    /// shortened); cached verdicts from an older epoch are re-evaluated, and
    /// the programs' per-CPU memo of each interface's subject (its ipcache
    /// value) is read again, so every ipcache write is followed by a bump.
    pub epoch: u32,
    /// This node's id, for auth keys of same-node peers.
    pub local_node_id: u16,
    pub flags: u8,
    pub _pad: u8,
    /// At most one auth signal per key per this many nanoseconds.
    pub signal_interval_ns: u64,
    /// At most one drop event per flow per this many nanoseconds.
    pub flow_report_interval_ns: u64,
    /// The programs' clock is `jiffies * jiffy_ns + clock_base_ns`
    /// (wrapping): `CLOCK_MONOTONIC` at tick resolution, read without a
    /// helper call. `jiffy_ns` is the tick (`clock_getres` of
    /// `CLOCK_MONOTONIC_COARSE`), and the agent measures `clock_base_ns`
    /// when it loads the programs, before any of them can run. A zero
    /// `jiffy_ns` reads as the end of time: every auth entry has expired.
    pub jiffy_ns: u64,
    pub clock_base_ns: u64,
}

/// Key of the flow table: one direction of one flow at one hook of one
/// interface. The interface is part of the key so that a packet forged on
/// one pod's interface can never ride on a verdict cached for the real
/// sender's flow on another.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src_ip: u32,
    pub dst_ip: u32,
    /// Network byte order; 0 for protocols without ports. An ICMP message
    /// has the 16 bits after its checksum in both (an echo's identifier,
    /// which conntrack keys an echo by).
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// [`hook`] the packet was seen at.
    pub hook: u8,
    /// ICMP (ICMPv6) messages: the type, then [`icmp_key::MESSAGE`]. [0,
    /// [`icmp_key::NONE`]] for other protocols and later fragments.
    pub icmp: [u8; 2],
    /// The interface (host-side veth) the hook runs on.
    pub ifindex: u32,
}

/// The second byte of a flow key's `icmp`. A flow is stored under its
/// packets' own type. Its reply is looked up under the type it answers: an
/// echo reply's, under echo request with its identifier. Any other message
/// answers none, and its reverse key is marked [`NO_REPLY`], which no
/// stored key holds: so no message but an echo reply with the request's
/// identifier is ever a reply to an ICMP flow (an echo request taken for
/// one would pass against the policy of the pod that sent it).
pub mod icmp_key {
    /// No ICMP header was read: another protocol, or a later fragment.
    pub const NONE: u8 = 0;
    /// The first byte is the message's type.
    pub const MESSAGE: u8 = 1;
    /// The reverse of a message that is no reply.
    pub const NO_REPLY: u8 = 2;
}

/// [`FlowKey`] of an IPv6 flow (its own table: IPv4 keys stay small).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey6 {
    pub src_ip: Ipv6Key,
    pub dst_ip: Ipv6Key,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub hook: u8,
    pub icmp: [u8; 2],
    pub ifindex: u32,
}

/// An IPv6 address as the maps key it: the packet's 16 bytes. Aligned to
/// four so that the programs move and compare it as four 32-bit words (BPF
/// has no unaligned loads: a byte array on its own is copied a byte at a
/// time); every structure holding one already has it at a multiple of four,
/// so no layout changes.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Ipv6Key {
    pub addr: [u8; 16],
}

/// How many IPv6 extension headers the datapath walks to reach the
/// transport header; a longer chain is dropped
/// ([`drop_reason::IPV6_EXT_HEADERS`]). Real traffic carries one or two
/// (hop-by-hop for MLD, a fragment header).
pub const IPV6_MAX_EXT_HEADERS: usize = 8;

/// What the datapath remembers of a flow: the verdict of its last full
/// evaluation (reused while `epoch` is current and auth has not expired) and
/// when it last reported it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowState {
    pub epoch: u32,
    /// 1 forwarded, 0 dropped.
    pub forwarded: u8,
    pub drop_reason: u8,
    /// 1 when this entry is the reply direction of a flow allowed the other way.
    pub is_reply: u8,
    pub _pad: u8,
    pub rule_id: u32,
    /// Local endpoint to redirect to, 0 to hand the packet to the stack.
    pub redirect_ifindex: u32,
    /// Kernel time at which the auth entry that allowed the flow expires; 0
    /// when no auth was required.
    pub auth_expiry_ns: u64,
    pub last_report_ns: u64,
    pub src_identity: u32,
    pub dst_identity: u32,
}

/// Value of the ipcache (exact /32 or /128 hash, and the LPM tries for CIDRs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IpcacheValue {
    pub identity: u32,
    pub node_id: u16,
    /// The policy lookups this identity, as a subject, has no entry for: bit
    /// [`absent_bit`]`(direction, probe)` set means no entry of that shape
    /// exists, so that probe is skipped. 0 (what an agent that predates it
    /// leaves) probes all four.
    pub absent: u8,
    pub _pad: u8,
    /// Per direction (index `direction & 1`), a filter of the subjects
    /// that do not name this identity as their peer: bit
    /// [`namer_bit`]`(subject)` set means no local subject whose bit that
    /// is has an exact or any-port entry with this identity as the peer in
    /// that direction, so with this identity as the peer of such a subject
    /// the exact and any-port probes are skipped: they could only miss.
    /// All ones: no local subject names it. A subject sharing its bit with
    /// one that does name it probes them (a false positive of the filter
    /// costs two lookups that miss, never a skipped entry). 0 (what an
    /// agent that predates it leaves) probes them.
    pub unnamed_by: [u32; 2],
}

/// The index, in [`policy_probes`] order, of the probe that finds a policy
/// entry with this peer and port block: exact, any port, any peer, any
/// peer and any port.
pub const fn probe_index(peer: u32, port_block: u16) -> u8 {
    (if peer == identity::UNKNOWN { 2 } else { 0 }) + (if port_block == 0 { 1 } else { 0 })
}

/// A subject's bit in [`IpcacheValue::unnamed_by`]: the top five bits of a
/// multiplicative (Fibonacci) hash of its identity, so identities numbered
/// one after another spread over all 32 bits.
pub const fn namer_bit(subject: u32) -> u32 {
    1 << (subject.wrapping_mul(0x9e37_79b1) >> 27)
}

/// The probes (bits of [`absent_bit`]) the datapath skips for `subject`,
/// whose ipcache value says `absent`, and a peer whose says `unnamed_by`,
/// in `direction`.
pub const fn skipped_probes(absent: u8, unnamed_by: &[u32; 2], subject: u32, direction: u8) -> u8 {
    if unnamed_by[(direction & 1) as usize] & namer_bit(subject) != 0 {
        absent | absent_bit(direction, 0) | absent_bit(direction, 1)
    } else {
        absent
    }
}

/// The bit of [`IpcacheValue::absent`] for one probe in one direction.
pub const fn absent_bit(direction: u8, probe: u8) -> u8 {
    1 << (probe + 4 * (direction & 1))
}

/// The data part of an LPM trie key for IPv4 (the prefix length travels
/// beside it in the trie's key header). IPv6 tries use [`Ipv6Key`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ipv4LpmKey {
    /// Network byte order.
    pub addr: u32,
}

/// A local endpoint: where to redirect packets for one of this node's pods.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointInfo {
    /// ifindex of the pod's host-side veth.
    pub ifindex: u32,
    pub identity: u32,
    /// For a [`endpoint_flags::BRIDGED`] endpoint, the pod's MAC: the only
    /// source MAC its port may send from. Zero otherwise (the kernel resolves
    /// a routed pod's address on redirect, see `bpf_redirect_neigh`).
    pub mac: [u8; 6],
    /// [`endpoint_flags`].
    pub flags: u8,
    pub _pad: u8,
}

/// Bits of [`EndpointInfo::flags`].
pub mod endpoint_flags {
    /// The interface is a port of a Linux bridge (a bridge CNI): packets
    /// allowed to this endpoint are left to the bridge, which forwards them
    /// by the destination MAC the sender already resolved, instead of being
    /// redirected to the port (a neighbour lookup on a port with no address
    /// of its own would fail).
    pub const BRIDGED: u8 = 1;
    /// In [`super::maps::PORTS`]: a routed pod's interface (no bridge
    /// learns from what it sends).
    pub const ROUTED: u8 = 2;
}

/// Policy lookup key: {subject, peer, port block, proto, direction}. Peer 0
/// ([`identity::UNKNOWN`]) is the any-peer wildcard and port block 0 the
/// any-port entry, looked up after the exact key (see [`policy_probes`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PolicyKey {
    pub subject: u32,
    pub peer: u32,
    /// [`port_block`] of the destination port (host order), or 0 for the
    /// any-port entry (then `proto` is 0 too and the bits are per protocol).
    pub port_block: u16,
    pub proto: u8,
    pub direction: u8,
}

/// The block of 256 ports `port` (host order) falls in, as policy keys
/// name it: 1 for ports 0-255 (where port-less protocols look), 256 for
/// 65280-65535. Block 0 is the any-port entry.
pub const fn port_block(port: u16) -> u16 {
    (port >> 8) + 1
}

/// 256 bits: one per port of a block (`port & 0xff`), or in an any-port
/// entry one per IP protocol number. A policy entry carries two: what it
/// allows, and what of that needs mutual authentication. So a port range or
/// a list of ports costs one entry per 256-port block, not one per port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PortBits(pub [u64; 4]);

impl PortBits {
    pub const NONE: PortBits = PortBits([0; 4]);
    pub const ALL: PortBits = PortBits([u64::MAX; 4]);

    pub const fn get(&self, bit: u8) -> bool {
        self.0[(bit >> 6) as usize] & (1 << (bit & 63)) != 0
    }

    pub fn set(&mut self, bit: u8) {
        self.0[(bit >> 6) as usize] |= 1 << (bit & 63);
    }

    /// Sets bits `lo..=hi`.
    pub fn set_range(&mut self, lo: u8, hi: u8) {
        for b in lo..=hi {
            self.set(b);
        }
    }

    pub const fn is_empty(&self) -> bool {
        self.0[0] == 0 && self.0[1] == 0 && self.0[2] == 0 && self.0[3] == 0
    }

    pub const fn or(self, o: PortBits) -> PortBits {
        PortBits([
            self.0[0] | o.0[0],
            self.0[1] | o.0[1],
            self.0[2] | o.0[2],
            self.0[3] | o.0[3],
        ])
    }

    pub const fn and(self, o: PortBits) -> PortBits {
        PortBits([
            self.0[0] & o.0[0],
            self.0[1] & o.0[1],
            self.0[2] & o.0[2],
            self.0[3] & o.0[3],
        ])
    }

    pub const fn and_not(self, o: PortBits) -> PortBits {
        PortBits([
            self.0[0] & !o.0[0],
            self.0[1] & !o.0[1],
            self.0[2] & !o.0[2],
            self.0[3] & !o.0[3],
        ])
    }

    /// Little-endian bytes (bit i is bit i%8 of byte i/8), the wire form.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        let mut i = 0;
        while i < 4 {
            let b = self.0[i].to_le_bytes();
            let mut j = 0;
            while j < 8 {
                out[i * 8 + j] = b[j];
                j += 1;
            }
            i += 1;
        }
        out
    }

    /// From the wire form; `None` unless exactly 32 bytes (an empty field
    /// is [`PortBits::NONE`] to the caller's taste).
    pub fn from_bytes(b: &[u8]) -> Option<PortBits> {
        if b.len() != 32 {
            return None;
        }
        let mut out = [0u64; 4];
        let mut i = 0;
        while i < 4 {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            out[i] = u64::from_le_bytes(w);
            i += 1;
        }
        Some(PortBits(out))
    }

    pub fn count(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }
}

/// A kernel policy entry, compiled by the agent from the control plane's
/// entries (see `node-agent/src/datapath/tables.rs`, `compile`): the
/// complete verdict for every packet whose first key found, in
/// [`policy_probes`] order, is this one. The agent folds into each entry
/// what the less specific entries the packet would also match say (the
/// union of the rules), so the datapath stops at the first entry it finds:
/// one lookup for a pair a subject's policy names, instead of up to four.
///
/// The bits: one per port of the key's block (`port & 0xff`), or in an
/// any-port entry one per IP protocol number. A packet whose bit is clear
/// in `allowed` is dropped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyValue {
    /// The rule that allows the bits of `first` (for flow records and
    /// `explain`: the most specific rule that matches).
    pub rule_id: u32,
    /// The [`PolicyProbe`] shape (its index in [`policy_probes`] order) each
    /// rule came from: `rule_id`'s, `second_rule_id`'s and
    /// `rest_rule_id`'s, so that `explain` names the entry a rule was written
    /// as. The datapath does not read them.
    pub origins: [u8; 3],
    /// [`policy_flags`].
    pub flags: u8,
    pub allowed: PortBits,
    /// Always a subset of `allowed`.
    pub authenticated: PortBits,
    /// The allowed bits whose rule is `rule_id`.
    pub first: PortBits,
    /// The allowed bits not in `first` whose rule is `second_rule_id`; every
    /// other allowed bit's is `rest_rule_id`. (Three are enough: of the four
    /// shapes folded into an entry, an any-port one covers every bit of the
    /// packet's protocol, so what comes after it adds none.)
    pub second: PortBits,
    pub second_rule_id: u32,
    pub rest_rule_id: u32,
}

/// Bits of [`PolicyValue::flags`].
pub mod policy_flags {
    /// On an any-port entry: this entry does not decide alone; the packet's
    /// any-peer entry (the next probe), when there is one, is read too and
    /// the two are united, the any-port entry's rule first. The agent sets
    /// it where folding the subject's any-peer port entries into the pair's
    /// exact keys would cost more than `tables::FOLD_LIMIT` entries: two
    /// lookups instead of one, for that subject only.
    pub const WITH_ANY_PEER: u8 = 1;
}

impl PolicyValue {
    /// The rule that allows `bit`, or `None` when it is not allowed.
    pub const fn rule_for(&self, bit: u8) -> Option<u32> {
        if !self.allowed.get(bit) {
            None
        } else if self.first.get(bit) {
            Some(self.rule_id)
        } else if self.second.get(bit) {
            Some(self.second_rule_id)
        } else {
            Some(self.rest_rule_id)
        }
    }

    /// The shape (a [`policy_probes`] index) the rule of `bit` came from.
    pub const fn origin_of(&self, bit: u8) -> u8 {
        if self.first.get(bit) {
            self.origins[0]
        } else if self.second.get(bit) {
            self.origins[1]
        } else {
            self.origins[2]
        }
    }
}

/// How a policy lookup went, most specific key first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PolicyProbe {
    /// {subject, peer, block of the port, proto}: bit `port & 0xff`.
    Exact,
    /// {subject, peer, 0, 0}: bit `proto` (every port of that protocol).
    AnyPort,
    /// {subject, any peer, block, proto}: bit `port & 0xff`.
    AnyPeer,
    /// {subject, any peer, 0, 0}: bit `proto`.
    AnyPeerAndPort,
}

impl PolicyProbe {
    /// The name `explain` shows.
    pub const fn name(self) -> &'static str {
        match self {
            PolicyProbe::Exact => "exact",
            PolicyProbe::AnyPort => "any-port",
            PolicyProbe::AnyPeer => "any-peer",
            PolicyProbe::AnyPeerAndPort => "any-peer-and-port",
        }
    }
}

/// The keys the datapath probes for a packet, in order, each with the bit
/// that must be set in the entry's bitmaps: the one lookup order the
/// kernel, `explain` and the compiler agree on.
pub const fn policy_probes(
    subject: u32,
    peer: u32,
    port: u16,
    proto: u8,
    direction: u8,
) -> [(PolicyProbe, PolicyKey, u8); 4] {
    let e = policy_probe(subject, peer, port, proto, direction, 0);
    let ap = policy_probe(subject, peer, port, proto, direction, 1);
    let w = policy_probe(subject, peer, port, proto, direction, 2);
    let wa = policy_probe(subject, peer, port, proto, direction, 3);
    [
        (PolicyProbe::Exact, e.0, e.1),
        (PolicyProbe::AnyPort, ap.0, ap.1),
        (PolicyProbe::AnyPeer, w.0, w.1),
        (PolicyProbe::AnyPeerAndPort, wa.0, wa.1),
    ]
}

/// Probe `i` (0-3) of [`policy_probes`] alone: its key and bit (what the
/// datapath builds one at a time, to keep its stack small).
pub const fn policy_probe(
    subject: u32,
    peer: u32,
    port: u16,
    proto: u8,
    direction: u8,
    i: usize,
) -> (PolicyKey, u8) {
    let block = port_block(port);
    let bit = (port & 0xff) as u8;
    let (peer, port_block, proto, bit) = match i {
        0 => (peer, block, proto, bit),
        1 => (peer, 0, 0, proto),
        2 => (identity::UNKNOWN, block, proto, bit),
        _ => (identity::UNKNOWN, 0, 0, proto),
    };
    (
        PolicyKey {
            subject,
            peer,
            port_block,
            proto,
            direction,
        },
        bit,
    )
}

/// What the datapath's policy lookup decided for a packet it allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyDecision {
    /// The probe (a [`policy_probes`] index) whose entry decided.
    pub probe: u8,
    /// The rule that allows the packet.
    pub rule_id: u32,
    /// The shape (a [`policy_probes`] index) that rule was written as.
    pub origin: u8,
    /// Whether the packet must also be mutually authenticated.
    pub auth_required: bool,
}

/// The datapath's policy lookup, written once for the kernel and for
/// `explain`: the probes of [`policy_probes`] in order, less the ones
/// `skipped` names (bits of [`absent_bit`], see [`skipped_probes`]: shapes
/// the subject has no entry of, which could only miss). The first entry
/// found decides, with what the agent folded into it (see [`PolicyValue`]);
/// one flagged [`policy_flags::WITH_ANY_PEER`] (only ever an any-port
/// entry) is united with the first any-peer entry found after it, its own
/// rule first. `None`: the packet is not allowed.
///
/// `get` looks one key up; its error (user space reads maps that can fail)
/// ends the lookup. Inlined, so the kernel's copy has no call, and
/// iterative, so the verifier walks a bounded loop.
#[inline(always)]
pub fn resolve_policy<V, E>(
    subject: u32,
    peer: u32,
    port: u16,
    proto: u8,
    direction: u8,
    skipped: u8,
    mut get: impl FnMut(&PolicyKey) -> Result<Option<V>, E>,
) -> Result<Option<PolicyDecision>, E>
where
    V: core::borrow::Borrow<PolicyValue>,
{
    let mut i = 0;
    while i < 4 {
        if skipped & absent_bit(direction, i as u8) == 0 {
            let (key, bit) = policy_probe(subject, peer, port, proto, direction, i);
            if let Some(found) = get(&key)? {
                let v = found.borrow();
                let mut rule = v.rule_for(bit);
                let mut origin = v.origin_of(bit);
                let mut auth_required = v.authenticated.get(bit);
                if v.flags & policy_flags::WITH_ANY_PEER != 0 {
                    let mut j = 2;
                    while j < 4 {
                        let (key, bit) = policy_probe(subject, peer, port, proto, direction, j);
                        if let Some(any_peer) = get(&key)? {
                            let w = any_peer.borrow();
                            if rule.is_none() {
                                rule = w.rule_for(bit);
                                origin = w.origin_of(bit);
                            }
                            auth_required = auth_required || w.authenticated.get(bit);
                            break;
                        }
                        j += 1;
                    }
                }
                return Ok(rule.map(|rule_id| PolicyDecision {
                    probe: i as u8,
                    rule_id,
                    origin,
                    auth_required,
                }));
            }
        }
        i += 1;
    }
    Ok(None)
}

/// The auth entry a pair the policy requires authentication for must have:
/// the subject, the peer, and the node whose agent vouched for the peer
/// (`peer_node` from the peer's ipcache value; this node, `local_node`,
/// for a peer with none).
#[inline(always)]
pub const fn auth_key(subject: u32, peer: u32, peer_node: u16, local_node: u16) -> AuthKey {
    AuthKey {
        local_id: subject,
        remote_id: peer,
        remote_node_id: if peer_node == 0 { local_node } else { peer_node },
        auth_type: auth_type::MTLS_SPIFFE,
        _pad: 0,
    }
}

/// Auth map key: the pair and the node whose agent vouched for the peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct AuthKey {
    pub local_id: u32,
    pub remote_id: u32,
    pub remote_node_id: u16,
    pub auth_type: u8,
    pub _pad: u8,
}

/// Auth map value: valid until this kernel time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AuthValue {
    pub expiry_ns: u64,
}

/// Auth types.
pub mod auth_type {
    /// Mutual TLS between the two node agents with SVIDs.
    pub const MTLS_SPIFFE: u8 = 1;
}

/// A missing auth entry, sent to the agent (at most once per key per interval).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AuthSignal {
    pub key: AuthKey,
    pub _pad: [u8; 4],
    pub ts_ns: u64,
}

/// Flow event kinds.
pub mod flow_kind {
    pub const NEW: u8 = 1;
    pub const DROP: u8 = 2;
    pub const VERDICT_CHANGE: u8 = 3;
}

/// One per-flow event (never one per forwarded packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent {
    pub ts_ns: u64,
    /// IPv6 addresses, or for [`FlowEvent::family`] 4 the IPv4 address in
    /// the first four bytes (the rest zero).
    pub src_ip: [u8; 16],
    pub dst_ip: [u8; 16],
    pub src_identity: u32,
    pub dst_identity: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub kind: u8,
    /// 1 forwarded, 0 dropped.
    pub forwarded: u8,
    pub drop_reason: u8,
    pub ifindex: u32,
    pub rule_id: u32,
    /// [`hook`] the packet was seen at.
    pub hook: u8,
    /// 1 when the policy entry that decided required mutual authentication.
    pub auth_required: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 5],
}

/// `aya::Pod` for every map type, so user space reads and writes them as-is.
#[cfg(feature = "user")]
mod pod {
    use super::*;

    macro_rules! pod {
        ($($t:ty),* $(,)?) => {$(
            // SAFETY: every type here is `#[repr(C)]`, `Copy`, made of integers
            // only, with explicit padding fields (checked by the layout tests),
            // so every bit pattern is valid and there are no uninitialised bytes.
            #[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait; the layouts are checked in tests")]
            unsafe impl aya::Pod for $t {}
        )*};
    }

    pod!(
        Config,
        FlowKey,
        FlowKey6,
        FlowState,
        IpcacheValue,
        Ipv4LpmKey,
        Ipv6Key,
        EndpointInfo,
        PolicyKey,
        PolicyValue,
        PortBits,
        AuthKey,
        AuthValue,
        AuthSignal,
        FlowEvent,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn port_bits_round_trip_and_blocks_cover_every_port() {
        let mut b = PortBits::NONE;
        b.set(0);
        b.set(63);
        b.set(64);
        b.set(255);
        assert!(b.get(0) && b.get(63) && b.get(64) && b.get(255) && !b.get(1));
        assert_eq!(b.count(), 4);
        assert_eq!(PortBits::from_bytes(&b.to_bytes()), Some(b));
        assert_eq!(PortBits::from_bytes(&[0; 31]), None);
        assert_eq!(port_block(0), 1);
        assert_eq!(port_block(255), 1);
        assert_eq!(port_block(8080), 32);
        assert_eq!(port_block(65535), 256);
        let p = policy_probes(300, 301, 8080, 6, 0);
        assert_eq!(p[0].1.port_block, 32);
        assert_eq!(p[0].2, (8080 & 0xff) as u8);
        assert_eq!((p[1].1.port_block, p[1].1.proto, p[1].2), (0, 0, 6));
        assert_eq!(p[2].1.peer, identity::UNKNOWN);
    }

    #[test]
    fn reserved_identities_are_below_user_range() {
        for id in [
            identity::UNKNOWN,
            identity::HOST,
            identity::WORLD,
            identity::REMOTE_NODE,
            identity::CONTROL_PLANE,
        ] {
            assert!(identity::is_reserved(id));
        }
        assert!(!identity::is_reserved(identity::FIRST_USER));
    }

    /// The kernel and user space share these layouts byte for byte; a
    /// change here is an ABI change for pinned maps and must be deliberate.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<IpcacheValue>(), 16);
        assert_eq!(offset_of!(IpcacheValue, unnamed_by), 8);
        assert_eq!(size_of::<EndpointInfo>(), 16);
        assert_eq!(offset_of!(EndpointInfo, mac), 8);
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(offset_of!(PolicyKey, port_block), 8);
        assert_eq!(offset_of!(PolicyKey, proto), 10);
        assert_eq!(offset_of!(PolicyKey, direction), 11);
        assert_eq!(size_of::<PortBits>(), 32);
        assert_eq!(size_of::<PolicyValue>(), 144);
        assert_eq!(offset_of!(PolicyValue, rule_id), 0);
        assert_eq!(offset_of!(PolicyValue, origins), 4);
        assert_eq!(offset_of!(PolicyValue, flags), 7);
        assert_eq!(offset_of!(PolicyValue, allowed), 8);
        assert_eq!(offset_of!(PolicyValue, authenticated), 40);
        assert_eq!(offset_of!(PolicyValue, first), 72);
        assert_eq!(offset_of!(PolicyValue, second), 104);
        assert_eq!(offset_of!(PolicyValue, second_rule_id), 136);
        assert_eq!(offset_of!(PolicyValue, rest_rule_id), 140);
        assert_eq!(size_of::<AuthKey>(), 12);
        assert_eq!(offset_of!(AuthKey, remote_node_id), 8);
        assert_eq!(offset_of!(AuthKey, auth_type), 10);
        assert_eq!(size_of::<AuthValue>(), 8);
        assert_eq!(size_of::<AuthSignal>(), 24);
        assert_eq!(offset_of!(AuthSignal, ts_ns), 16);
        assert_eq!(size_of::<FlowEvent>(), 72);
        assert_eq!(offset_of!(FlowEvent, src_identity), 40);
        assert_eq!(offset_of!(FlowEvent, src_port), 48);
        assert_eq!(offset_of!(FlowEvent, ifindex), 56);
        assert_eq!(offset_of!(FlowEvent, rule_id), 60);
        assert_eq!(offset_of!(FlowEvent, hook), 64);
        assert_eq!(offset_of!(FlowEvent, auth_required), 65);
        assert_eq!(offset_of!(FlowEvent, family), 66);
        assert_eq!(align_of::<FlowEvent>(), 8);
        assert_eq!(size_of::<Config>(), 40);
        assert_eq!(offset_of!(Config, jiffy_ns), 24);
        assert_eq!(offset_of!(Config, signal_interval_ns), 8);
        assert_eq!(size_of::<FlowKey>(), 20);
        assert_eq!(offset_of!(FlowKey, proto), 12);
        assert_eq!(offset_of!(FlowKey, hook), 13);
        assert_eq!(offset_of!(FlowKey, icmp), 14);
        assert_eq!(offset_of!(FlowKey, ifindex), 16);
        assert_eq!(size_of::<FlowState>(), 40);
        assert_eq!(offset_of!(FlowState, rule_id), 8);
        assert_eq!(offset_of!(FlowState, auth_expiry_ns), 16);
        assert_eq!(offset_of!(FlowState, src_identity), 32);
        assert_eq!(size_of::<Ipv4LpmKey>(), 4);
        assert_eq!(size_of::<Ipv6Key>(), 16);
        assert_eq!(align_of::<Ipv6Key>(), 4);
        assert_eq!(size_of::<FlowKey6>(), 44);
        assert_eq!(offset_of!(FlowKey6, src_port), 32);
        assert_eq!(offset_of!(FlowKey6, proto), 36);
        assert_eq!(offset_of!(FlowKey6, icmp), 38);
        assert_eq!(offset_of!(FlowKey6, ifindex), 40);
    }
}
