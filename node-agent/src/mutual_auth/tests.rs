//! The manager on its own: paused tokio time, the in-memory auth map, and a
//! dialer that answers (or never answers) in memory. What the real
//! handshake does is tested in `handshake` and over real sockets in
//! tests/tests/mutual_auth.rs.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use proto::keyway as pb;

use super::*;
use crate::datapath::MemoryAuthMap;

const ME: &str = "node-a";
const TD: &str = "td";
/// The local workload's identity; its peers are 301, 302, ... on node-b.
const LOCAL: u32 = 300;
const NODE_B: u16 = 2;

fn spiffe_id(id: u32) -> String {
    format!("spiffe://{TD}/ns/default/sa/sa-{id}")
}

/// A CA, and SVIDs it signs.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    der: Vec<u8>,
}

impl Ca {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let der = p.self_signed(&key).unwrap().der().to_vec();
        Self {
            issuer: rcgen::Issuer::new(p, key),
            der,
        }
    }

    fn svid(&self, id: &str, ttl: Duration) -> Svid {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::seconds(10);
        p.not_after = now + time::Duration::seconds(ttl.as_secs() as i64);
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Svid::new(vec![cert.der().to_vec(), self.der.clone()], key.serialize_der()).unwrap()
    }

    fn bundle(&self) -> Arc<TrustBundle> {
        let td = keyway_identity::spiffe_id::parse_trust_domain(TD).unwrap();
        Arc::new(TrustBundle::new(td, 1, vec![self.der.clone()], Vec::new()).unwrap())
    }
}

/// This node runs identity 300; `peers` identities (301, ...) run on
/// node-b, and policy says 300 needs mutual auth to reach each of them.
fn state(peers: u32) -> NodeState {
    let mut s = NodeState::default();
    for (name, id, addr) in [(ME, 1, "127.0.0.1:4250"), ("node-b", 2, "127.0.0.2:4250")] {
        s.nodes.insert(
            name.into(),
            pb::Node {
                name: name.into(),
                node_id: id,
                addresses: vec![addr.into()],
            },
        );
    }
    s.workloads.insert(
        ("default".into(), "local".into()),
        pb::Workload {
            name: "local".into(),
            namespace: "default".into(),
            node: ME.into(),
            identity: LOCAL,
            ips: vec!["10.0.1.1".into()],
            ..Default::default()
        },
    );
    let mut ipcache = vec![("10.0.1.1".to_string(), LOCAL, 1)];
    for n in 1..=peers {
        ipcache.push((format!("10.0.2.{n}"), LOCAL + n, u32::from(NODE_B)));
        let (k, e) = crate::state::port_entry((LOCAL, LOCAL + n, 8080, 6, 1), true, "default/p egress[0]");
        s.policy.insert(k, e);
    }
    for (ip, id, node) in ipcache {
        s.ipcache.insert(
            format!("{ip}/32"),
            pb::IpcacheEntry {
                cidr: format!("{ip}/32"),
                identity: id,
                node_id: node,
                ..Default::default()
            },
        );
        s.identities.insert(
            id,
            pb::Identity {
                id,
                spiffe_id: spiffe_id(id),
                ..Default::default()
            },
        );
    }
    s
}

fn pair(peer: u32) -> AuthKey {
    pairs::key(LOCAL, peer, NODE_B)
}

/// Answers every dial after `delay` with an entry valid for `valid`, or
/// never (`valid` None); counts dials per pair and the most in flight at once.
#[derive(Debug, Default)]
struct FakeDialer {
    valid: Option<Duration>,
    delay: Duration,
    dials: Mutex<Vec<AuthKey>>,
    open: AtomicUsize,
    most_open: AtomicUsize,
    open_per_pair: Mutex<HashMap<AuthKey, usize>>,
    most_open_per_pair: AtomicUsize,
}

impl FakeDialer {
    /// Answers every dial with an entry valid for `valid`.
    fn answering(valid: Duration) -> Self {
        Self {
            valid: Some(valid),
            ..Default::default()
        }
    }

    fn dials_of(&self, key: AuthKey) -> usize {
        self.dials.lock().unwrap().iter().filter(|k| **k == key).count()
    }
}

/// Counts a dial as open until dropped (answered, or abandoned at timeout).
struct Open(Arc<FakeDialer>, AuthKey);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        *self.0.open_per_pair.lock().unwrap().entry(self.1).or_default() -= 1;
    }
}

#[derive(Debug)]
struct Shared(Arc<FakeDialer>);

