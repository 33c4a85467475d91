//! The datapath's two ring buffers as typed streams: auth signals (a pair
//! needs authentication) and per-flow events.

use std::mem::{offset_of, size_of};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{MapData, RingBuf};
use keyway_common::{AuthKey, AuthSignal, FlowEvent, drop_reason, flow_kind, hook};
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, mpsc, watch};

/// A packet was dropped because this pair has no valid auth entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingAuth {
    pub key: AuthKey,
    /// Kernel monotonic time of the drop.
    pub at_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowKind {
    New,
    Drop,
    VerdictChange,
}

/// One flow event, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub at_ns: u64,
    pub kind: FlowKind,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub forwarded: bool,
    pub drop_reason: u8,
    pub auth_required: bool,
    pub rule_id: u32,
    pub ifindex: u32,
    /// True when seen leaving the pod (TC ingress of its veth).
    pub from_pod: bool,
}

impl Flow {
    pub fn drop_reason_name(&self) -> &'static str {
        drop_reason::name(self.drop_reason)
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Decodes a record of the flow ring buffer; `None` for a short or unknown one.
pub fn decode_flow(b: &[u8]) -> Option<Flow> {
    if b.len() < size_of::<FlowEvent>() {
        return None;
    }
    let kind = match b[offset_of!(FlowEvent, kind)] {
        flow_kind::NEW => FlowKind::New,
        flow_kind::DROP => FlowKind::Drop,
        flow_kind::VERDICT_CHANGE => FlowKind::VerdictChange,
        _ => return None,
    };
    let family = b[offset_of!(FlowEvent, family)];
    let addr = |off: usize| -> Option<IpAddr> {
        let a: [u8; 16] = b[off..off + 16].try_into().expect("16 bytes");
        match family {
            4 => Some(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
            6 => Some(IpAddr::V6(Ipv6Addr::from(a))),
            _ => None,
        }
    };
    Some(Flow {
        at_ns: u64_at(b, offset_of!(FlowEvent, ts_ns)),
        kind,
        src: addr(offset_of!(FlowEvent, src_ip))?,
        dst: addr(offset_of!(FlowEvent, dst_ip))?,
        src_port: u16::from_be(u16_at(b, offset_of!(FlowEvent, src_port))),
        dst_port: u16::from_be(u16_at(b, offset_of!(FlowEvent, dst_port))),
        proto: b[offset_of!(FlowEvent, proto)],
        src_identity: u32_at(b, offset_of!(FlowEvent, src_identity)),
        dst_identity: u32_at(b, offset_of!(FlowEvent, dst_identity)),
        forwarded: b[offset_of!(FlowEvent, forwarded)] == 1,
        drop_reason: b[offset_of!(FlowEvent, drop_reason)],
        auth_required: b[offset_of!(FlowEvent, auth_required)] == 1,
        rule_id: u32_at(b, offset_of!(FlowEvent, rule_id)),
        ifindex: u32_at(b, offset_of!(FlowEvent, ifindex)),
        from_pod: b[offset_of!(FlowEvent, hook)] == hook::FROM_POD,
    })
}

/// Decodes a record of the signal ring buffer.
pub fn decode_signal(b: &[u8]) -> Option<MissingAuth> {
    if b.len() < size_of::<AuthSignal>() {
        return None;
    }
    let k = offset_of!(AuthSignal, key);
    Some(MissingAuth {
        key: AuthKey {
            local_id: u32_at(b, k + offset_of!(AuthKey, local_id)),
            remote_id: u32_at(b, k + offset_of!(AuthKey, remote_id)),
            remote_node_id: u16_at(b, k + offset_of!(AuthKey, remote_node_id)),
            auth_type: b[k + offset_of!(AuthKey, auth_type)],
            _pad: 0,
        },
        at_ns: u64_at(b, offset_of!(AuthSignal, ts_ns)),
    })
}

/// Drains a ring buffer whenever the kernel says it has data, decoding each
/// record and handing it to `sink` until shutdown.
pub(super) async fn drain<T>(
    ring: RingBuf<MapData>,
    decode: fn(&[u8]) -> Option<T>,
    mut sink: impl FnMut(T),
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its map's file descriptor, which stays
    // open, and is the one `as_raw_fd` returns, for as long as it lives; the
    // AsyncFd owns the ring buffer.
    #[allow(
        unsafe_code,
        reason = "tokio's registration of a raw fd is unsafe; the fd is owned by the value"
    )]
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                // Clear first, then drain: a record committed after the
                // drain's last look wakes us again instead of waiting for
                // the next one (the kernel only wakes a consumer that had
                // caught up).
                guard.clear_ready();
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if let Some(v) = decode(&item) {
                        sink(v);
                    }
                }
            }
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// Missing-auth signals read from the kernel since start-up
/// (`keyway_datapath_signals_total`).
#[derive(Debug, Default)]
pub struct SignalCounts {
    /// Handed to the handshake driver.
    pub queued: std::sync::atomic::AtomicU64,
    /// Dropped because the queue was full (the kernel signals again).
    pub queue_full: std::sync::atomic::AtomicU64,
}

