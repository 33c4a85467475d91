//! Mutual authentication (DESIGN.md section 5): the auth port, and the one
//! task that owns the auth map's life cycle.
//!
//! The manager pre-authenticates every pair a local workload will need
//! (`pairs::wanted`, from compiled policy and placement) before its first
//! packet, acts on datapath signals for the rest, re-authenticates ahead of
//! expiry and soon after an SVID rotation (spread with jitter, so a rotation
//! is not a storm), and flushes an entry as soon as what justified it (the
//! workload, identity, node, SVID or policy) goes away. It is the only writer
//! of the auth map; the auth port's server hands it what it verified.

pub mod handshake;
mod metrics;
pub mod pairs;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keyway_common::AuthKey;
use keyway_identity::{Svid, TrustBundle};

use rustls::sign::CertifiedKey;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use keyway_identity::jitter;

use crate::backoff::Backoff;
use crate::datapath::{AuthMap, MissingAuth, monotonic_ns};
use crate::state::NodeState;
use crate::svid_cache::SvidSet;
use handshake::{Accepted, Dial, Dialer, HandshakeError, LocalCerts, PeerDirectory};
pub use metrics::{AuthMetrics, HandshakeRole};

pub const DEFAULT_PORT: u16 = 4250;

#[derive(Debug, Clone)]
pub struct MutualAuthConfig {
    pub node_name: String,
    /// Handshakes in flight at once.
    pub max_in_flight: usize,
    /// After an SVID rotation, re-authentication of the affected pairs is
    /// spread uniformly over this long.
    pub rotation_spread: Duration,
    /// GC and refresh cadence (flushes on state changes are immediate).
    pub tick: Duration,
    /// Where handshakes are counted and timed.
    pub metrics: AuthMetrics,
    /// How peers are dialled ([`handshake::TlsDialer`]).
    pub dialer: Arc<dyn Dialer>,
}

impl MutualAuthConfig {
    pub fn new(node_name: impl Into<String>) -> MutualAuthConfig {
        MutualAuthConfig {
            node_name: node_name.into(),
            max_in_flight: 32,
            rotation_spread: Duration::from_secs(5),
            tick: Duration::from_millis(250),
            metrics: AuthMetrics::default(),
            dialer: Arc::new(handshake::TlsDialer),
        }
    }
}

/// How an entry came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// This agent dialled the peer's agent.
    Dialled,
    /// The peer's agent dialled this one.
    Answered,
    /// Both workloads run on this node: both SVIDs are here.
    Local,
    /// Found in the pinned map at start-up (an earlier agent's).
    Inherited,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Dialled => "dialled",
            Via::Answered => "answered",
            Via::Local => "local",
            Via::Inherited => "inherited",
        }
    }
}

/// One entry of the auth map as the agent knows it.
#[derive(Debug, Clone)]
pub struct AuthRecord {
    pub key: AuthKey,
    /// The earlier NotAfter of the two SVIDs.
    pub expiry: SystemTime,
    pub expiry_ns: u64,
    pub authenticated_at: SystemTime,
    pub via: Via,
    refresh_at: Instant,
    /// Serial of the local SVID the entry was made with.
    local_serial: Vec<u8>,
}

/// Counters, for tests, benchmarks and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthStats {
    pub handshakes_ok: u64,
    pub handshakes_failed: u64,
    pub local_auths: u64,
    pub answered: u64,
    pub flushed: u64,
    pub signals: u64,
    /// Handshakes dialled and not finished yet (a gauge, not a counter).
    pub in_flight: u64,
}

#[derive(Debug)]
pub struct MutualAuthHandles {
    /// Every entry the agent holds, by key.
    pub entries: watch::Receiver<Arc<Vec<AuthRecord>>>,
    pub stats: watch::Receiver<AuthStats>,
    /// The auth port's bound address.
    pub listen: SocketAddr,
}

/// Binds the auth port (so a taken port fails start-up, before attestation).
pub async fn bind(listen: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen).await
}

