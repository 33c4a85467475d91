//! Connection limits: how many, from whom, and for how long.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyway_identity::lock::Recover;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::telemetry::{LogLimiter, Registry};

/// What one listener allows. Every field has a default fit for a listener
/// that untrusted local or network peers can reach; the binaries tighten or
/// widen them per listener (see ARCHITECTURE.md, "Listeners").
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections held at once; one more is accepted and closed at once.
    pub max_connections: usize,
    /// Connections held at once from one peer ([`PeerKey`]).
    pub max_per_peer: usize,
    /// From accept to the first complete request headers (a TLS handshake,
    /// where there is one, counts against it too).
    pub request_header_timeout: Duration,
    /// How long a request body may take to arrive once its headers have.
    /// Every Keyway RPC sends one message, so this is short.
    pub request_body_timeout: Duration,
    /// A connection with no request in flight for this long is closed
    /// (HTTP/2 GOAWAY; clients reconnect on their next call).
    pub idle_timeout: Duration,
    /// HTTP/2 streams one connection may have open.
    pub max_concurrent_streams: u32,
    /// HTTP/2 header block size (bytes, decoded).
    pub max_header_list_size: u32,
    /// HTTP/2 PINGs to notice dead peers under long-lived streams.
    pub keepalive_interval: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_per_peer: 64,
            request_header_timeout: Duration::from_secs(10),
            request_body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_concurrent_streams: 256,
            max_header_list_size: 16 << 10,
            keepalive_interval: Some(Duration::from_secs(30)),
        }
    }
}

/// Who a connection is from, for the per-peer cap.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerKey {
    /// An IPv4 address, or the /64 of an IPv6 one (one host usually holds a
    /// whole /64, so per-address caps would not bind).
    Ip(IpAddr),
    /// A local caller on a unix socket: its uid.
    Uid(u32),
    /// A local caller recognised as a Kubernetes pod (its UID).
    Pod(String),
    /// A local socket only root can reach (admin sockets): one peer.
    Local,
}

impl PeerKey {
    pub fn ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => PeerKey::Ip(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => PeerKey::Ip(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    PeerKey::Ip(IpAddr::V6(std::net::Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerKey::Ip(IpAddr::V6(v6)) => write!(f, "{v6}/64"),
            PeerKey::Ip(ip) => write!(f, "{ip}"),
            PeerKey::Uid(uid) => write!(f, "uid {uid}"),
            PeerKey::Pod(pod) => write!(f, "pod {pod}"),
            PeerKey::Local => f.write_str("local"),
        }
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refused {
    /// The listener holds `max_connections`.
    ConnectionLimit,
    /// This peer holds `max_per_peer`.
    PeerLimit,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::ConnectionLimit => "connection-limit",
            Refused::PeerLimit => "peer-limit",
        }
    }
}

crate::label_values_by_as_str!(Refused);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusedLabels {
    listener: &'static str,
    reason: Refused,
}

/// Why the server closed a connection (or never had one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Closed {
    /// Accepting failed (most often: out of file descriptors).
    AcceptError,
    /// No complete request headers within the header timeout.
    HeaderTimeout,
    /// The TLS handshake did not finish within the header timeout.
    HandshakeTimeout,
    /// No request in flight for the idle timeout.
    Idle,
}

impl Closed {
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::AcceptError => "accept-error",
            Closed::HeaderTimeout => "header-timeout",
            Closed::HandshakeTimeout => "handshake-timeout",
            Closed::Idle => "idle",
        }
    }
}

crate::label_values_by_as_str!(Closed);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClosedLabels {
    listener: &'static str,
    reason: Closed,
}

/// Listener metrics, registered once per process and shared by its gates.
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    connections: Family<ListenerLabels, Gauge>,
    refused: Family<RefusedLabels, Counter>,
    closed: Family<ClosedLabels, Counter>,
}

impl ListenerMetrics {
    pub fn register(registry: &Registry) -> Self {
        Self {
            connections: registry.register(
                "keyway_listener_connections",
                "Connections a listener holds now.",
                Family::default(),
            ),
            refused: registry.register(
                "keyway_listener_refused",
                "Connections closed at accept: connection-limit, peer-limit.",
                Family::default(),
            ),
            closed: registry.register(
                "keyway_listener_closed",
                "Connections the server closed: header-timeout (no request in time), handshake-timeout, idle, \
                 accept-error (accepting failed).",
                Family::default(),
            ),
        }
    }

    /// Metrics that go nowhere (tests, tools).
    pub fn unregistered() -> Self {
        Self::register(&Registry::new())
    }
}

/// One listener's admission control: the caps, the counts, the metrics.
#[derive(Debug)]
pub struct Gate {
    name: &'static str,
    limits: Limits,
    state: Mutex<Counts>,
    metrics: ListenerMetrics,
    /// This listener's series of `metrics.connections`.
    connections: Gauge,
    log: LogLimiter,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_peer: HashMap<PeerKey, usize>,
}

