//! The datapath: loads the kernel programs (auth-bpf/ebpf, embedded at build
//! time), attaches them to every local pod's host-side veth, keeps the
//! kernel tables equal to what the control plane says (ipcache, policy) and
//! what this node has (endpoints), and turns the kernel's ring buffers into
//! typed streams (auth signals, flow events).
//!
//! Everything the kernel needs survives the agent: maps and the TCX links
//! are pinned under the pin directory (default `/sys/fs/bpf/keyway`), so an
//! agent restart or crash keeps enforcing the last tables and established
//! flows keep flowing. A new agent reuses the pinned maps, atomically swaps
//! its programs into the pinned links, then reconciles the tables with
//! what it hears from the control plane.

pub mod auth_map;
pub mod drops;
pub mod endpoints;
pub mod events;
pub mod lookup;
pub mod metrics;
pub mod netlink;
pub mod podns;
pub(crate) mod sys;
pub mod tables;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, Map, MapData, RingBuf};
use aya::programs::links::{FdLink, LinkOrder, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use keyway_common::{
    Config, EndpointInfo, IpcacheValue, Ipv4LpmKey, Ipv6Key, PolicyKey, PolicyValue, config_flags,
    endpoint_flags, maps,
};
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, info, warn};

pub use auth_map::{AuthMap, MemoryAuthMap, PinnedAuthMap};
pub use events::{Flow, FlowKind, MissingAuth};
pub use sys::{detach_pinned_link, ifindex, kernel_clock_lag_ns, monotonic_ns};

use crate::state::NodeState;
use keyway_identity::lock::Recover;
use tables::{MapDiff, Tables, diff, ip_key, ip6_key};

/// The kernel programs, built by build.rs from auth-bpf/ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("KEYWAY_BPF_OBJECT"));

/// Program names in the object, and where each one attaches.
const PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    ("keyway_from_pod", TcAttachType::Ingress, "from-pod"),
    ("keyway_to_pod", TcAttachType::Egress, "to-pod"),
];

/// The IPv6 programs, never attached: the attached ones tail-call them
/// through `maps::PROGS` at these slots.
const IPV6_PROGRAMS: [(&str, u32); 2] = [
    ("keyway_from_pod6", keyway_common::prog_index::FROM_POD6),
    ("keyway_to_pod6", keyway_common::prog_index::TO_POD6),
];

pub const DEFAULT_PIN_DIR: &str = maps::PIN_DIR;

/// Datapath settings, from `node-agent run` flags.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    /// A directory on a BPF filesystem; one per node (tests and the demo
    /// run several "nodes" on one kernel).
    pub pin_dir: PathBuf,
    pub node_name: String,
    /// At most one auth signal per pair per this long.
    pub signal_interval: Duration,
    /// At most one drop event per flow per this long.
    pub flow_report_interval: Duration,
    pub flow_capture: bool,
    /// Look for endpoints again whenever the node's links, addresses or
    /// routes change (rtnetlink). Off only to measure polling alone.
    pub netlink: bool,
    /// The safety net beside the netlink events: how often the endpoints are
    /// looked for and the attachments checked anyway. Taking programs off an
    /// interface (another tool detaching them) sends no rtnetlink message,
    /// and this is how long such an interface can stay uncovered.
    pub resync_interval: Duration,
    /// While a local workload's address has no interface yet, look again
    /// after this long, doubling up to `resync_interval`: covers changes that
    /// send the agent no message (a bridge CNI sets the pod's address inside
    /// the pod's namespace, heard here only with CAP_NET_BROADCAST). None:
    /// events and the resync only (the tests use it to prove the events).
    pub unresolved_retry: Option<Duration>,
    /// Endpoint scans prompted by rtnetlink run at most once per this long:
    /// a burst of changes (a CNI plumbing a pod, or a pod flapping its link
    /// to keep the agent busy) costs one scan per gap, not one per message.
    pub min_scan_gap: Duration,
    /// Where the node's processes are read (the pods' namespaces are found
    /// through their processes, see [`podns`]).
    pub proc_root: PathBuf,
    /// Where named network namespaces live (`netns:` selectors).
    pub netns_dir: PathBuf,
    /// How many exact keys the node's policy may gain by folding subjects'
    /// any-peer port entries into their any-port pairs
    /// ([`tables::FOLD_LIMIT`]); subjects past it have the kernel unite two
    /// entries instead. The tests set 0 to drive that path.
    pub policy_fold_limit: usize,
}

impl DatapathConfig {
    pub fn new(pin_dir: impl Into<PathBuf>, node_name: impl Into<String>) -> DatapathConfig {
        DatapathConfig {
            pin_dir: pin_dir.into(),
            node_name: node_name.into(),
            signal_interval: Duration::from_secs(1),
            flow_report_interval: Duration::from_secs(1),
            flow_capture: true,
            netlink: true,
            resync_interval: Duration::from_secs(10),
            unresolved_retry: Some(Duration::from_millis(100)),
            min_scan_gap: Duration::from_millis(20),
            proc_root: PathBuf::from("/proc"),
            netns_dir: PathBuf::from("/var/run/netns"),
            policy_fold_limit: tables::FOLD_LIMIT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "{0} is not on a BPF filesystem: mount one (`mount -t bpf bpf /sys/fs/bpf`) or pass --bpf-pin-dir \
         with a directory on one"
    )]
    NotBpffs(PathBuf),
    #[error(
        "loading the kernel programs: {0} (the agent needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)"
    )]
    Load(String),
    #[error("BPF map {name}: {message}")]
    Map { name: &'static str, message: String },
    #[error("attaching to interface {iface}: {message}")]
    Attach { iface: String, message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl DatapathError {
    fn map(name: &'static str, e: impl std::fmt::Display) -> DatapathError {
        DatapathError::Map {
            name,
            message: e.to_string(),
        }
    }

    fn io(what: impl Into<String>, source: std::io::Error) -> DatapathError {
        DatapathError::Io {
            what: what.into(),
            source,
        }
    }
}

fn open_pinned(pin_dir: &Path, name: &'static str) -> Result<Map, DatapathError> {
    let data = MapData::from_pin(pin_dir.join(name)).map_err(|e| DatapathError::map(name, e))?;
    Map::from_map_data(data).map_err(|e| DatapathError::map(name, e))
}

/// The datapath's configuration slot, shared by everything that bumps the
/// epoch (table changes, auth removals).
pub struct ConfigSlot {
    map: Mutex<Array<MapData, Config>>,
}

impl std::fmt::Debug for ConfigSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSlot").finish_non_exhaustive()
    }
}

impl ConfigSlot {
    pub fn open(pin_dir: &Path) -> Result<ConfigSlot, DatapathError> {
        let map = Array::try_from(open_pinned(pin_dir, maps::CONFIG)?)
            .map_err(|e| DatapathError::map(maps::CONFIG, e))?;
        Ok(ConfigSlot { map: Mutex::new(map) })
    }

