//! Flow capture: the datapath's per-flow events, enriched with names
//! (namespace, workload, service account, SPIFFE ID), the policy rule and the
//! auth state, kept in a bounded ring and streamed to `node-agent observe`.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyway_common::drop_reason;
use proto::keyway as pb;
use tokio::sync::{broadcast, watch};

use crate::datapath::{DatapathStatus, Flow, FlowKind, monotonic_ns};
use crate::explain::protocol_name;
use crate::mutual_auth::{AuthRecord, Via};
use crate::state::NodeState;
use keyway_identity::lock::Recover;

pub const DEFAULT_CAPACITY: usize = 4096;

/// The bounded buffer and the live feed.
#[derive(Debug)]
pub struct FlowLog {
    ring: Mutex<VecDeque<pb::FlowRecord>>,
    capacity: usize,
    live: broadcast::Sender<pb::FlowRecord>,
}

impl FlowLog {
    pub fn new(capacity: usize) -> Arc<FlowLog> {
        Arc::new(FlowLog {
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(1 << 16))),
            capacity: capacity.max(1),
            live: broadcast::channel(1024).0,
        })
    }

    pub fn push(&self, r: pb::FlowRecord) {
        {
            let mut ring = self.ring.locked();
            if ring.len() == self.capacity {
                ring.pop_front();
            }
            ring.push_back(r.clone());
        }
        let _ = self.live.send(r);
    }

    pub fn len(&self) -> usize {
        self.ring.locked().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the buffer holds now, and a receiver for what comes after.
    pub fn snapshot_and_subscribe(&self) -> (Vec<pb::FlowRecord>, broadcast::Receiver<pb::FlowRecord>) {
        let ring = self.ring.locked();
        (ring.iter().cloned().collect(), self.live.subscribe())
    }
}

/// True when `r` passes every filter set in `q`.
pub fn matches(q: &pb::ObserveRequest, r: &pb::FlowRecord) -> bool {
    let ends = [r.source.as_ref(), r.destination.as_ref(), r.sender.as_ref()];
    let any_end = |f: &dyn Fn(&pb::FlowEndpoint) -> bool| ends.iter().flatten().any(|e| f(e));
    (q.namespace.is_empty() || any_end(&|e| e.namespace == q.namespace))
        && (q.pod.is_empty() || any_end(&|e| e.pod == q.pod))
        && (q.identity == 0 || any_end(&|e| e.identity == q.identity))
        && (q.spiffe_id.is_empty() || any_end(&|e| e.spiffe_id == q.spiffe_id))
        && (q.verdict.is_empty() || r.verdict.eq_ignore_ascii_case(&q.verdict))
        && (q.drop_reason.is_empty() || r.drop_reason == q.drop_reason)
        && (q.port == 0 || r.destination.as_ref().is_some_and(|d| d.port == q.port))
        && (q.since_unix_ms == 0 || r.time_unix_ms >= q.since_unix_ms)
}

fn endpoint(state: &NodeState, ip: IpAddr, port: u16, identity: u32) -> pb::FlowEndpoint {
    let ip_s = ip.to_string();
    let mut e = pb::FlowEndpoint {
        ip: ip_s.clone(),
        port: u32::from(port),
        identity,
        ..Default::default()
    };
    if let Some(w) = state.workloads.values().find(|w| w.ips.contains(&ip_s)) {
        e.namespace = w.namespace.clone();
        e.pod = w.name.clone();
        e.service_account = w.service_account.clone();
        e.spiffe_id = w.spiffe_id.clone();
    } else if let Some(i) = state.identities.get(&identity) {
        e.namespace = i.namespace.clone();
        e.service_account = i.service_account.clone();
        e.spiffe_id = i.spiffe_id.clone();
        // A workload on another node: its name comes with the ipcache.
        if let Some(c) = state.ipcache.get(&crate::explain::host_cidr(ip))
            && c.identity == identity
        {
            e.pod = c.workload.clone();
        }
    }
    e
}

/// The node an address runs on (from the ipcache; 0 when unknown).
fn node_of(state: &NodeState, ip: IpAddr) -> u16 {
    state
        .ipcache
        .get(&crate::explain::host_cidr(ip))
        .and_then(|e| u16::try_from(e.node_id).ok())
        .unwrap_or(0)
}