impl Gate {
    pub fn new(name: &'static str, limits: Limits, metrics: ListenerMetrics) -> Arc<Self> {
        let connections = metrics
            .connections
            .get_or_create_owned(&ListenerLabels { listener: name });
        connections.set(0);
        Arc::new(Self {
            name,
            limits,
            state: Mutex::new(Counts::default()),
            metrics,
            connections,
            log: LogLimiter::per_minute(),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Takes a slot for a new connection from `peer`, or says why not (and
    /// counts and logs the refusal). The slot is given back when the
    /// [`Permit`] is dropped.
    pub fn admit(self: &Arc<Self>, peer: PeerKey) -> Result<Permit, Refused> {
        let refused = {
            let mut c = self.state.locked();
            let mine = c.per_peer.get(&peer).copied().unwrap_or(0);
            if c.total >= self.limits.max_connections {
                Some(Refused::ConnectionLimit)
            } else if mine >= self.limits.max_per_peer {
                Some(Refused::PeerLimit)
            } else {
                c.total += 1;
                *c.per_peer.entry(peer.clone()).or_insert(0) += 1;
                None
            }
        };
        if let Some(why) = refused {
            self.refuse(&peer, why);
            return Err(why);
        }
        self.connections.inc();
        Ok(Permit {
            gate: self.clone(),
            peer,
        })
    }

    fn refuse(&self, peer: &PeerKey, why: Refused) {
        self.metrics
            .refused
            .get_or_create(&RefusedLabels {
                listener: self.name,
                reason: why,
            })
            .inc();
        if self.log.should_warn(&format!("{peer}/{}", why.as_str())) {
            tracing::warn!(
                listener = self.name,
                %peer,
                reason = why.as_str(),
                max_connections = self.limits.max_connections,
                max_per_peer = self.limits.max_per_peer,
                "connection refused"
            );
        }
    }

    /// Reports a failed accept (most often: out of file descriptors), at
    /// most once a minute per kind of error, and counts it. The caller
    /// backs off before accepting again.
    pub fn accept_failed(&self, e: &std::io::Error) {
        self.closed(Closed::AcceptError);
        if self.log.should_warn(&format!("accept/{:?}", e.kind())) {
            tracing::warn!(
                listener = self.name,
                error = %e,
                "accept failed; backing off (out of file descriptors? raise the process's open-files limit)"
            );
        }
    }

    /// Counts a connection the server closed, by reason.
    pub fn closed(&self, reason: Closed) {
        self.metrics
            .closed
            .get_or_create(&ClosedLabels {
                listener: self.name,
                reason,
            })
            .inc();
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        self.state.locked().total
    }
}

/// A connection slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
    peer: PeerKey,
}

impl Permit {
    pub fn peer(&self) -> &PeerKey {
        &self.peer
    }

    /// Moves this connection under another peer's cap: a caller identified
    /// after accept (a pod rather than its uid). Refused, and counted, when
    /// that peer holds its share already.
    pub fn rekey(&mut self, peer: PeerKey) -> Result<(), Refused> {
        if peer == self.peer {
            return Ok(());
        }
        let gate = self.gate.clone();
        let mut c = gate.state.locked();
        if c.per_peer.get(&peer).copied().unwrap_or(0) >= gate.limits.max_per_peer {
            drop(c);
            gate.refuse(&peer, Refused::PeerLimit);
            return Err(Refused::PeerLimit);
        }
        if let Some(n) = c.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                c.per_peer.remove(&self.peer);
            }
        }
        *c.per_peer.entry(peer.clone()).or_insert(0) += 1;
        self.peer = peer;
        Ok(())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = self.gate.state.locked();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                c.per_peer.remove(&self.peer);
            }
        }
        drop(c);
        self.gate.connections.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(total: usize, per_peer: usize) -> Arc<Gate> {
        Gate::new(
            "test",
            Limits {
                max_connections: total,
                max_per_peer: per_peer,
                ..Limits::default()
            },
            ListenerMetrics::unregistered(),
        )
    }

    #[test]
    fn one_peer_cannot_take_every_slot() {
        let g = gate(10, 3);
        let a = PeerKey::Uid(1000);
        let held: Vec<_> = (0..3).map(|_| g.admit(a.clone()).unwrap()).collect();
        assert_eq!(g.admit(a.clone()).unwrap_err(), Refused::PeerLimit);
        let other = g.admit(PeerKey::Uid(0)).expect("another peer is still served");
        drop(held);
        assert_eq!(g.held(), 1);
        let _again = g.admit(a).expect("slots come back when connections end");
        drop(other);
    }

    #[test]
    fn the_total_cap_binds_across_peers() {
        let g = gate(4, 4);
        let held: Vec<_> = (0..4).map(|i| g.admit(PeerKey::Uid(i)).unwrap()).collect();
        assert_eq!(g.admit(PeerKey::Uid(99)).unwrap_err(), Refused::ConnectionLimit);
        drop(held);
        assert_eq!(g.held(), 0);
    }

    #[test]
    fn a_connection_moves_to_the_peer_identified_after_accept() {
        let g = gate(10, 2);
        let pod = PeerKey::Pod("p".into());
        let mut a = g.admit(PeerKey::Uid(0)).unwrap();
        let mut b = g.admit(PeerKey::Uid(0)).unwrap();
        a.rekey(pod.clone()).unwrap();
        b.rekey(pod.clone()).unwrap();
        // uid 0 is free again; the pod is full.
        let mut c = g.admit(PeerKey::Uid(0)).unwrap();
        let _d = g.admit(PeerKey::Uid(0)).unwrap();
        assert_eq!(c.rekey(pod).unwrap_err(), Refused::PeerLimit);
    }

    #[test]
    fn ipv6_peers_are_counted_per_64() {
        let a: IpAddr = "fd00:1:2:3::1".parse().unwrap();
        let b: IpAddr = "fd00:1:2:3:ffff::9".parse().unwrap();
        let c: IpAddr = "fd00:1:2:4::1".parse().unwrap();
        assert_eq!(PeerKey::ip(a), PeerKey::ip(b));
        assert_ne!(PeerKey::ip(a), PeerKey::ip(c));
        assert_eq!(PeerKey::ip(a).to_string(), "fd00:1:2:3::/64");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(PeerKey::ip(mapped), PeerKey::ip("10.0.0.1".parse().unwrap()));
    }
}