    pub fn get(&self) -> Result<Config, DatapathError> {
        let map = self.map.locked();
        map.get(&0, 0).map_err(|e| DatapathError::map(maps::CONFIG, e))
    }

    /// Read-modify-write of the slot.
    pub fn update(&self, f: impl FnOnce(&mut Config)) -> Result<Config, DatapathError> {
        let mut map = self.map.locked();
        let mut c = map.get(&0, 0).map_err(|e| DatapathError::map(maps::CONFIG, e))?;
        f(&mut c);
        map.set(0, c, 0)
            .map_err(|e| DatapathError::map(maps::CONFIG, e))?;
        Ok(c)
    }

    /// Sends every cached flow verdict back through a full evaluation, and
    /// makes the programs read every subject from the ipcache again.
    pub fn bump_epoch(&self) -> Result<(), DatapathError> {
        self.update(|c| c.epoch = c.epoch.wrapping_add(1)).map(|_| ())
    }
}

/// What the datapath has done, for readiness, tests and `explain`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DatapathStatus {
    /// The Sync revision whose tables are in the kernel.
    pub revision: u64,
    /// True once the tables of a complete sync are in the kernel.
    pub synced: bool,
    /// Interfaces with both programs attached.
    pub attached: BTreeSet<String>,
    /// Local endpoints in the endpoint map.
    pub endpoints: BTreeMap<IpAddr, EndpointInfo>,
    /// Local workload addresses with no interface routed to them yet.
    pub unresolved: Vec<IpAddr>,
    /// Of those, addresses of pods behind a bridge that no port is trusted
    /// with, and why (see [`endpoints::BridgePlacer`]).
    pub withheld: BTreeMap<IpAddr, endpoints::Withheld>,
    /// Rule names by the id flow events carry.
    pub rules: Arc<BTreeMap<u32, String>>,
    pub local_node_id: u16,
    /// Interfaces the programs could not be attached to yet, and why.
    pub attach_errors: BTreeMap<String, String>,
    /// Endpoint scans done since the agent started.
    pub scans: u64,
}

/// The loaded programs and the tables the agent writes.
pub struct Datapath {
    ebpf: aya::Ebpf,
    cfg: DatapathConfig,
    config: Arc<ConfigSlot>,
    ipcache: aya::maps::HashMap<MapData, u32, IpcacheValue>,
    lpm: LpmTrie<MapData, Ipv4LpmKey, IpcacheValue>,
    policy: aya::maps::HashMap<MapData, PolicyKey, PolicyValue>,
    endpoints: aya::maps::HashMap<MapData, u32, EndpointInfo>,
    ipcache6: aya::maps::HashMap<MapData, Ipv6Key, IpcacheValue>,
    lpm6: LpmTrie<MapData, Ipv6Key, IpcacheValue>,
    endpoints6: aya::maps::HashMap<MapData, Ipv6Key, EndpointInfo>,
    /// Bridge ports by ifindex (`maps::PORTS`).
    ports: aya::maps::HashMap<MapData, u32, EndpointInfo>,
    ports_applied: Option<HashMap<u32, EndpointInfo>>,
    /// What the maps hold, once read or written.
    applied: Option<Tables>,
    endpoints_applied: Option<HashMap<IpAddr, EndpointInfo>>,
    /// Which bridge port each pod behind a bridge is placed behind: the
    /// one into its network namespace (see [`endpoints::BridgePlacer`]).
    bridged: endpoints::BridgePlacer,
    /// The node's processes by pod, for finding pods' namespaces.
    processes: podns::Processes,
    /// Whether BRIDGED_PORTS is set in the config, as last written.
    bridged_ports: Option<bool>,
    status: DatapathStatus,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.cfg.pin_dir)
            .field("attached", &self.status.attached)
            .finish_non_exhaustive()
    }
}

fn take<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<Map>,
    T::Error: std::fmt::Display,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| DatapathError::Load(format!("the object has no map {name}")))?;
    T::try_from(map).map_err(|e| DatapathError::map(name, e))
}

/// Key and value sizes of every pinned map whose entries have a layout, as
/// this build's programs use them.
fn map_layouts() -> [(&'static str, usize, usize); 14] {
    use keyway_common::*;
    use std::mem::size_of;
    [
        (maps::IPCACHE, size_of::<u32>(), size_of::<IpcacheValue>()),
        (
            maps::IPCACHE_LPM,
            4 + size_of::<Ipv4LpmKey>(),
            size_of::<IpcacheValue>(),
        ),
        (maps::ENDPOINTS, size_of::<u32>(), size_of::<EndpointInfo>()),
        (maps::IPCACHE6, size_of::<Ipv6Key>(), size_of::<IpcacheValue>()),
        (
            maps::IPCACHE6_LPM,
            4 + size_of::<Ipv6Key>(),
            size_of::<IpcacheValue>(),
        ),
        (maps::ENDPOINTS6, size_of::<Ipv6Key>(), size_of::<EndpointInfo>()),
        (maps::FLOW_TABLE6, size_of::<FlowKey6>(), size_of::<FlowState>()),
        (maps::PORTS, size_of::<u32>(), size_of::<EndpointInfo>()),
        (maps::POLICY, size_of::<PolicyKey>(), size_of::<PolicyValue>()),
        (maps::AUTH, size_of::<AuthKey>(), size_of::<AuthValue>()),
        (maps::AUTH_DEDUP, size_of::<AuthKey>(), size_of::<u64>()),
        (maps::FLOW_TABLE, size_of::<FlowKey>(), size_of::<FlowState>()),
        (maps::CONFIG, size_of::<u32>(), size_of::<Config>()),
        (maps::DROPS, size_of::<u32>(), size_of::<u64>()),
    ]
}

/// Unpins maps left by an earlier agent whose key or value layout differs
/// from this build's (an upgrade that changed a map's ABI). The loader would
/// otherwise reuse them and the kernel would reject the programs, or worse,
/// read entries of the wrong shape. The old programs keep their own
/// references until this agent swaps its programs into the links, so
/// enforcement continues meanwhile; the new map starts empty and the agent
/// fills it from its state (auth entries are re-established, the flow table
/// is a cache). A replaced config map takes the flow tables with it (their
/// verdicts are stamped with its epochs; one that cannot be unpinned fails
/// the load), and what it held is returned for the new one, where it can be
/// read (a config of the one earlier layout, whose fields the current one
/// begins with). The old programs, still attached, keep reading the old
/// config, which no agent bumps any more: it is left with its cached
/// verdicts and subject memo turned off, so they judge every packet by the
/// tables this agent writes until their links are swapped.
fn retire_changed_maps(pin_dir: &Path) -> Result<Option<Config>, DatapathError> {
    let mut carried = None;
    let mut config_retired = false;
    for (name, key, value) in map_layouts() {
        let path = pin_dir.join(name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&path) else {
            continue;
        };
        let (k, v) = (info.key_size() as usize, info.value_size() as usize);
        if (k, v) != (key, value) {
            warn!(
                map = name,
                pinned_key = k,
                pinned_value = v,
                key,
                value,
                "a pinned map has the layout of another Keyway version; replacing it"
            );
            if name == maps::CONFIG {
                config_retired = true;
                carried = retire_old_config(&path);
                if carried.is_none() {
                    warn!(
                        "the old config map cannot be read: the epoch starts again from 0 (the flow tables are replaced)"
                    );
                }
            }
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(map = name, error = %e, "cannot unpin the old map");
            }
        }
    }
    if config_retired {
        for name in [maps::FLOW_TABLE, maps::FLOW_TABLE6] {
            match std::fs::remove_file(pin_dir.join(name)) {
                Ok(()) => info!(map = name, "flow table replaced with the config map"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(DatapathError::io(
                        format!("unpinning {name}, whose verdicts the replaced config map's epochs stamp"),
                        e,
                    ));
                }
            }
        }
    }
    Ok(carried)
}