/// Turns a datapath event into a flow record.
pub fn enrich(
    state: &NodeState,
    status: &DatapathStatus,
    auth: &[AuthRecord],
    node: &str,
    f: &Flow,
    now_wall: SystemTime,
    now_mono_ns: u64,
) -> pb::FlowRecord {
    let age = Duration::from_nanos(now_mono_ns.saturating_sub(f.at_ns));
    let spoofed = !f.forwarded && f.drop_reason == drop_reason::SOURCE_SPOOFED;
    let at = now_wall.checked_sub(age).unwrap_or(now_wall);
    let auth_state = if !f.auth_required {
        "not-required"
    } else if !f.forwarded {
        "missing"
    } else {
        // The entry the kernel consulted: (subject, peer, peer's node).
        let (local, remote, remote_ip) = if f.from_pod {
            (f.src_identity, f.dst_identity, f.dst)
        } else {
            (f.dst_identity, f.src_identity, f.src)
        };
        let key = keyway_common::auth_key(local, remote, node_of(state, remote_ip), status.local_node_id);
        match auth.iter().find(|r| r.key == key) {
            Some(r) if r.via != Via::Answered && r.authenticated_at <= at => "pre-authenticated",
            _ => "authenticated",
        }
    };
    pb::FlowRecord {
        time_unix_ms: at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
        event: match f.kind {
            FlowKind::New => "new",
            FlowKind::Drop => "drop",
            FlowKind::VerdictChange => "verdict-change",
        }
        .into(),
        source: Some(if spoofed {
            // Only the forged address: its owner did not send this.
            pb::FlowEndpoint {
                ip: f.src.to_string(),
                port: u32::from(f.src_port),
                ..Default::default()
            }
        } else {
            endpoint(state, f.src, f.src_port, f.src_identity)
        }),
        sender: spoofed
            .then(|| {
                let (ip, ep) = status.endpoints.iter().find(|(_, ep)| ep.ifindex == f.ifindex)?;
                Some(endpoint(state, *ip, f.src_port, ep.identity))
            })
            .flatten(),
        interface: crate::datapath::sys::ifname(f.ifindex).unwrap_or_default(),
        destination: Some(endpoint(state, f.dst, f.dst_port, f.dst_identity)),
        protocol: protocol_name(f.proto),
        verdict: if f.forwarded { "FORWARDED" } else { "DROPPED" }.into(),
        drop_reason: if f.forwarded {
            String::new()
        } else {
            drop_reason::name(f.drop_reason).into()
        },
        auth: auth_state.into(),
        rule: status.rules.get(&f.rule_id).cloned().unwrap_or_default(),
        direction: if f.from_pod { "egress" } else { "ingress" }.into(),
        node: node.into(),
    }
}

/// Feeds `log` from the datapath's flow events until shutdown.
pub fn run(
    log: Arc<FlowLog>,
    mut flows: broadcast::Receiver<Flow>,
    state: watch::Receiver<Arc<NodeState>>,
    status: watch::Receiver<DatapathStatus>,
    auth: watch::Receiver<Arc<Vec<AuthRecord>>>,
    node: String,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let f = tokio::select! {
                r = flows.recv() => match r {
                    Ok(f) => f,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "flow capture fell behind; events lost");
                        continue;
                    }
                    Err(_) => return,
                },
                _ = shutdown.changed() => return,
            };
            let r = enrich(
                &state.borrow(),
                &status.borrow(),
                &auth.borrow(),
                &node,
                &f,
                SystemTime::now(),
                monotonic_ns(),
            );
            log.push(r);
        }
    })
}

/// `Nov 26 09:42:01.234` in UTC.
pub fn format_time(unix_ms: i64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    format!(
        "{} {:02} {:02}:{:02}:{:02}.{:03}",
        MONTHS[(month - 1) as usize],
        day,
        tod / 3600,
        tod % 3600 / 60,
        tod % 60,
        ms
    )
}