impl Dialer for Shared {
    fn dial(&self, d: Dial) -> handshake::DialFuture {
        let f = self.0.clone();
        let key = pairs::key(d.local_id, d.remote_id, NODE_B);
        assert_eq!(
            d.remote_spiffe_id,
            spiffe_id(d.remote_id),
            "dials the peer's own ID"
        );
        f.dials.lock().unwrap().push(key);
        let open = f.open.fetch_add(1, Ordering::SeqCst) + 1;
        f.most_open.fetch_max(open, Ordering::SeqCst);
        let per_pair = {
            let mut m = f.open_per_pair.lock().unwrap();
            let n = m.entry(key).or_default();
            *n += 1;
            *n
        };
        f.most_open_per_pair.fetch_max(per_pair, Ordering::SeqCst);
        let guard = Open(f.clone(), key);
        Box::pin(async move {
            let _guard = guard;
            tokio::time::sleep(f.delay).await;
            match f.valid {
                Some(valid) => Ok(SystemTime::now() + valid),
                None => std::future::pending().await,
            }
        })
    }
}

struct Harness {
    state: watch::Sender<Arc<NodeState>>,
    signals: mpsc::Sender<MissingAuth>,
    entries: watch::Receiver<Arc<Vec<AuthRecord>>>,
    stats: watch::Receiver<AuthStats>,
    auth: Arc<MemoryAuthMap>,
    dialer: Arc<FakeDialer>,
    _accepted: mpsc::Sender<Accepted>,
    svids: watch::Sender<SvidSet>,
    _shutdown: watch::Sender<bool>,
}

fn start(state: NodeState, dialer: FakeDialer, max_in_flight: usize) -> Harness {
    start_with(&Ca::new(), state, dialer, max_in_flight)
}

fn start_with(ca: &Ca, state: NodeState, dialer: FakeDialer, max_in_flight: usize) -> Harness {
    let svids: SvidSet = Arc::new(BTreeMap::from([(
        spiffe_id(LOCAL),
        ca.svid(&spiffe_id(LOCAL), Duration::from_secs(3600)),
    )]));
    let dialer = Arc::new(dialer);
    let mut cfg = MutualAuthConfig::new(ME);
    cfg.max_in_flight = max_in_flight;
    cfg.dialer = Arc::new(Shared(dialer.clone()));
    let auth = Arc::new(MemoryAuthMap::default());
    let (entries_tx, entries) = watch::channel(Arc::new(Vec::new()));
    let (stats_tx, stats) = watch::channel(AuthStats::default());
    let manager = Manager::new(cfg, auth.clone(), ca.bundle(), entries_tx, stats_tx);
    let (state_tx, state_rx) = watch::channel(Arc::new(state));
    let (svids_tx, svids_rx) = watch::channel(svids);
    let (signals_tx, signals_rx) = mpsc::channel(4096);
    let (accepted_tx, accepted_rx) = mpsc::channel(16);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(manager.run(state_rx, svids_rx, Some(signals_rx), accepted_rx, shutdown_rx));
    Harness {
        state: state_tx,
        signals: signals_tx,
        entries,
        stats,
        auth,
        dialer,
        _accepted: accepted_tx,
        svids: svids_tx,
        _shutdown: shutdown_tx,
    }
}

impl Harness {
    async fn entries_until(&mut self, what: &str, f: impl Fn(&[AuthRecord]) -> bool) {
        // Paused time: the manager's own ticks advance the clock; an hour of
        // it is a bound, not a wait.
        let mut entries = self.entries.clone();
        tokio::time::timeout(Duration::from_secs(3600), entries.wait_for(|e| f(e)))
            .await
            .unwrap_or_else(|_| panic!("{what}: entries now {:?}", self.entries.borrow()))
            .expect("manager running");
    }
}

#[tokio::test(start_paused = true)]
async fn a_signal_storm_dials_each_pair_once_at_a_time_within_the_in_flight_cap() {
    // Eight wanted pairs, two handshakes at a time, each taking 1 s; a
    // thousand signals for one of them on top.
    let mut h = start(
        state(8),
        FakeDialer {
            valid: Some(Duration::from_secs(600)),
            delay: Duration::from_secs(1),
            ..Default::default()
        },
        2,
    );
    for _ in 0..1000 {
        h.signals
            .send(MissingAuth {
                key: pair(301),
                at_ns: 0,
            })
            .await
            .unwrap();
    }
    h.entries_until("all eight pairs", |e| e.len() == 8).await;
    h.stats.wait_for(|s| s.signals == 1000).await.unwrap();
    assert!(
        h.dialer.most_open.load(Ordering::SeqCst) <= 2,
        "never more than the cap in flight"
    );
    assert_eq!(
        h.dialer.most_open_per_pair.load(Ordering::SeqCst),
        1,
        "one handshake per pair at a time"
    );
    for peer in 301..=308 {
        assert_eq!(
            h.dialer.dials_of(pair(peer)),
            1,
            "pair {peer} dialled once, storm or not"
        );
        assert!(h.auth.get(&pair(peer)).unwrap().is_some());
    }
}