/// The config an agent of the earlier layout (24 bytes: the epoch, node id
/// and flags, then the two intervals) left in the pinned map at `path`,
/// which is then bumped and told to cache nothing (see
/// [`retire_changed_maps`]; the flags are as old as that layout).
fn retire_old_config(path: &Path) -> Option<Config> {
    let data = MapData::from_pin(path).ok()?;
    let mut old: Array<MapData, [u8; 24]> = Array::try_from(Map::Array(data)).ok()?;
    let b = old.get(&0, 0).ok()?;
    let word = |at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let config = Config {
        epoch: u32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")),
        local_node_id: u16::from_ne_bytes([b[4], b[5]]),
        flags: b[6],
        _pad: 0,
        signal_interval_ns: word(8),
        flow_report_interval_ns: word(16),
        jiffy_ns: 0,
        clock_base_ns: 0,
    };
    let mut frozen = b;
    frozen[0..4].copy_from_slice(&config.epoch.wrapping_add(1).to_ne_bytes());
    frozen[6] |= config_flags::NO_VERDICT_CACHE | config_flags::NO_SUBJECT_MEMO;
    if let Err(e) = old.set(0, frozen, 0) {
        warn!(error = %e, "cannot turn the old programs' caches off; they judge from their cache until swapped");
    }
    Some(config)
}

/// Program `name` of the object, loaded into the kernel (once: a program
/// loaded already is returned as it is).
fn load_program<'a>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut SchedClassifier, DatapathError> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| DatapathError::Load(format!("the object has no program {name}")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| DatapathError::Load(e.to_string()))?;
    if prog.fd().is_err() {
        prog.load()
            .map_err(|e| DatapathError::Load(format!("{name}: {e}")))?;
        log_verified(name, prog);
    }
    Ok(prog)
}