/// `ip:port`, an IPv6 address in brackets.
fn host_port(ip: &str, port: u32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

fn end_name(e: &pb::FlowEndpoint) -> String {
    match (e.namespace.is_empty(), e.pod.is_empty()) {
        (false, false) => format!("{}/{} ({})", e.namespace, e.pod, e.service_account),
        (false, true) => format!(
            "{}/{} ({})",
            e.namespace,
            host_port(&e.ip, e.port),
            e.service_account
        ),
        _ => host_port(&e.ip, e.port),
    }
}

/// The human line of DESIGN.md section 6.
pub fn format_line(r: &pb::FlowRecord) -> String {
    let src = r.source.clone().unwrap_or_default();
    let dst = r.destination.clone().unwrap_or_default();
    let src_name = match &r.sender {
        Some(sender) => format!(
            "{} (forged by {})",
            host_port(&src.ip, src.port),
            end_name(sender)
        ),
        None => end_name(&src),
    };
    let mut line = format!(
        "{} {} -> {} {} {} {}",
        format_time(r.time_unix_ms),
        src_name,
        end_name(&dst),
        r.protocol,
        dst.port,
        r.verdict
    );
    if r.verdict == "DROPPED" {
        line.push(' ');
        line.push_str(&r.drop_reason);
    }
    line.push_str(match r.auth.as_str() {
        "pre-authenticated" => " auth=mtls(pre-authenticated)",
        "authenticated" => " auth=mtls",
        "missing" => " auth=missing",
        _ => " auth=none",
    });
    if !r.rule.is_empty() {
        line.push_str(&format!(" rule=\"{}\"", r.rule));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ns: &str, pod: &str, verdict: &str, port: u32, t: i64) -> pb::FlowRecord {
        pb::FlowRecord {
            time_unix_ms: t,
            verdict: verdict.into(),
            source: Some(pb::FlowEndpoint {
                namespace: ns.into(),
                pod: pod.into(),
                identity: 300,
                spiffe_id: format!("spiffe://example.org/ns/{ns}/sa/{pod}"),
                ..Default::default()
            }),
            destination: Some(pb::FlowEndpoint {
                port,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_ring_never_grows_past_its_bound() {
        let log = FlowLog::new(3);
        for i in 0..10 {
            log.push(record("default", "a", "FORWARDED", 80, i));
        }
        let (snap, _) = log.snapshot_and_subscribe();
        assert_eq!(
            snap.iter().map(|r| r.time_unix_ms).collect::<Vec<_>>(),
            vec![7, 8, 9]
        );
    }

    #[test]
    fn filters_select_exactly_the_matching_flows() {
        let r = record("default", "frontend", "DROPPED", 8080, 100);
        let q = |f: fn(&mut pb::ObserveRequest)| {
            let mut q = pb::ObserveRequest::default();
            f(&mut q);
            matches(&q, &r)
        };
        assert!(q(|_| {}));
        assert!(q(|q| q.namespace = "default".into()));
        assert!(!q(|q| q.namespace = "kube-system".into()));
        assert!(q(|q| q.pod = "frontend".into()));
        assert!(q(|q| q.identity = 300));
        assert!(!q(|q| q.identity = 301));
        assert!(q(
            |q| q.spiffe_id = "spiffe://example.org/ns/default/sa/frontend".into()
        ));
        assert!(!q(
            |q| q.spiffe_id = "spiffe://example.org/ns/default/sa/api".into()
        ));
        assert!(q(|q| q.verdict = "dropped".into()));
        assert!(!q(|q| q.verdict = "FORWARDED".into()));
        assert!(q(|q| q.port = 8080));
        assert!(!q(|q| q.port = 80));
        assert!(q(|q| q.since_unix_ms = 100));
        assert!(!q(|q| q.since_unix_ms = 101));
    }

    #[test]
    fn times_read_like_syslog() {
        // 2026-11-26T09:42:01.234Z
        assert_eq!(format_time(1_795_686_121_234), "Nov 26 09:42:01.234");
        assert_eq!(format_time(0), "Jan 01 00:00:00.000");
    }

    #[test]
    fn lines_read_like_the_design() {
        let r = pb::FlowRecord {
            time_unix_ms: 1_795_686_121_234,
            source: Some(pb::FlowEndpoint {
                namespace: "default".into(),
                pod: "frontend".into(),
                service_account: "frontend".into(),
                ..Default::default()
            }),
            destination: Some(pb::FlowEndpoint {
                namespace: "default".into(),
                pod: "api".into(),
                service_account: "api".into(),
                port: 8080,
                ..Default::default()
            }),
            protocol: "TCP".into(),
            verdict: "FORWARDED".into(),
            auth: "authenticated".into(),
            ..Default::default()
        };
        assert_eq!(
            format_line(&r),
            "Nov 26 09:42:01.234 default/frontend (frontend) -> default/api (api) TCP 8080 FORWARDED auth=mtls"
        );
        // Addresses without a pod name: an IPv6 one in brackets, so its
        // port reads apart from it.
        let r = pb::FlowRecord {
            source: Some(pb::FlowEndpoint {
                ip: "fd00::a:c9:1:a".into(),
                port: 40000,
                ..Default::default()
            }),
            destination: Some(pb::FlowEndpoint {
                ip: "10.201.2.10".into(),
                port: 8080,
                ..Default::default()
            }),
            ..r
        };
        assert!(
            format_line(&r).contains(" [fd00::a:c9:1:a]:40000 -> 10.201.2.10:8080 TCP 8080 "),
            "{}",
            format_line(&r)
        );
    }
}