#[tokio::test(start_paused = true)]
async fn an_entry_is_refreshed_before_it_expires() {
    let mut h = start(state(1), FakeDialer::answering(Duration::from_secs(100)), 32);
    h.entries_until("the first entry", |e| e.len() == 1).await;
    let first = h.entries.borrow()[0].authenticated_at;
    assert_eq!(h.dialer.dials_of(pair(301)), 1);
    // Refreshed between 50% and 70% of the remaining validity: not at 49 s,
    // by 71 s, long before the entry would expire at 100 s.
    tokio::time::sleep(Duration::from_secs(49)).await;
    assert_eq!(
        h.dialer.dials_of(pair(301)),
        1,
        "not refreshed before half its validity"
    );
    tokio::time::sleep(Duration::from_secs(22)).await;
    assert_eq!(
        h.dialer.dials_of(pair(301)),
        2,
        "refreshed by 70% of its validity"
    );
    h.entries_until("the refreshed entry", |e| {
        e.len() == 1 && e[0].authenticated_at >= first
    })
    .await;
    assert!(
        h.auth.get(&pair(301)).unwrap().is_some(),
        "the entry never left the map"
    );
}

#[tokio::test(start_paused = true)]
async fn an_entry_is_flushed_when_its_peer_is_revoked() {
    let mut h = start(state(2), FakeDialer::answering(Duration::from_secs(600)), 32);
    h.entries_until("both entries", |e| e.len() == 2).await;
    // The peer identity 302 is revoked: gone from the node's view.
    let mut revoked = state(2);
    revoked.identities.remove(&302);
    revoked.ipcache.retain(|_, e| e.identity != 302);
    h.state.send_replace(Arc::new(revoked));
    h.entries_until("302's entry flushed", |e| e.len() == 1 && e[0].key == pair(301))
        .await;
    assert!(h.auth.get(&pair(302)).unwrap().is_none(), "flushed from the map");
    assert!(h.auth.get(&pair(301)).unwrap().is_some(), "the other pair kept");
    assert_eq!(h.stats.borrow().flushed, 1);
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_never_answers_is_given_up_on_and_retried_with_backoff() {
    let h = start(
        state(1),
        FakeDialer {
            valid: None,
            ..Default::default()
        },
        1,
    );
    // Each dial is abandoned at the handshake timeout, counted as failed,
    // and retried after a growing backoff: never hammered, never stuck.
    let mut stats = h.stats.clone();
    tokio::time::timeout(
        Duration::from_secs(3600),
        stats.wait_for(|s| s.handshakes_failed >= 3),
    )
    .await
    .expect("three dials given up on")
    .unwrap();
    let dials = h.dialer.dials_of(pair(301));
    assert!((3..=4).contains(&dials), "{dials} dials for three failures");
    assert!(h.dialer.most_open.load(Ordering::SeqCst) <= 1);
    assert_eq!(
        h.dialer.open.load(Ordering::SeqCst),
        dials - 3,
        "abandoned dials were dropped"
    );
    assert!(h.auth.entries().unwrap().is_empty(), "nothing authenticated");
    let started = tokio::time::Instant::now();
    tokio::time::timeout(
        Duration::from_secs(3600),
        stats.wait_for(|s| s.handshakes_failed >= 10),
    )
    .await
    .expect("still retrying")
    .unwrap();
    // Seven more failures take at least seven timeouts.
    assert!(
        started.elapsed() >= handshake::TIMEOUT * 6,
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_local_pair_both_wanted_and_signalled_is_authenticated_once() {
    // Peer 301 runs on this node too: the pair needs no handshake, only
    // both SVIDs, and 301's arrives after a signal asked for the pair.
    let mut s = state(1);
    s.ipcache.get_mut("10.0.2.1/32").unwrap().node_id = 1;
    let ca = Ca::new();
    let mut h = start_with(&ca, s, FakeDialer::default(), 32);
    h.signals
        .send(MissingAuth {
            key: pairs::key(LOCAL, 301, 1),
            at_ns: 0,
        })
        .await
        .unwrap();
    h.stats.wait_for(|s| s.signals == 1).await.unwrap();
    let mut both = (*h.svids.borrow().clone()).clone();
    both.insert(
        spiffe_id(301),
        ca.svid(&spiffe_id(301), Duration::from_secs(3600)),
    );
    h.svids.send_replace(Arc::new(both));
    h.entries_until("the local entry", |e| e.len() == 1).await;
    assert_eq!(h.stats.borrow().local_auths, 1, "authenticated once");
    assert_eq!(h.entries.borrow()[0].via, Via::Local);
    assert!(
        h.dialer.dials.lock().unwrap().is_empty(),
        "no handshake for a local pair"
    );
}