/// The programs' clock (`Config::jiffy_ns`): the tick, and the monotonic
/// time jiffy 0 stands for. The kernel moves jiffies on by one for every
/// tick of monotonic time, each at or just after the tick's own time, so
/// `now - jiffies * tick` is at least the base, and close to it just after
/// jiffies moves: `keyway_clock` (run with BPF_PROG_TEST_RUN) reads jiffies
/// and the precise monotonic clock together, and the first reading of a new
/// jiffy, taken within [`EDGE_NS`] of the last reading of the one before,
/// gives the base (that late at most, so the clock reads that much ahead at
/// most, and never more than a tick behind). An edge seen across a longer
/// gap (this thread was preempted between two readings) is passed over for
/// the next. Measured once: the tie holds for as long as the kernel runs.
/// Polled for up to ten ticks; failing a close edge, the smallest
/// difference seen is kept, up to a tick ahead (auth entries then expire up
/// to a tick early, never late), and said.
fn measure_clock(ebpf: &mut aya::Ebpf) -> Result<(u64, u64), DatapathError> {
    use aya::programs::{TestRun, TestRunOptions};
    /// How close to the jiffy edge its first reading must be.
    const EDGE_NS: u64 = 50_000;
    let prog = load_program(ebpf, "keyway_clock")?;
    let jiffy_ns = sys::kernel_clock_lag_ns();
    let frame = [0u8; 64];
    let read = || -> Result<Option<(u64, u64)>, DatapathError> {
        let mut out = [0u8; 64];
        let run = prog
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .map_err(|e| DatapathError::Load(format!("keyway_clock: {e}")))?;
        if run.return_value != 0 {
            return Err(DatapathError::Load(format!(
                "keyway_clock returned {}",
                run.return_value
            )));
        }
        let word = |i: usize| u64::from_ne_bytes(out[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let (before, ns, after) = (word(0), word(1), word(2));
        Ok((before == after).then_some((before, ns)))
    };
    // Wrapping: `a` is below `b` when `b - a` is less than half the range.
    let below = |a: u64, b: u64| b.wrapping_sub(a) < u64::MAX / 2 && a != b;
    // The last reading: its jiffy and its time.
    let mut last: Option<(u64, u64)> = None;
    let mut least: Option<u64> = None;
    let deadline = std::time::Instant::now() + Duration::from_nanos(10 * jiffy_ns);
    while std::time::Instant::now() < deadline {
        let Some((jiffies, ns)) = read()? else {
            last = None;
            continue;
        };
        let base = ns.wrapping_sub(jiffies.wrapping_mul(jiffy_ns));
        if let Some((j, at)) = last
            && j != jiffies
            && ns.wrapping_sub(at) <= EDGE_NS
        {
            debug!(
                jiffy_ns,
                clock_base_ns = base,
                "datapath clock tied to CLOCK_MONOTONIC"
            );
            return Ok((jiffy_ns, base));
        }
        last = Some((jiffies, ns));
        least = Some(match least {
            Some(l) if below(l, base) => l,
            _ => base,
        });
    }
    let base = least.ok_or_else(|| {
        DatapathError::Load("keyway_clock: no reading of jiffies without a tick between its reads".into())
    })?;
    warn!(
        jiffy_ns,
        "no jiffy edge was seen up close while the datapath clock was measured; it may read up to a tick ahead"
    );
    Ok((jiffy_ns, base))
}

/// How much of the verifier's budget (1M instructions) a program took: a
/// program near it may not load on a kernel whose verifier is a little
/// stricter.
fn log_verified(name: &str, prog: &SchedClassifier) {
    if let Some(n) = prog.info().ok().and_then(|i| i.verified_instruction_count()) {
        debug!(program = name, verified_instructions = n, "program loaded");
        if std::env::var_os("KEYWAY_VERIFIER_STATS").is_some() {
            eprintln!("verified {name}: {n}");
        }
    }
}

impl Datapath {
    /// Loads the programs, reusing (or creating and pinning) the maps in
    /// `cfg.pin_dir`. Nothing is attached yet.
    pub fn load(cfg: DatapathConfig) -> Result<Datapath, DatapathError> {
        let sys_bpf = Path::new("/sys/fs/bpf");
        if cfg.pin_dir.starts_with(sys_bpf) && !sys::is_bpffs(sys_bpf) {
            // Checked again under a lock: two agents starting together must
            // not stack two filesystems (the first one's pins would vanish).
            sys::with_file_lock(Path::new("/run/keyway-bpffs.lock"), || {
                if sys::is_bpffs(sys_bpf) {
                    return Ok(());
                }
                info!("no BPF filesystem at /sys/fs/bpf; mounting one");
                sys::mount_bpffs(sys_bpf)
            })
            .and_then(|r| r)
            .map_err(|e| DatapathError::io("mounting a BPF filesystem on /sys/fs/bpf", e))?;
        }
        std::fs::create_dir_all(&cfg.pin_dir)
            .map_err(|e| DatapathError::io(format!("creating {}", cfg.pin_dir.display()), e))?;
        if !sys::is_bpffs(&cfg.pin_dir) {
            return Err(DatapathError::NotBpffs(cfg.pin_dir.clone()));
        }
        let links = cfg.pin_dir.join("links");
        std::fs::create_dir_all(&links)
            .map_err(|e| DatapathError::io(format!("creating {}", links.display()), e))?;
        let carried = retire_changed_maps(&cfg.pin_dir)?;
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(&cfg.pin_dir)
            .load(OBJECT)
            .map_err(|e| DatapathError::Load(e.to_string()))?;
        for (name, _, _) in PROGRAMS {
            load_program(&mut ebpf, name)?;
        }
        let config = Arc::new(ConfigSlot {
            map: Mutex::new(take(&mut ebpf, maps::CONFIG)?),
        });
        // A config map of another layout was replaced by an empty one: what
        // the last agent had in it goes on, written at once (a load that
        // fails after this point and is tried again finds the new layout
        // and nothing left to carry). The epoch most of all: counting again
        // from 0 would bring verdicts cached under old epochs back to life
        // as it passed them (the flow tables went too).
        if let Some(old) = carried {
            config.update(|c| {
                c.epoch = old.epoch.wrapping_add(1);
                c.local_node_id = old.local_node_id;
                c.flags = old.flags;
            })?;
        }
        let mut flags = if cfg.flow_capture {
            config_flags::FLOW_CAPTURE
        } else {
            0
        };
        // On a PREEMPT_RT kernel a program run can be preempted by another
        // on the same CPU, which could read a memo slot half written: the
        // subject is read from the ipcache there.
        if sys::is_realtime() {
            flags |= config_flags::NO_SUBJECT_MEMO;
        }
        let (jiffy_ns, clock_base_ns) = measure_clock(&mut ebpf)?;
        config.update(|c| {
            // Whether the pinned endpoints include bridge ports is the last
            // agent's finding, kept until this one's first scan.
            c.flags = flags | (c.flags & config_flags::BRIDGED_PORTS);
            c.signal_interval_ns = cfg.signal_interval.as_nanos() as u64;
            c.flow_report_interval_ns = cfg.flow_report_interval.as_nanos() as u64;
            c.jiffy_ns = jiffy_ns;
            c.clock_base_ns = clock_base_ns;
        })?;
        // The IPv6 programs go into their slots after the config is written
        // (they read it from their first run) and before any program of
        // this agent is attached: a slot replaced is replaced at once for
        // every caller, an older agent's programs included.
        let mut progs: aya::maps::ProgramArray<MapData> = take(&mut ebpf, maps::PROGS)?;
        for (name, slot) in IPV6_PROGRAMS {
            let prog = load_program(&mut ebpf, name)?;
            let fd = prog
                .fd()
                .map_err(|e| DatapathError::Load(format!("{name}: {e}")))?;
            progs
                .set(slot, fd, 0)
                .map_err(|e| DatapathError::map(maps::PROGS, e))?;
        }
        let dp = Datapath {
            ipcache: take(&mut ebpf, maps::IPCACHE)?,
            lpm: take(&mut ebpf, maps::IPCACHE_LPM)?,
            policy: take(&mut ebpf, maps::POLICY)?,
            endpoints: take(&mut ebpf, maps::ENDPOINTS)?,
            ipcache6: take(&mut ebpf, maps::IPCACHE6)?,
            lpm6: take(&mut ebpf, maps::IPCACHE6_LPM)?,
            endpoints6: take(&mut ebpf, maps::ENDPOINTS6)?,
            ports: take(&mut ebpf, maps::PORTS)?,
            ports_applied: None,
            ebpf,
            cfg,
            config,
            applied: None,
            endpoints_applied: None,
            bridged: endpoints::BridgePlacer::default(),
            processes: podns::Processes::default(),
            bridged_ports: None,
            status: DatapathStatus::default(),
        };
        dp.forget_stale_links();
        Ok(dp)
    }

    pub fn config(&self) -> Arc<ConfigSlot> {
        self.config.clone()
    }

    pub fn pin_dir(&self) -> &Path {
        &self.cfg.pin_dir
    }

    pub fn status(&self) -> &DatapathStatus {
        &self.status
    }

    /// Loads (if needed) and pins one program of the object at `path`, for
    /// tools that run it outside an attachment (`bpftool prog run` in the
    /// benchmarks). `keyway_empty` is the do-nothing baseline.
    pub fn pin_program(&mut self, name: &str, path: &Path) -> Result<(), DatapathError> {
        let prog = load_program(&mut self.ebpf, name)?;
        prog.pin(path)
            .map_err(|e| DatapathError::Load(format!("pinning {name} at {}: {e}", path.display())))
    }

    /// Opens the pinned auth map (sharing this datapath's epoch).
    pub fn auth_map(&self) -> Result<PinnedAuthMap, DatapathError> {
        PinnedAuthMap::open_with(&self.cfg.pin_dir, self.config.clone())
    }

    fn link_pin(&self, iface: &str, ifindex: u32, suffix: &str) -> PathBuf {
        self.cfg
            .pin_dir
            .join("links")
            .join(format!("{iface}@{ifindex}@{suffix}"))
    }

    /// Attaches both programs to `iface` (a pod's host-side veth), replacing
    /// in place whatever an earlier agent attached there, so there is no
    /// moment without enforcement.
    pub fn attach(&mut self, iface: &str) -> Result<(), DatapathError> {
        let err = |message: String| DatapathError::Attach {
            iface: iface.to_string(),
            message,
        };
        let ifindex = sys::ifindex(iface).ok_or_else(|| err("no such interface".into()))?;
        for (name, attach_type, suffix) in PROGRAMS {
            let pin = self.link_pin(iface, ifindex, suffix);
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .expect("programs checked at load")
                .try_into()
                .expect("programs checked at load");
            let replaced = match PinnedLink::from_pin(&pin) {
                Ok(old) => {
                    let swap = SchedClassifierLink::try_from(FdLink::from(old))
                        .map_err(|e| e.to_string())
                        .and_then(|link| prog.attach_to_link(link).map_err(|e| e.to_string()))
                        .and_then(|id| prog.take_link(id).map_err(|e| e.to_string()));
                    match swap {
                        // Still pinned (bpffs names have no dots): dropping our handle leaves it attached.
                        Ok(_link) => true,
                        Err(e) => {
                            warn!(iface, error = %e, "the pinned link is unusable; attaching afresh");
                            let _ = std::fs::remove_file(&pin);
                            false
                        }
                    }
                }
                Err(_) => false,
            };
            if !replaced {
                let id = prog
                    .attach_with_options(
                        iface,
                        attach_type,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(|e| err(format!("{name}: {e}")))?;
                let link = prog.take_link(id).map_err(|e| err(e.to_string()))?;
                let link = FdLink::try_from(link).map_err(|e| err(e.to_string()))?;
                link.pin(&pin)
                    .map_err(|e| err(format!("pinning {}: {e}", pin.display())))?;
            }
        }
        self.status.attached.insert(iface.to_string());
        Ok(())
    }

    /// Detaches both programs from `iface`, at once (see
    /// [`sys::detach_pinned_link`]), and removes their pinned links.
    pub fn detach(&mut self, iface: &str) {
        let prefix = format!("{iface}@");
        for path in self.link_pins(|name| name.starts_with(&prefix)) {
            if let Err(e) = sys::detach_pinned_link(&path) {
                warn!(iface, link = %path.display(), error = %e, "detaching a link; its removal detaches it later");
            }
            let _ = std::fs::remove_file(&path);
        }
        self.status.attached.remove(iface);
    }

    fn link_pins(&self, matches: impl Fn(&str) -> bool) -> Vec<PathBuf> {
        let Ok(dir) = std::fs::read_dir(self.cfg.pin_dir.join("links")) else {
            return Vec::new();
        };
        dir.flatten()
            .filter(|entry| matches(&entry.file_name().to_string_lossy()))
            .map(|entry| entry.path())
            .collect()
    }

    fn remove_link_pins(&self, matches: impl Fn(&str) -> bool) {
        for path in self.link_pins(matches) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Link pins whose interface is gone (or was recreated with another
    /// index) hold nothing but kernel memory.
    fn forget_stale_links(&self) {
        self.remove_link_pins(|name| {
            let Some((iface, rest)) = name.split_once('@') else {
                return true;
            };
            let index = rest.split('@').next().and_then(|i| i.parse::<u32>().ok());
            sys::ifindex(iface) != index
        });
    }

    /// Makes the ipcache and policy maps hold exactly what `state` says.
    /// The first call after load compares with what the maps hold (an
    /// earlier agent's tables); later calls send only the differences.
    pub fn apply_tables(&mut self, state: &NodeState) -> Result<(), DatapathError> {
        let new = Tables::from_state_with(state, self.cfg.policy_fold_limit);
        for s in &new.skipped {
            warn!(entry = %s, "not representable in the datapath; skipped");
        }
        // The first call after load judges every flow again once: the last
        // agent may have stopped between its writes and its epoch bump.
        let (old, first) = match self.applied.take() {
            Some(t) => (t, false),
            None => (self.read_tables()?, true),
        };
        let written = self.write_tables(&old, &new);
        let node_id = state
            .nodes
            .get(&self.cfg.node_name)
            .and_then(|n| u16::try_from(n.node_id).ok())
            .unwrap_or(0);
        let cur = self.config.get()?;
        // Any change may deny something that was allowed, a write that
        // failed half-way included (the next call reads the maps again and
        // no longer sees what it wrote): judge every flow again on its next
        // packet.
        if first || !matches!(written, Ok(false)) || cur.local_node_id != node_id {
            self.config.update(|c| {
                c.local_node_id = node_id;
                c.epoch = c.epoch.wrapping_add(1);
            })?;
        }
        written?;
        self.status.rules = Arc::new(new.rules.clone());
        self.status.local_node_id = node_id;
        self.status.revision = state.revision;
        self.status.synced = state.synced;
        self.applied = Some(new);
        Ok(())
    }

    /// Writes the differences from `old` to `new`; true if there were any.
    ///
    /// The ipcache first, marking absent only the policy shapes neither the
    /// old nor the new policy has. Then, if that changed anything and the
    /// policy changes too, a new epoch and a wait for every program run
    /// under way: a run that read an address before that write, from the
    /// map or from the programs' per-CPU subject memo (which keeps a read
    /// for the epoch it was made in), would judge it by its old identity or
    /// marks against the policy written next, a state neither side is (an
    /// old mark could skip an entry written next). Then the policy, in
    /// [`tables::policy_writes`] order (a packet judged between two writes
    /// gets the old verdict or the new one); then the new policy's marks
    /// (see `Tables::between`), which only skip more.
    fn write_tables(&mut self, old: &Tables, new: &Tables) -> Result<bool, DatapathError> {
        let between = new.between(&old.policy);
        let mut changed = self.write_ipcache(old, &between)?;
        let writes = tables::policy_writes(&old.policy, &new.policy);
        if changed && !writes.is_empty() {
            self.config.bump_epoch()?;
            sys::wait_for_program_runs();
        }
        for w in writes {
            changed = true;
            match w {
                tables::PolicyWrite::Upsert(k, v) => self
                    .policy
                    .insert(k, v, 0)
                    .map_err(|e| DatapathError::map(maps::POLICY, e))?,
                tables::PolicyWrite::Delete(k) => {
                    let _ = self.policy.remove(&k);
                }
            }
        }
        changed |= self.write_ipcache(&between, new)?;
        Ok(changed)
    }

    /// Writes the ipcache and LPM differences from `old` to `new`; true if
    /// there were any.
    fn write_ipcache(&mut self, old: &Tables, new: &Tables) -> Result<bool, DatapathError> {
        let d = diff(&old.ipcache, &new.ipcache);
        let mut changed = !d.is_empty();
        write_hash(&mut self.ipcache, d, maps::IPCACHE)?;
        let d = diff(&old.lpm, &new.lpm);
        changed |= !d.is_empty();
        for ((len, addr), v) in d.upserts {
            self.lpm
                .insert(&Key::new(len, Ipv4LpmKey { addr }), v, 0)
                .map_err(|e| DatapathError::map(maps::IPCACHE_LPM, e))?;
        }
        for (len, addr) in d.deletes {
            let _ = self.lpm.remove(&Key::new(len, Ipv4LpmKey { addr }));
        }
        let d = diff(&old.ipcache6, &new.ipcache6);
        changed |= !d.is_empty();
        write_hash(&mut self.ipcache6, d, maps::IPCACHE6)?;
        let d = diff(&old.lpm6, &new.lpm6);
        changed |= !d.is_empty();
        for ((len, addr), v) in d.upserts {
            self.lpm6
                .insert(&Key::new(len, addr), v, 0)
                .map_err(|e| DatapathError::map(maps::IPCACHE6_LPM, e))?;
        }
        for (len, addr) in d.deletes {
            let _ = self.lpm6.remove(&Key::new(len, addr));
        }
        Ok(changed)
    }

    fn read_tables(&self) -> Result<Tables, DatapathError> {
        let mut t = Tables::default();
        for item in self.ipcache.iter() {
            let (k, v) = item.map_err(|e| DatapathError::map(maps::IPCACHE, e))?;
            t.ipcache.insert(k, v);
        }
        for item in self.lpm.iter() {
            let (k, v) = item.map_err(|e| DatapathError::map(maps::IPCACHE_LPM, e))?;
            t.lpm.insert((k.prefix_len(), k.data().addr), v);
        }
        for item in self.ipcache6.iter() {
            let (k, v) = item.map_err(|e| DatapathError::map(maps::IPCACHE6, e))?;
            t.ipcache6.insert(k, v);
        }
        for item in self.lpm6.iter() {
            let (k, v) = item.map_err(|e| DatapathError::map(maps::IPCACHE6_LPM, e))?;
            t.lpm6.insert((k.prefix_len(), k.data()), v);
        }
        for item in self.policy.iter() {
            let (k, v) = item.map_err(|e| DatapathError::map(maps::POLICY, e))?;
            t.policy.insert(k, v);
        }
        Ok(t)
    }

    /// Finds the interface of every local workload address, attaches to new
    /// ones, detaches from ones no workload uses, and fills the endpoint map.
    pub fn apply_endpoints(&mut self, state: &NodeState) -> Result<(), DatapathError> {
        self.status.scans += 1;
        let mut routes = endpoints::parse_routes(
            &endpoints::read_proc_net("route")
                .map_err(|e| DatapathError::io("reading /proc/net/route", e))?,
        );
        // Absent when the kernel has IPv6 off: no IPv6 routes, then.
        match endpoints::read_proc_net("ipv6_route") {
            Ok(text) => routes.extend(endpoints::parse_routes6(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DatapathError::io("reading /proc/net/ipv6_route", e)),
        }
        let links = netlink::links()
            .map_err(|e| DatapathError::io("listing the node's interfaces (rtnetlink)", e))?;
        let by_name: HashMap<&str, &netlink::Link> = links.iter().map(|l| (l.name.as_str(), l)).collect();
        let local: Vec<(IpAddr, u32, &endpoints::WorkloadKey)> = state
            .workloads
            .iter()
            .filter(|(_, w)| w.node == self.cfg.node_name)
            .flat_map(|(key, w)| {
                w.ips
                    .iter()
                    .filter_map(|s| s.parse::<IpAddr>().ok())
                    .map(move |ip| (ip.to_canonical(), w.identity, key))
            })
            .collect();

        // First scan of this agent: read what the last one left in the
        // endpoint map.
        let first_scan = self.endpoints_applied.is_none();
        let old = match self.endpoints_applied.take() {
            Some(e) => e,
            None => {
                let mut m = HashMap::new();
                for item in self.endpoints.iter() {
                    let (k, v) = item.map_err(|e| DatapathError::map(maps::ENDPOINTS, e))?;
                    m.insert(IpAddr::from(k.to_ne_bytes()), v);
                }
                for item in self.endpoints6.iter() {
                    let (k, v) = item.map_err(|e| DatapathError::map(maps::ENDPOINTS6, e))?;
                    m.insert(IpAddr::from(k.addr), v);
                }
                m
            }
        };

        // Behind a bridge: the port into the pod's namespace.
        let mut wanted: BTreeMap<endpoints::WorkloadKey, endpoints::Wanted> = BTreeMap::new();
        let mut bridge_of: HashMap<IpAddr, u32> = HashMap::new();
        for (ip, _, key) in &local {
            if let Some(l) = endpoints::interface_for(&routes, *ip).and_then(|i| by_name.get(i))
                && l.kind == "bridge"
            {
                bridge_of.insert(*ip, l.index);
                // A pod whose addresses are routed to several bridges is
                // placed on the first; the others stay unresolved.
                wanted.entry((*key).clone()).or_insert_with(|| endpoints::Wanted {
                    bridge: l.index,
                    homes: state
                        .workloads
                        .get(*key)
                        .map(|w| podns::homes(&w.selectors))
                        .unwrap_or_default(),
                });
            }
        }
        let bridges: BTreeSet<u32> = wanted.values().map(|w| w.bridge).collect();
        // Every veth port of a bridge that pods are routed to gets the
        // programs, whether or not a pod is placed behind it yet: what a
        // port with no endpoint sends is dropped (source-spoofed), but for
        // address probes.
        let ports: Vec<netlink::Link> = links
            .iter()
            .filter(|l| bridges.contains(&l.master) && l.kind == "veth")
            .cloned()
            .collect();
        if first_scan {
            // The MACs the last agent placed pods with come first.
            for (ip, _, key) in &local {
                if let Some(v) = old.get(ip)
                    && v.flags & endpoint_flags::BRIDGED != 0
                {
                    self.bridged.remember((*key).clone(), v.mac);
                }
            }
        }
        let mut resolver =
            podns::Resolver::new(&self.cfg.proc_root, &self.cfg.netns_dir, &mut self.processes);
        let withheld = self.bridged.place(
            &ports,
            &wanted,
            |homes| resolver.nsids(homes),
            |nsid, index| {
                netlink::link_in(nsid, index)
                    .map(|l| l.and_then(|l| l.mac))
                    .map_err(|e| format!("reading the pod's end of its veth: {e}"))
            },
        );
        let withheld: BTreeMap<IpAddr, endpoints::Withheld> = local
            .iter()
            .filter_map(|(ip, _, key)| withheld.get(*key).map(|w| (*ip, w.clone())))
            .collect();
        for (ip, w) in &withheld {
            // Said once per distinct finding, not on every scan.
            if self.status.withheld.get(ip) != Some(w) {
                warn!(address = %ip, reason = ?w, "not placing a local workload behind a bridge port; what its port sends is dropped as source-spoofed until it can be");
            }
        }
        self.status.withheld = withheld;

        let mut desired: HashMap<IpAddr, EndpointInfo> = HashMap::new();
        let mut ifaces: BTreeSet<String> = ports.iter().map(|p| p.name.clone()).collect();
        let mut unresolved = Vec::new();
        for (ip, identity, key) in local {
            // A bridged endpoint carries its pod's MAC: the only source
            // MAC its port may send from.
            let found = if let Some(bridge) = bridge_of.get(&ip) {
                self.bridged
                    .port_of(key)
                    .filter(|(l, _)| l.master == *bridge)
                    .map(|(l, mac)| (l, mac, endpoint_flags::BRIDGED))
            } else {
                endpoints::interface_for(&routes, ip)
                    .and_then(|i| by_name.get(i).copied())
                    .map(|l| (l, [0; 6], 0))
            };
            let Some((link, mac, flags)) = found else {
                unresolved.push(ip);
                continue;
            };
            desired.insert(
                ip,
                EndpointInfo {
                    ifindex: link.index,
                    identity,
                    mac,
                    flags,
                    ..EndpointInfo::default()
                },
            );
            ifaces.insert(link.name.clone());
        }
        // Every bridge port: its placed pod's endpoint (its MAC), or an
        // empty entry, so what a port sends that names no address of the
        // pod's (IPv6 neighbour discovery from a link-local address) is
        // held to that MAC, and nothing passes a port nobody is placed at.
        let mut desired_ports: HashMap<u32, EndpointInfo> =
            ports.iter().map(|p| (p.index, EndpointInfo::default())).collect();
        for ep in desired.values() {
            if ep.flags & endpoint_flags::BRIDGED != 0
                && let Some(slot) = desired_ports.get_mut(&ep.ifindex)
            {
                *slot = EndpointInfo {
                    ifindex: ep.ifindex,
                    identity: ep.identity,
                    mac: ep.mac,
                    flags: ep.flags,
                    ..EndpointInfo::default()
                };
            }
        }
        let old_ports = match self.ports_applied.take() {
            Some(p) => p,
            None => {
                let mut m = HashMap::new();
                for item in self.ports.iter() {
                    let (k, v) = item.map_err(|e| DatapathError::map(maps::PORTS, e))?;
                    m.insert(k, v);
                }
                m
            }
        };
        write_hash(&mut self.ports, diff(&old_ports, &desired_ports), maps::PORTS)?;
        self.ports_applied = Some(desired_ports);
        // The L2 checks (misdelivery, ARP and neighbour discovery senders)
        // run while any attached interface is a bridge port: on before the
        // endpoints they guard are written, once the ports are.
        let bridged = !ports.is_empty();
        if self.bridged_ports != Some(bridged) {
            self.config.update(|c| {
                if bridged {
                    c.flags |= config_flags::BRIDGED_PORTS;
                } else {
                    c.flags &= !config_flags::BRIDGED_PORTS;
                }
            })?;
            self.bridged_ports = Some(bridged);
        }
        // An attachment can go away under us (the link made defunct, another
        // tool detaching it): check that both programs still sit on every
        // interface we think is covered, and attach again where not.
        let lost: Vec<String> = self
            .status
            .attached
            .iter()
            .filter(|i| ifaces.contains(*i) && !programs_attached(i))
            .cloned()
            .collect();
        // Attached again below, in place: the program still there keeps its
        // link (swapped, never off the hook), the missing one is attached
        // afresh.
        for iface in lost {
            warn!(iface = %iface, "the datapath's programs are no longer attached here; attaching again");
            self.status.attached.remove(&iface);
        }
        let gone: Vec<String> = self.status.attached.difference(&ifaces).cloned().collect();
        for iface in gone {
            info!(iface = %iface, "no local workload uses this interface any more; detaching");
            self.detach(&iface);
        }
        self.status.attach_errors.retain(|i, _| ifaces.contains(i));
        for iface in &ifaces {
            if !self.status.attached.contains(iface) {
                match self.attach(iface) {
                    Ok(()) => {
                        info!(iface = %iface, "datapath attached");
                        self.status.attach_errors.remove(iface);
                    }
                    Err(e) => {
                        // Said once per distinct reason, not on every scan.
                        let msg = e.to_string();
                        if self.status.attach_errors.get(iface) != Some(&msg) {
                            warn!(error = %msg, "could not attach the datapath; will retry");
                        }
                        self.status.attach_errors.insert(iface.clone(), msg);
                    }
                }
            }
        }
        let d = diff(&old, &desired);
        let changed = !d.is_empty();
        let (endpoints, endpoints6) = (&mut self.endpoints, &mut self.endpoints6);
        let written = (|| {
            for (k, v) in d.upserts {
                match k {
                    IpAddr::V4(ip) => endpoints
                        .insert(ip_key(ip), v, 0)
                        .map_err(|e| DatapathError::map(maps::ENDPOINTS, e))?,
                    IpAddr::V6(ip) => endpoints6
                        .insert(ip6_key(ip), v, 0)
                        .map_err(|e| DatapathError::map(maps::ENDPOINTS6, e))?,
                }
            }
            for k in d.deletes {
                let _ = match k {
                    IpAddr::V4(ip) => endpoints.remove(&ip_key(ip)),
                    IpAddr::V6(ip) => endpoints6.remove(&ip6_key(ip)),
                };
            }
            Ok(())
        })();
        // Also when a write failed half-way: the programs' memo of who owns
        // which address (and every cached verdict) must not outlive what
        // was written, and the next scan reads the map again and sees no
        // change to bump for.
        if changed {
            self.config.bump_epoch()?;
        }
        written?;
        self.status.endpoints = desired.iter().map(|(k, v)| (*k, *v)).collect();
        self.status.unresolved = unresolved;
        self.endpoints_applied = Some(desired);
        Ok(())
    }
}

/// True when both programs are attached (TCX) to `iface`. A failed query
/// (the interface is gone) counts as attached: the scan's own bookkeeping
/// handles vanished interfaces.
fn programs_attached(iface: &str) -> bool {
    PROGRAMS.iter().all(
        |(name, attach_type, _)| match SchedClassifier::query_tcx(iface, *attach_type) {
            Ok((_, programs)) => programs.iter().any(|p| p.name_as_str() == Some(*name)),
            Err(_) => true,
        },
    )
}

/// What the rest of the agent gets from a running datapath.
#[derive(Debug)]
pub struct DatapathHandles {
    pub auth: Arc<PinnedAuthMap>,
    pub config: Arc<ConfigSlot>,
    /// Pairs that need authentication (one consumer).
    pub signals: mpsc::Receiver<MissingAuth>,
    /// Flow events (subscribe for a receiver).
    pub flows: broadcast::Sender<Flow>,
    pub status: watch::Receiver<DatapathStatus>,
    /// The sending side of `signals`, for its depth (`keyway_signal_queue_depth`).
    pub signal_queue: mpsc::WeakSender<MissingAuth>,
    /// Signals read from the kernel (`keyway_datapath_signals_total`).
    pub signal_counts: Arc<events::SignalCounts>,
}

/// Capacity of the signal queue between the ring buffer and the handshake
/// driver; beyond it signals wait for the kernel's next reminder.
const SIGNAL_QUEUE: usize = 4096;
const FLOW_CHANNEL: usize = 16 * 1024;

/// Loads the datapath and runs it: tables follow `state`, endpoints are
/// looked for again on every change of the node's links, addresses and
/// routes (and every `resync_interval` as a safety net), ring buffers are
/// drained into the returned streams. Must run on a runtime whose threads are in the node's
/// network namespace (always true for the agent binary).
pub fn start(
    cfg: DatapathConfig,
    mut state: watch::Receiver<Arc<NodeState>>,
    shutdown: watch::Receiver<bool>,
) -> Result<DatapathHandles, DatapathError> {
    let resync = cfg.resync_interval;
    let first_retry = cfg.unresolved_retry;
    let min_scan_gap = cfg.min_scan_gap;
    // Subscribed before the first scan, so no change between the two is missed.
    let mut changes =
        if cfg.netlink {
            Some(netlink::NetlinkWatch::subscribe().map_err(|e| {
                DatapathError::io("subscribing to rtnetlink link, address and route changes", e)
            })?)
        } else {
            None
        };
    let mut dp = Datapath::load(cfg)?;
    let auth = Arc::new(dp.auth_map()?);
    let signals_ring: RingBuf<MapData> = take(&mut dp.ebpf, maps::SIGNALS)?;
    let flows_ring: RingBuf<MapData> = take(&mut dp.ebpf, maps::FLOWS)?;
    let (signal_tx, signal_rx) = mpsc::channel(SIGNAL_QUEUE);
    let signal_queue = signal_tx.downgrade();
    let signal_counts = Arc::new(events::SignalCounts::default());
    let (flow_tx, _) = broadcast::channel(FLOW_CHANNEL);
    let (status_tx, status_rx) = watch::channel(DatapathStatus::default());
    let config = dp.config();

    let stop = shutdown.clone();
    let sink = events::signal_sink(signal_tx, signal_counts.clone());
    tokio::spawn(async move {
        if let Err(e) = events::drain(signals_ring, events::decode_signal, sink, stop).await {
            tracing::error!(error = %e, ring = "signals", "the datapath's ring buffer can no longer be read");
        }
    });
    let stop = shutdown.clone();
    let sink = events::flow_sink(flow_tx.clone());
    tokio::spawn(async move {
        if let Err(e) = events::drain(flows_ring, events::decode_flow, sink, stop).await {
            tracing::error!(error = %e, ring = "flows", "the datapath's ring buffer can no longer be read");
        }
    });
    let mut shutdown = shutdown;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(resync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tables_due = true;
        let mut retry = first_retry;
        let mut last_scan = tokio::time::Instant::now();
        loop {
            // A state published while this loop was busy elsewhere (a scan,
            // waiting out the scan gap) is taken here, tables included.
            if state.has_changed().unwrap_or(false) {
                tables_due = true;
            }
            let current = state.borrow_and_update().clone();
            if tables_due && current.synced {
                match off_the_runtime(|| dp.apply_tables(&current)) {
                    Ok(()) => tables_due = false,
                    Err(e) => warn!(error = %e, "could not update the datapath tables; will retry"),
                }
            }
            // Until the first complete sync the pinned tables of the last
            // agent stay as they are: an empty view would detach every pod.
            if current.synced {
                if let Err(e) = off_the_runtime(|| dp.apply_endpoints(&current)) {
                    warn!(error = %e, "could not update the datapath endpoints; will retry");
                }
                // The gap runs from the end of a scan: a scan made slow
                // (many ports, many processes) is not followed by another
                // at once.
                last_scan = tokio::time::Instant::now();
            }
            status_tx.send_replace(dp.status.clone());
            let pending = current.synced && !dp.status.unresolved.is_empty();
            let wait = match (pending, retry) {
                (true, Some(w)) => {
                    retry = Some((w * 2).min(resync));
                    Some(w)
                }
                _ => {
                    retry = first_retry;
                    None
                }
            };
            tokio::select! {
                r = state.changed() => {
                    if r.is_err() {
                        break;
                    }
                    tables_due = true;
                }
                c = next_change(&mut changes) => match c {
                    Ok(mut c) => {
                        let due = last_scan + min_scan_gap;
                        if tokio::time::Instant::now() < due {
                            // What arrives meanwhile is part of this change.
                            tokio::time::sleep_until(due).await;
                            if let Some(w) = changes.as_mut()
                                && let Err(e) = w.drain(&mut c)
                            {
                                debug!(error = %e, "rtnetlink: reading queued notifications");
                            }
                        }
                        debug!(changes = ?c, "the node's network changed; looking for endpoints");
                    }
                    Err(e) => {
                        warn!(
                            error = %e,
                            every = ?resync,
                            "rtnetlink notifications can no longer be read; endpoints are looked for on resync only"
                        );
                        changes = None;
                    }
                },
                _ = tick.tick() => {}
                _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
                _ = shutdown.changed() => break,
            }
        }
        // Programs stay attached and maps stay pinned: the kernel keeps
        // enforcing the last tables until the next agent takes over.
        info!("datapath handed over to the kernel (pinned)");
    });
    Ok(DatapathHandles {
        auth,
        config,
        signals: signal_rx,
        flows: flow_tx,
        status: status_rx,
        signal_queue,
        signal_counts,
    })
}

/// Writes `d` to a hash map: upserts in their order, then deletions.
fn write_hash<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<MapData, K, V>,
    d: MapDiff<K, V>,
    name: &'static str,
) -> Result<(), DatapathError> {
    for (k, v) in d.upserts {
        map.insert(k, v, 0).map_err(|e| DatapathError::map(name, e))?;
    }
    for k in d.deletes {
        let _ = map.remove(&k);
    }
    Ok(())
}

/// Runs `f`, which blocks on syscalls (map writes, netlink, reading
/// `/proc`), telling a multi-threaded runtime so, so that the worker's other
/// tasks (the Workload API, Sync) move to another thread meanwhile.
fn off_the_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

async fn next_change(w: &mut Option<netlink::NetlinkWatch>) -> std::io::Result<netlink::Changes> {
    match w {
        Some(w) => w.changes().await,
        None => std::future::pending().await,
    }
}

/// Removes everything a datapath pinned in `pin_dir`: links (which detaches
/// the programs) and maps. For uninstalling a node and for tests.
pub fn uninstall(pin_dir: &Path) -> std::io::Result<()> {
    if let Ok(dir) = std::fs::read_dir(pin_dir.join("links")) {
        for entry in dir.flatten() {
            std::fs::remove_file(entry.path())?;
        }
        std::fs::remove_dir(pin_dir.join("links"))?;
    }
    for name in maps::ALL {
        match std::fs::remove_file(pin_dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
