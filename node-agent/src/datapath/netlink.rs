//! When to look for endpoints again: the node's links, addresses and routes
//! change, as rtnetlink's multicast groups report it. A CNI plugin creates
//! the pod's veth, moves one end into the pod, addresses it and adds the
//! host route; each step is a message here, so the endpoint scan runs
//! within milliseconds of the route that makes the pod reachable, instead of
//! at the next poll.
//!
//! The messages are only counted, never trusted for content: whatever
//! arrives, the scan reads the whole routing table again. A burst (a hundred
//! pods created at once) is one scan per wake-up, not one per message. When
//! the kernel drops messages because the socket's buffer is full (ENOBUFS),
//! that is a change too: something was missed, so everything is read again.

use std::io;

use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};

/// Link, IPv4/IPv6 address and IPv4/IPv6 route changes. Neighbour messages
/// (every ARP and ND state change) are left out: they are many and never
/// make or unmake an endpoint.
const GROUPS: u32 = (libc::RTMGRP_LINK
    | libc::RTMGRP_IPV4_IFADDR
    | libc::RTMGRP_IPV4_ROUTE
    | libc::RTMGRP_IPV6_IFADDR
    | libc::RTMGRP_IPV6_ROUTE) as u32;

/// Kernel buffer for queued notifications; a node creating pods in bulk
/// makes a few messages per pod.
const RECEIVE_BUFFER: usize = 1 << 20;

/// What one wake-up saw, for logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub links: u32,
    pub addresses: u32,
    pub routes: u32,
    pub other: u32,
    /// The kernel dropped notifications (the socket's buffer was full).
    pub overflowed: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// A subscription to the calling thread's network namespace (the agent's
/// node namespace, or in tests the one the datapath thread entered).
pub struct NetlinkWatch {
    socket: TokioSocket,
}

impl std::fmt::Debug for NetlinkWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NetlinkWatch")
    }
}

impl NetlinkWatch {
    /// Must be called from within a tokio runtime.
    pub fn subscribe() -> io::Result<NetlinkWatch> {
        let mut socket = TokioSocket::new(NETLINK_ROUTE)?;
        socket.socket_mut().bind(&SocketAddr::new(0, GROUPS))?;
        // Best effort: a smaller buffer only means an overflow (and a full
        // rescan) sooner.
        let _ = socket.socket_ref().set_rx_buf_sz(RECEIVE_BUFFER);
        Ok(NetlinkWatch { socket })
    }

    /// Waits for at least one notification, then takes whatever else is
    /// already queued without waiting.
    pub async fn changes(&mut self) -> io::Result<Changes> {
        let mut seen = Changes::default();
        match self.socket.recv_from_full().await {
            Ok((buf, _)) => count(&buf, &mut seen),
            Err(e) if is_overflow(&e) => seen.overflowed = true,
            Err(e) => return Err(e),
        }
        loop {
            // The socket is non-blocking: an empty queue is WouldBlock.
            match self.socket.socket_ref().recv_from_full() {
                Ok((buf, _)) => count(&buf, &mut seen),
                Err(e) if is_overflow(&e) => seen.overflowed = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(seen),
                Err(e) => return Err(e),
            }
        }
    }
}

fn is_overflow(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOBUFS)
}

/// Counts the messages of one datagram by type. A truncated or malformed
/// header ends the walk (the datagram still counts as a change).
pub fn count(buf: &[u8], into: &mut Changes) {
    const HEADER: usize = 16;
    let mut off = 0;
    let mut any = false;
    while buf.len() - off >= HEADER {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if len < HEADER || len > buf.len() - off {
            break;
        }
        any = true;
        match kind {
            libc::RTM_NEWLINK | libc::RTM_DELLINK => into.links += 1,
            libc::RTM_NEWADDR | libc::RTM_DELADDR => into.addresses += 1,
            libc::RTM_NEWROUTE | libc::RTM_DELROUTE => into.routes += 1,
            _ => into.other += 1,
        }
        // Messages are aligned to 4 bytes.
        off += (len + 3) & !3;
        if off > buf.len() {
            break;
        }
    }
    if !any {
        into.other += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, payload: usize) -> Vec<u8> {
        let len = 16 + payload;
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.resize(len, 0);
        m.resize((len + 3) & !3, 0);
        m
    }

    #[test]
    fn one_datagram_with_several_messages_counts_each_by_kind() {
        let mut buf = message(libc::RTM_NEWLINK, 3);
        buf.extend(message(libc::RTM_NEWROUTE, 12));
        buf.extend(message(libc::RTM_DELROUTE, 12));
        buf.extend(message(libc::RTM_NEWADDR, 8));
        let mut c = Changes::default();
        count(&buf, &mut c);
        assert_eq!(
            c,
            Changes {
                links: 1,
                addresses: 1,
                routes: 2,
                other: 0,
                overflowed: false
            }
        );
    }

    #[test]
    fn a_garbled_datagram_still_counts_as_a_change() {
        for buf in [vec![1, 2, 3], {
            let mut m = message(libc::RTM_NEWROUTE, 4);
            m[0] = 0xff; // length past the end
            m
        }] {
            let mut c = Changes::default();
            count(&buf, &mut c);
            assert!(!c.is_empty(), "{buf:?}");
        }
    }
}
