//! When to look for endpoints again: the node's links, addresses and routes
//! change, as rtnetlink's multicast groups report it. A CNI plugin creates
//! the pod's veth, moves one end into the pod, addresses it and adds the
//! host route; each step is a message here, so the endpoint scan runs
//! within milliseconds of the route that makes the pod reachable, instead of
//! at the next poll.
//!
//! Where it may (CAP_NET_BROADCAST), the socket also listens to the
//! namespaces that have an id in the node's (NETLINK_LISTEN_ALL_NSID): those
//! of pods, once a veth joins them to it. A bridge CNI's last step, the
//! pod's address, happens there.
//!
//! The requests below ([`links`], [`link_in`], [`nsid_of`]) read what a
//! namespace holds now, for the scan.
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
        // The pods' namespaces too (every namespace with an id here, which a
        // veth into it gives): a bridge CNI sets the pod's address inside
        // the pod's namespace, after the last change it makes in ours.
        // Best effort: it takes CAP_NET_BROADCAST, which the chart does not
        // grant; without it the scan's retry covers such pods.
        if let Err(e) = socket.socket_ref().set_listen_all_namespaces(true) {
            tracing::info!(error = %e, "rtnetlink: not listening to the pods' namespaces (needs CAP_NET_BROADCAST); unplaced addresses are retried instead");
        }
        Ok(NetlinkWatch { socket })
    }

    /// Waits for at least one notification, then takes what else is
    /// already queued without waiting (see [`NetlinkWatch::drain`]).
    pub async fn changes(&mut self) -> io::Result<Changes> {
        let mut seen = Changes::default();
        match self.socket.recv_from_full().await {
            Ok((buf, _)) => count(&buf, &mut seen),
            Err(e) if is_overflow(&e) => seen.overflowed = true,
            Err(e) => return Err(e),
        }
        self.drain(&mut seen)?;
        Ok(seen)
    }

    /// Takes notifications already queued, without waiting: at most
    /// [`DRAIN_LIMIT`] datagrams, so a flood cannot keep the caller
    /// reading (what is left wakes the next [`NetlinkWatch::changes`]).
    pub fn drain(&mut self, seen: &mut Changes) -> io::Result<()> {
        for _ in 0..DRAIN_LIMIT {
            // The socket is non-blocking: an empty queue is WouldBlock.
            match self.socket.socket_ref().recv_from_full() {
                Ok((buf, _)) => count(&buf, seen),
                Err(e) if is_overflow(&e) => seen.overflowed = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Datagrams taken per [`NetlinkWatch::drain`].
pub const DRAIN_LIMIT: usize = 256;

fn is_overflow(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOBUFS)
}

/// Counts the messages of one datagram by type. A truncated or malformed
/// header ends the walk (the datagram still counts as a change).
pub fn count(buf: &[u8], into: &mut Changes) {
    const HEADER: usize = 16;
    let mut off = 0;
    let mut any = false;
    while buf.len().saturating_sub(off) >= HEADER {
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

// ---- dumps: what the calling thread's network namespace holds now ----

/// One network interface, from an RTM_GETLINK dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `veth`, `bridge`, ...; empty for a device without link info (lo).
    pub kind: String,
    /// The bridge (or bond) this interface is a port of, 0 if none.
    pub master: u32,
    /// For a veth, its peer's index (in the peer's namespace), 0 if none.
    pub peer: u32,
    /// The id, in this namespace, of the namespace the peer is in, when it
    /// is another one (IFLA_LINK_NETNSID).
    pub peer_netnsid: Option<i32>,
    /// Its hardware address, for an Ethernet device.
    pub mac: Option<[u8; 6]>,
}

const NLMSG_HEADER: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
/// Set on a dump's messages when the table changed during the walk.
const NLM_F_DUMP_INTR: u16 = 0x10;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_TARGET_NETNSID: u16 = 46;
const RTM_NEWNSID: u16 = 88;
const RTM_GETNSID: u16 = 90;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;
/// Attribute types carry flag bits (nested, byte order) above these.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Every interface of the calling thread's network namespace.
pub fn links() -> io::Result<Vec<Link>> {
    // struct ifinfomsg: family, pad, type, index, flags, change.
    dump_links(&[0u8; 16])
}

fn dump_links(req: &[u8]) -> io::Result<Vec<Link>> {
    let mut out = Vec::new();
    dump(RTM_GETLINK, req, |kind, body| {
        if kind == RTM_NEWLINK
            && let Some(l) = parse_link(body)
        {
            out.push(l);
        }
    })?;
    Ok(out)
}

/// A dump request's family header followed by the one attribute that aims
/// it at the namespace with id `netnsid`.
fn aimed_at(header: &[u8], attribute: u16, netnsid: i32) -> Vec<u8> {
    let mut req = header.to_vec();
    req.extend_from_slice(&8u16.to_ne_bytes());
    req.extend_from_slice(&attribute.to_ne_bytes());
    req.extend_from_slice(&netnsid.to_ne_bytes());
    req
}

/// One interface of the network namespace that has id `netnsid` in the
/// calling thread's (a pod's, seen from the node through its veth's
/// IFLA_LINK_NETNSID), by its index there, read without entering it: the
/// kernel takes the target namespace from the request (IFLA_TARGET_NETNSID,
/// Linux 4.20, needs CAP_NET_ADMIN over it). One message, not a dump of
/// every interface the pod made.
pub fn link_in(netnsid: i32, index: u32) -> io::Result<Option<Link>> {
    // struct ifinfomsg: family, pad, type, index, flags, change; strict
    // checking wants all but the index zero.
    let mut header = [0u8; 16];
    header[4..8].copy_from_slice(&index.to_ne_bytes());
    match request(RTM_GETLINK, &aimed_at(&header, IFLA_TARGET_NETNSID, netnsid)) {
        Ok(messages) => Ok(messages
            .iter()
            .find(|(t, _)| *t == RTM_NEWLINK)
            .and_then(|(_, body)| parse_link(body))),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The id the calling thread's network namespace gives the namespace open
/// at `ns` (a file under /var/run/netns, or /proc/<pid>/ns/net), if it has
/// given it one (RTM_GETNSID). A namespace gets an id once something links
/// it to this one, a veth with one end in each included: the link dump that
/// reports such a veth assigns it.
pub fn nsid_of(ns: std::os::fd::BorrowedFd<'_>) -> io::Result<Option<i32>> {
    use std::os::fd::AsRawFd;
    // struct rtgenmsg (one byte, aligned to four), then NETNSA_FD.
    let req = aimed_at(&[libc::AF_UNSPEC as u8, 0, 0, 0], NETNSA_FD, ns.as_raw_fd());
    let messages = request(RTM_GETNSID, &req)?;
    let body = messages
        .iter()
        .find(|(t, _)| *t == RTM_NEWNSID)
        .map(|(_, b)| b.as_slice())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no RTM_NEWNSID in the reply"))?;
    let id = attributes(body.get(4..).unwrap_or_default())
        .find(|(t, p)| *t == NETNSA_NSID && p.len() >= 4)
        .map(|(_, p)| u32_at(p, 0) as i32);
    // NETNSA_NSID_NOT_ASSIGNED is -1.
    Ok(id.filter(|id| *id >= 0))
}

/// Sends one dump request and hands each reply message (type, body after
/// the netlink header) to `each` until the kernel says done.
fn dump(kind: u16, family_header: &[u8], mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    // A dump the kernel marks interrupted (the table changed while it was
    // being walked) may have missed or repeated entries: taken again.
    for _ in 0..DUMP_ATTEMPTS {
        match dump_once(kind, family_header)? {
            Some(messages) => {
                for (t, payload) in &messages {
                    each(*t, payload);
                }
                return Ok(());
            }
            None => continue,
        }
    }
    Err(io::Error::new(
        io::ErrorKind::Interrupted,
        format!("the rtnetlink dump was interrupted by changes {DUMP_ATTEMPTS} times in a row"),
    ))
}

const DUMP_ATTEMPTS: usize = 3;

/// One dump's messages (type, payload), or None if the kernel marked it
/// interrupted.
fn dump_once(kind: u16, family_header: &[u8]) -> io::Result<Option<Vec<Message>>> {
    let socket = send(kind, NLM_F_REQUEST | NLM_F_DUMP, family_header)?;
    let mut dump = Dump::default();
    loop {
        let (buf, _) = socket.recv_from_full()?;
        if dump.take(&buf)? {
            return Ok((!dump.interrupted).then_some(dump.messages));
        }
    }
}

/// Sends one request that is not a dump and reads its one reply datagram.
fn request(kind: u16, body: &[u8]) -> io::Result<Vec<Message>> {
    let socket = send(kind, NLM_F_REQUEST, body)?;
    let (buf, _) = socket.recv_from_full()?;
    let mut reply = Dump::default();
    reply.take(&buf)?;
    Ok(reply.messages)
}

/// A new rtnetlink socket of the calling thread's namespace, strict
/// checking on, with the request sent.
fn send(kind: u16, flags: u16, body: &[u8]) -> io::Result<netlink_sys::Socket> {
    let mut socket = netlink_sys::Socket::new(NETLINK_ROUTE)?;
    socket.set_netlink_get_strict_chk(true)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let len = NLMSG_HEADER + body.len();
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&kind.to_ne_bytes());
    req.extend_from_slice(&flags.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    req.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel
    req.extend_from_slice(body);
    socket.send(&req, 0)?;
    Ok(socket)
}

/// The most one dump may hold. A node's links are a few KiB each with a few
/// hundred pods; a pod that makes interfaces in its own namespace is not
/// read by dump any more, but a bound keeps a surprise from costing the
/// agent its memory.
const DUMP_LIMIT: usize = 64 << 20;

/// A netlink message: its type and payload.
type Message = (u16, Vec<u8>);

/// A dump's reply, datagram by datagram.
#[derive(Debug, Default)]
struct Dump {
    messages: Vec<Message>,
    bytes: usize,
    interrupted: bool,
}

impl Dump {
    /// Takes one datagram; true once the dump is done. A message that
    /// overruns its datagram, or an error message too short to hold its
    /// errno, is an error, never read past.
    fn take(&mut self, buf: &[u8]) -> io::Result<bool> {
        let truncated = || io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message");
        let mut off = 0;
        while buf.len().saturating_sub(off) >= NLMSG_HEADER {
            let len = u32_at(buf, off) as usize;
            let t = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            let flags = u16::from_ne_bytes([buf[off + 6], buf[off + 7]]);
            if len < NLMSG_HEADER || len > buf.len() - off {
                return Err(truncated());
            }
            self.interrupted |= flags & NLM_F_DUMP_INTR != 0;
            match t {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    if len < NLMSG_HEADER + 4 {
                        return Err(truncated());
                    }
                    let errno = i32::from_ne_bytes(u32_at(buf, off + NLMSG_HEADER).to_ne_bytes());
                    if errno != 0 {
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                }
                _ => {
                    self.bytes += len;
                    if self.bytes > DUMP_LIMIT {
                        return Err(io::Error::new(
                            io::ErrorKind::OutOfMemory,
                            format!("an rtnetlink dump larger than {} MiB", DUMP_LIMIT >> 20),
                        ));
                    }
                    self.messages
                        .push((t, buf[off + NLMSG_HEADER..off + len].to_vec()))
                }
            }
            off += (len + 3) & !3;
        }
        Ok(false)
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// The attributes (type, payload) that follow a fixed header.
fn attributes(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if b.len().saturating_sub(off) < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[off], b[off + 1]]) as usize;
        let t = u16::from_ne_bytes([b[off + 2], b[off + 3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() - off {
            return None;
        }
        let payload = &b[off + 4..off + len];
        off += (len + 3) & !3;
        Some((t, payload))
    })
}

fn attr_u32(p: &[u8]) -> u32 {
    if p.len() >= 4 { u32_at(p, 0) } else { 0 }
}

fn attr_str(p: &[u8]) -> String {
    let end = p.iter().position(|&c| c == 0).unwrap_or(p.len());
    String::from_utf8_lossy(&p[..end]).into_owned()
}

/// An RTM_NEWLINK body: struct ifinfomsg (16 bytes), then attributes.
fn parse_link(body: &[u8]) -> Option<Link> {
    if body.len() < 16 {
        return None;
    }
    let mut l = Link {
        index: u32_at(body, 4),
        ..Link::default()
    };
    for (t, p) in attributes(&body[16..]) {
        match t {
            IFLA_ADDRESS => l.mac = <[u8; 6]>::try_from(p).ok(),
            IFLA_IFNAME => l.name = attr_str(p),
            IFLA_LINK => l.peer = attr_u32(p),
            IFLA_MASTER => l.master = attr_u32(p),
            IFLA_LINK_NETNSID if p.len() >= 4 => l.peer_netnsid = Some(u32_at(p, 0) as i32),
            IFLA_LINKINFO => {
                if let Some((_, k)) = attributes(p).find(|(t, _)| *t == IFLA_INFO_KIND) {
                    l.kind = attr_str(k);
                }
            }
            _ => {}
        }
    }
    Some(l)
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

    fn dump_message(t: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HEADER + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&t.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&[0; 8]);
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn a_dump_reply_is_read_within_its_bounds() {
        // Two messages, the second unpadded at the end of the datagram.
        let mut buf = dump_message(RTM_NEWLINK, 0, &[1, 2, 3, 4, 5, 6]);
        buf.extend_from_slice(&[0, 0]);
        buf.extend(dump_message(RTM_NEWLINK, 0, &[7]));
        let mut d = Dump::default();
        assert!(!d.take(&buf).unwrap());
        assert_eq!(d.messages.len(), 2);
        assert!(d.take(&dump_message(NLMSG_DONE, 0, &[0; 4])).unwrap());
        assert!(!d.interrupted);

        // A length past the datagram's end, or an error with no errno.
        let mut over = dump_message(RTM_NEWLINK, 0, &[1, 2, 3, 4]);
        over[0] = 200;
        assert!(Dump::default().take(&over).is_err());
        assert!(Dump::default().take(&dump_message(NLMSG_ERROR, 0, &[])).is_err());
        let errno = dump_message(NLMSG_ERROR, 0, &(-libc::EPERM).to_ne_bytes());
        assert_eq!(
            Dump::default().take(&errno).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );

        // The kernel marks a dump the table changed under: taken again.
        let mut d = Dump::default();
        d.take(&dump_message(RTM_NEWLINK, NLM_F_DUMP_INTR, &[1, 2, 3, 4]))
            .unwrap();
        assert!(d.interrupted);
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