/// Binds the auth port on every address of both families: IPv4 peers
/// arrive as IPv4-mapped addresses (whatever `net.ipv6.bindv6only` says:
/// the socket says so itself). On a kernel without IPv6, IPv4 alone.
pub async fn bind_any(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    use std::os::fd::AsRawFd;
    let sock = match tokio::net::TcpSocket::new_v6() {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            return bind(SocketAddr::from(([0, 0, 0, 0], port))).await;
        }
        Err(e) => return Err(e),
    };
    let off: libc::c_int = 0;
    // SAFETY: setsockopt on a socket this function owns, with a pointer to
    // a c_int that outlives the call and its size.
    #[allow(unsafe_code, reason = "IPV6_V6ONLY has no safe setter in std or tokio")]
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&off as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    sock.set_reuseaddr(true)?;
    sock.bind(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)))?;
    sock.listen(1024)
}

/// Once the first sync has brought a trust bundle, runs the auth port's
/// server on `listener` and the manager.
pub fn start(
    cfg: MutualAuthConfig,
    listener: tokio::net::TcpListener,
    state: watch::Receiver<Arc<NodeState>>,
    svids: watch::Receiver<SvidSet>,
    auth: Arc<dyn AuthMap>,
    signals: Option<mpsc::Receiver<MissingAuth>>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<MutualAuthHandles> {
    let listen = listener.local_addr()?;
    let (entries_tx, entries_rx) = watch::channel(Arc::new(Vec::new()));
    let (stats_tx, stats_rx) = watch::channel(AuthStats::default());
    cfg.metrics.watch_entries(entries_rx.clone());
    tokio::spawn(async move {
        let mut first = state.clone();
        let mut stop = shutdown.clone();
        let bundle = tokio::select! {
            r = first.wait_for(|s| s.bundle.is_some()) => match r {
                Ok(s) => s.bundle.clone().expect("waited for it"),
                Err(_) => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let (accepted_tx, accepted_rx) = mpsc::channel(1024);
        let metrics = cfg.metrics.clone();
        let manager = Manager::new(cfg, auth, bundle, entries_tx, stats_tx);
        tokio::spawn(handshake::serve_with_metrics(
            listener,
            manager.bundle_rx.clone(),
            manager.certs.clone(),
            manager.dir_tx.subscribe(),
            accepted_tx,
            metrics,
            shutdown.clone(),
        ));
        manager.run(state, svids, signals, accepted_rx, shutdown).await;
    });
    Ok(MutualAuthHandles {
        entries: entries_rx,
        stats: stats_rx,
        listen,
    })
}

struct Manager {
    cfg: MutualAuthConfig,
    auth: Arc<dyn AuthMap>,
    bundle_tx: watch::Sender<Arc<TrustBundle>>,
    bundle_rx: watch::Receiver<Arc<TrustBundle>>,
    certs: Arc<LocalCerts>,
    /// Signing keys per (identity, serial), so a table rebuild does not
    /// re-parse every key.
    cert_cache: HashMap<(u32, Vec<u8>), Arc<CertifiedKey>>,
    dir_tx: watch::Sender<Arc<PeerDirectory>>,
    records: HashMap<AuthKey, AuthRecord>,
    on_demand: HashSet<AuthKey>,
    in_flight: HashSet<AuthKey>,
    backoff: HashMap<AuthKey, (Backoff, Instant)>,
    entries_tx: watch::Sender<Arc<Vec<AuthRecord>>>,
    stats_tx: watch::Sender<AuthStats>,
    stats: AuthStats,
    /// The last failure logged per key, so a failing pair is reported once
    /// per distinct reason, not on every retry.
    last_errors: HashMap<AuthKey, String>,
    /// The pair rules' view of the current state.
    view: pairs::View,
}

type Outcome = (AuthKey, Result<SystemTime, HandshakeError>);

/// Jittered refresh point: between 50% and 70% of the remaining validity.
fn refresh_at(now: Instant, expiry: SystemTime) -> Instant {
    let left = expiry.duration_since(SystemTime::now()).unwrap_or_default();
    now + jitter::between(left, 0.5, 0.7)
}

impl Manager {
    fn new(
        cfg: MutualAuthConfig,
        auth: Arc<dyn AuthMap>,
        bundle: Arc<TrustBundle>,
        entries_tx: watch::Sender<Arc<Vec<AuthRecord>>>,
        stats_tx: watch::Sender<AuthStats>,
    ) -> Self {
        let (bundle_tx, bundle_rx) = watch::channel(bundle);
        let (dir_tx, _) = watch::channel(Arc::new(PeerDirectory {
            spiffe_ids: HashMap::new(),
            nodes: HashMap::new(),
        }));
        Manager {
            cfg,
            auth,
            bundle_tx,
            bundle_rx,
            certs: Arc::new(LocalCerts::default()),
            cert_cache: HashMap::new(),
            dir_tx,
            records: HashMap::new(),
            on_demand: HashSet::new(),
            in_flight: HashSet::new(),
            backoff: HashMap::new(),
            entries_tx,
            stats_tx,
            stats: AuthStats::default(),
            last_errors: HashMap::new(),
            view: pairs::View::default(),
        }
    }

    async fn run(
        mut self,
        mut state: watch::Receiver<Arc<NodeState>>,
        mut svids: watch::Receiver<SvidSet>,
        mut signals: Option<mpsc::Receiver<MissingAuth>>,
        mut accepted: mpsc::Receiver<Accepted>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        self.inherit();
        let mut tasks: JoinSet<Outcome> = JoinSet::new();
        let mut tick = tokio::time::interval(self.cfg.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cur_state = state.borrow_and_update().clone();
        let mut cur_svids = svids.borrow_and_update().clone();
        self.refresh_tables(&cur_state, &cur_svids);
        loop {
            self.reconcile(&cur_state, &cur_svids, &mut tasks);
            self.publish();
            tokio::select! {
                r = state.changed() => {
                    if r.is_err() { break; }
                    cur_state = state.borrow_and_update().clone();
                    self.refresh_tables(&cur_state, &cur_svids);
                }
                r = svids.changed() => {
                    if r.is_err() { break; }
                    cur_svids = svids.borrow_and_update().clone();
                    self.refresh_tables(&cur_state, &cur_svids);
                    self.after_rotation(&cur_state, &cur_svids);
                }
                Some(sig) = async { match signals.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                    self.stats.signals += 1;
                    if self.view.unjustified(&cur_state, &sig.key).is_none() {
                        self.on_demand.insert(sig.key);
                    } else {
                        debug!(local = sig.key.local_id, remote = sig.key.remote_id, "signal for a pair no policy of ours justifies");
                    }
                }
                Some(acc) = accepted.recv() => self.on_answered(&cur_state, acc),
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Ok((key, result)) = done {
                        self.on_dialled(&cur_state, &cur_svids, key, result);
                    }
                }
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
        }
        // Entries stay in the map: the kernel keeps honouring them until
        // they expire or the next agent flushes what is no longer justified.
        tasks.abort_all();
    }

    /// Entries an earlier agent wrote: kept (traffic keeps flowing) and
    /// re-authenticated soon, spread out.
    fn inherit(&mut self) {
        let entries = match self.auth.entries() {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "cannot read the auth map left by an earlier agent");
                return;
            }
        };
        let now_ns = monotonic_ns();
        let now = Instant::now();
        for (key, expiry_ns) in entries {
            let expiry = SystemTime::now() + Duration::from_nanos(expiry_ns.saturating_sub(now_ns));
            self.records.insert(
                key,
                AuthRecord {
                    key,
                    expiry,
                    expiry_ns,
                    authenticated_at: SystemTime::now(),
                    via: Via::Inherited,
                    refresh_at: now + jitter::between(self.cfg.rotation_spread, 0.0, 1.0),
                    local_serial: Vec::new(),
                },
            );
        }
        if !self.records.is_empty() {
            info!(
                entries = self.records.len(),
                "took over the auth map; re-authenticating its pairs"
            );
        }
    }

    /// Rebuilds what the server side consults: the bundle, this node's
    /// presentable SVIDs by identity, and the peer directory.
    fn refresh_tables(&mut self, state: &NodeState, svids: &SvidSet) {
        self.view = pairs::View::new(state, &self.cfg.node_name);
        if let Some(b) = &state.bundle
            && !Arc::ptr_eq(b, &self.bundle_rx.borrow())
        {
            self.bundle_tx.send_replace(b.clone());
        }
        let mut table = HashMap::new();
        let mut keep = HashSet::new();
        for id in self.view.local().clone() {
            let Some(svid) = self.svid_for(state, svids, id) else {
                continue;
            };
            let k = (id, svid.serial().to_vec());
            let ck = match self.cert_cache.get(&k) {
                Some(ck) => ck.clone(),
                None => match svid.certified_key() {
                    Ok(ck) => {
                        self.cert_cache.insert(k.clone(), ck.clone());
                        ck
                    }
                    Err(e) => {
                        warn!(identity = id, error = %e, "unusable SVID for the auth port");
                        continue;
                    }
                },
            };
            keep.insert(k);
            table.insert(id, ck);
        }
        self.cert_cache.retain(|k, _| keep.contains(k));
        self.certs.replace(table);
        let dir = PeerDirectory {
            spiffe_ids: state
                .identities
                .iter()
                .map(|(id, i)| (*id, i.spiffe_id.clone()))
                .collect(),
            nodes: state
                .nodes
                .values()
                .filter_map(|n| {
                    let id = u16::try_from(n.node_id).ok()?;
                    let ips = n
                        .addresses
                        .iter()
                        .filter_map(|a| a.parse::<SocketAddr>().ok().map(|s| s.ip()))
                        .collect();
                    Some((n.name.clone(), (id, ips)))
                })
                .collect(),
        };
        self.dir_tx.send_replace(Arc::new(dir));
    }

    fn svid_for<'a>(&self, state: &NodeState, svids: &'a SvidSet, id: u32) -> Option<&'a Svid> {
        svids.get(&state.identities.get(&id)?.spiffe_id)
    }

    /// After SVIDs rotate, pairs made with an old local SVID are
    /// re-authenticated within `rotation_spread`, each at a random point.
    fn after_rotation(&mut self, state: &NodeState, svids: &SvidSet) {
        let now = Instant::now();
        let spread = self.cfg.rotation_spread;
        let serials: HashMap<u32, Vec<u8>> = self
            .records
            .keys()
            .filter_map(|k| {
                Some((
                    k.local_id,
                    self.svid_for(state, svids, k.local_id)?.serial().to_vec(),
                ))
            })
            .collect();
        for r in self.records.values_mut() {
            if serials.get(&r.key.local_id).is_some_and(|s| *s != r.local_serial) {
                let at = now + jitter::between(spread, 0.0, 1.0);
                r.refresh_at = r.refresh_at.min(at);
            }
        }
    }

    /// One pass: collect what lost its justification, then dispatch what is
    /// due.
    fn reconcile(&mut self, state: &NodeState, svids: &SvidSet, tasks: &mut JoinSet<Outcome>) {
        self.collect(state);
        let due = self.due(state);
        self.dispatch(state, svids, due, tasks);
    }

    /// GC: flushes the entries that expired or lost their justification
    /// (the workload, identity, node, SVID or policy went away), and forgets
    /// on-demand requests and backoffs for pairs no longer justified.
    fn collect(&mut self, state: &NodeState) {
        let now_ns = monotonic_ns();
        let doomed: Vec<(AuthKey, &'static str)> = self
            .records
            .values()
            .filter_map(|r| {
                if r.expiry_ns <= now_ns {
                    return Some((r.key, "expired"));
                }
                self.view.unjustified(state, &r.key).map(|why| (r.key, why))
            })
            .collect();
        for (key, why) in doomed {
            match self.auth.remove(&key) {
                Ok(_) => {
                    info!(
                        local = key.local_id,
                        remote = key.remote_id,
                        remote_node = key.remote_node_id,
                        reason = why,
                        "auth entry flushed"
                    );
                    self.records.remove(&key);
                    self.stats.flushed += 1;
                }
                Err(e) => warn!(error = %e, "could not flush an auth entry"),
            }
        }
        self.on_demand
            .retain(|k| self.view.unjustified(state, k).is_none() && !self.records.contains_key(k));
        self.backoff
            .retain(|k, _| self.view.unjustified(state, k).is_none());
    }

    /// Refresh: the pairs to authenticate now, the wanted ones and those a
    /// signal asked for, minus those in flight, still fresh (before their
    /// jittered refresh point) or backing off after a failure.
    fn due(&self, state: &NodeState) -> Vec<AuthKey> {
        let now = Instant::now();
        let mut targets: Vec<AuthKey> = self.view.wanted(state).into_iter().collect();
        targets.extend(self.on_demand.iter().copied());
        // A pair can be both wanted and signalled for: once.
        let mut seen = HashSet::new();
        targets.retain(|key| {
            seen.insert(*key)
                && !self.in_flight.contains(key)
                && self.records.get(key).is_none_or(|r| r.refresh_at <= now)
                && self.backoff.get(key).is_none_or(|(_, at)| *at <= now)
        });
        targets
    }

    /// Dispatch: authenticates `due` pairs, at most `max_in_flight`
    /// handshakes at once. A pair whose two workloads both run here needs no
    /// handshake (both SVIDs are in hand); the rest are dialled, each bounded
    /// by the handshake timeout, so a peer that never answers costs a slot
    /// for that long and then backs off like any failure.
    fn dispatch(
        &mut self,
        state: &NodeState,
        svids: &SvidSet,
        due: Vec<AuthKey>,
        tasks: &mut JoinSet<Outcome>,
    ) {
        let node = self.cfg.node_name.clone();
        let my_node = self.view.local_node_id();
        for key in due {
            if self.in_flight.len() >= self.cfg.max_in_flight {
                break;
            }
            let Some(local_svid) = self.svid_for(state, svids, key.local_id).cloned() else {
                continue;
            };
            if Some(key.remote_node_id) == my_node {
                let Some(remote_svid) = self.svid_for(state, svids, key.remote_id).cloned() else {
                    continue;
                };
                let expiry = local_svid.not_after().min(remote_svid.not_after());
                self.stats.local_auths += 1;
                self.record(key, expiry, Via::Local, local_svid.serial().to_vec());
                continue;
            }
            let Some(addr) = state
                .nodes
                .values()
                .find(|n| n.node_id == u32::from(key.remote_node_id))
                .and_then(|n| n.addresses.iter().find_map(|a| a.parse::<SocketAddr>().ok()))
            else {
                debug!(node = key.remote_node_id, "no auth address for the node yet");
                continue;
            };
            let Some(remote_spiffe_id) = state.identities.get(&key.remote_id).map(|i| i.spiffe_id.clone())
            else {
                continue;
            };
            let Some(ck) = self.certs.get(key.local_id) else {
                continue;
            };
            self.in_flight.insert(key);
            let dial = Dial {
                addr,
                bundle: self.bundle_rx.clone(),
                key: ck,
                local_id: key.local_id,
                remote_id: key.remote_id,
                remote_spiffe_id,
                node: node.clone(),
            };
            let dialer = self.cfg.dialer.clone();
            let metrics = self.cfg.metrics.clone();
            tasks.spawn(async move {
                let started = std::time::Instant::now();
                let r = tokio::time::timeout(handshake::TIMEOUT, dialer.dial(dial))
                    .await
                    .unwrap_or(Err(HandshakeError::Timeout(handshake::TIMEOUT)));
                metrics.handshake(
                    HandshakeRole::Dial,
                    r.as_ref().map(|_| ()).map_err(|e| e.kind()),
                    started,
                );
                (key, r)
            });
        }
    }

    fn on_dialled(
        &mut self,
        state: &NodeState,
        svids: &SvidSet,
        key: AuthKey,
        result: Result<SystemTime, HandshakeError>,
    ) {
        self.in_flight.remove(&key);
        match result {
            Ok(expiry) => {
                self.stats.handshakes_ok += 1;
                self.last_errors.remove(&key);
                if let Some((b, _)) = self.backoff.get_mut(&key) {
                    b.reset();
                }
                self.backoff.remove(&key);
                if let Some(why) = self.view.unjustified(state, &key) {
                    debug!(
                        reason = why,
                        "handshake finished for a pair that is no longer wanted"
                    );
                    return;
                }
                let serial = self
                    .svid_for(state, svids, key.local_id)
                    .map(|s| s.serial().to_vec())
                    .unwrap_or_default();
                self.record(key, expiry, Via::Dialled, serial);
                self.on_demand.remove(&key);
            }
            Err(e) => {
                self.stats.handshakes_failed += 1;
                let msg = e.to_string();
                if self.last_errors.get(&key) != Some(&msg) {
                    warn!(
                        local = key.local_id,
                        remote = key.remote_id,
                        remote_node = key.remote_node_id,
                        error = %msg,
                        "mutual-auth handshake failed; retrying with backoff"
                    );
                    self.last_errors.insert(key, msg);
                }
                let entry = self.backoff.entry(key).or_insert_with(|| {
                    (
                        // Short first: the usual failure is a peer agent that
                        // gets the SVID a moment later (a new workload).
                        Backoff::new(Duration::from_millis(25), Duration::from_secs(30)),
                        Instant::now(),
                    )
                });
                entry.1 = Instant::now() + entry.0.next_delay();
            }
        }
    }

    fn on_answered(&mut self, state: &NodeState, acc: Accepted) {
        self.stats.answered += 1;
        if self.view.unjustified(state, &acc.key).is_some() {
            // Our policy does not check this direction: nothing to record.
            return;
        }
        // Keep our own refresh schedule if we hold a fresher entry.
        if self.records.get(&acc.key).is_some_and(|r| r.expiry >= acc.expiry) {
            return;
        }
        self.record(acc.key, acc.expiry, Via::Answered, Vec::new());
    }

    fn record(&mut self, key: AuthKey, expiry: SystemTime, via: Via, local_serial: Vec<u8>) {
        let expiry_ns = handshake::to_monotonic_ns(expiry);
        if expiry_ns <= monotonic_ns() {
            return;
        }
        if let Err(e) = self.auth.upsert(key, expiry_ns) {
            warn!(error = %e, "could not write an auth entry");
            return;
        }
        debug!(
            local = key.local_id,
            remote = key.remote_id,
            remote_node = key.remote_node_id,
            via = via.as_str(),
            "pair authenticated"
        );
        let now = Instant::now();
        self.records.insert(
            key,
            AuthRecord {
                key,
                expiry,
                expiry_ns,
                authenticated_at: SystemTime::now(),
                via,
                refresh_at: refresh_at(now, expiry),
                local_serial,
            },
        );
    }

    /// Stats first: whoever wakes on a changed entry list sees the counters
    /// that go with it.
    fn publish(&mut self) {
        self.stats.in_flight = self.in_flight.len() as u64;
        self.stats_tx.send_if_modified(|s| {
            let changed = *s != self.stats;
            if changed {
                *s = self.stats.clone();
            }
            changed
        });
        let mut v: Vec<AuthRecord> = self.records.values().cloned().collect();
        v.sort_by_key(|r| (r.key.local_id, r.key.remote_id, r.key.remote_node_id));
        self.entries_tx.send_if_modified(|cur| {
            let same = cur.len() == v.len()
                && cur
                    .iter()
                    .zip(&v)
                    .all(|(a, b)| a.key == b.key && a.expiry_ns == b.expiry_ns);
            if !same {
                *cur = Arc::new(v);
            }
            !same
        });
    }
}

/// Entries as `auth list` shows them, sorted.
pub fn sorted(records: &[AuthRecord]) -> BTreeMap<(u32, u32, u16), &AuthRecord> {
    records
        .iter()
        .map(|r| ((r.key.local_id, r.key.remote_id, r.key.remote_node_id), r))
        .collect()
}