/// Where the readers deliver: signals to the one consumer that runs
/// handshakes (bounded: when it falls behind, the kernel's dedup interval
/// sends the signal again), flows to any number of subscribers.
pub(super) fn signal_sink(
    tx: mpsc::Sender<MissingAuth>,
    counts: std::sync::Arc<SignalCounts>,
) -> impl FnMut(MissingAuth) {
    use std::sync::atomic::Ordering::Relaxed;
    move |s| {
        if tx.try_send(s).is_ok() {
            counts.queued.fetch_add(1, Relaxed);
        } else {
            counts.queue_full.fetch_add(1, Relaxed);
            tracing::debug!(
                local = s.key.local_id,
                remote = s.key.remote_id,
                "auth signal queue full"
            );
        }
    }
}

pub(super) fn flow_sink(tx: broadcast::Sender<Flow>) -> impl FnMut(Flow) {
    move |f| {
        let _ = tx.send(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_records_decode_field_by_field() {
        let mut b = vec![0u8; size_of::<FlowEvent>()];
        b[offset_of!(FlowEvent, ts_ns)..][..8].copy_from_slice(&7u64.to_ne_bytes());
        b[offset_of!(FlowEvent, src_ip)..][..4].copy_from_slice(&[10, 0, 0, 1]);
        b[offset_of!(FlowEvent, dst_ip)..][..4].copy_from_slice(&[10, 0, 0, 2]);
        b[offset_of!(FlowEvent, dst_port)..][..2].copy_from_slice(&8080u16.to_be_bytes());
        b[offset_of!(FlowEvent, src_identity)..][..4].copy_from_slice(&300u32.to_ne_bytes());
        b[offset_of!(FlowEvent, kind)] = flow_kind::DROP;
        b[offset_of!(FlowEvent, drop_reason)] = drop_reason::AUTH_REQUIRED;
        b[offset_of!(FlowEvent, hook)] = hook::TO_POD;
        b[offset_of!(FlowEvent, family)] = 4;
        let f = decode_flow(&b).unwrap();
        assert_eq!(f.at_ns, 7);
        assert_eq!(f.src, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(f.dst, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(f.dst_port, 8080);
        assert_eq!(f.src_identity, 300);
        assert_eq!(f.kind, FlowKind::Drop);
        assert_eq!(f.drop_reason_name(), "auth-required");
        assert!(!f.forwarded && !f.from_pod);
        assert!(decode_flow(&b[..10]).is_none());
        // IPv6: all sixteen bytes are the address.
        let v6: Ipv6Addr = "fd00:201::1".parse().unwrap();
        b[offset_of!(FlowEvent, src_ip)..][..16].copy_from_slice(&v6.octets());
        b[offset_of!(FlowEvent, family)] = 6;
        assert_eq!(decode_flow(&b).unwrap().src, v6);
        // A family the datapath never writes is not guessed at.
        b[offset_of!(FlowEvent, family)] = 0;
        assert!(decode_flow(&b).is_none());
    }

    #[test]
    fn signals_decode_their_key() {
        let mut b = vec![0u8; size_of::<AuthSignal>()];
        b[0..4].copy_from_slice(&300u32.to_ne_bytes());
        b[4..8].copy_from_slice(&301u32.to_ne_bytes());
        b[8..10].copy_from_slice(&2u16.to_ne_bytes());
        b[10] = 1;
        b[16..24].copy_from_slice(&99u64.to_ne_bytes());
        let s = decode_signal(&b).unwrap();
        assert_eq!(
            (
                s.key.local_id,
                s.key.remote_id,
                s.key.remote_node_id,
                s.key.auth_type,
                s.at_ns
            ),
            (300, 301, 2, 1, 99)
        );
    }

    #[test]
    fn signals_beyond_the_queue_are_counted_as_queue_full() {
        use std::sync::atomic::Ordering::Relaxed;
        let mut b = vec![0u8; size_of::<AuthSignal>()];
        b[0..4].copy_from_slice(&300u32.to_ne_bytes());
        let s = decode_signal(&b).unwrap();
        let (tx, mut rx) = mpsc::channel(2);
        let counts = std::sync::Arc::new(SignalCounts::default());
        let mut sink = signal_sink(tx, counts.clone());
        for _ in 0..3 {
            sink(s);
        }
        assert_eq!(
            (counts.queued.load(Relaxed), counts.queue_full.load(Relaxed)),
            (2, 1)
        );
        assert_eq!(rx.try_recv().unwrap(), s);
        sink(s);
        assert_eq!(
            counts.queued.load(Relaxed),
            3,
            "a drained slot takes the next signal"
        );
    }
}
