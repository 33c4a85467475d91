//! Who is calling the Workload API, learned without asking the caller.
//!
//! SPIFFE requires the Workload API to identify callers out of band (EP-10): a
//! workload cannot be trusted to say who it is. The unix socket gives the peer's
//! pid and uid (SO_PEERCRED, via tokio's `UnixStream::peer_cred`); from the pid we
//! find the network namespace the caller lives in and, on Kubernetes, the pod it
//! belongs to. Workload documents then select callers with `selectors`.
//!
//! Everything here is best effort and never fails: a fact we cannot establish is
//! `None`, and a `None` never matches a selector, so an unknown caller gets no
//! identity rather than a wrong one.

use std::collections::BTreeSet;
use std::fs;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What the agent learns about a caller without the caller's help.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Caller {
    pub pid: Option<i32>,
    pub uid: u32,
    /// Name of the namespace under the netns directory whose inode equals the caller's network namespace.
    pub netns: Option<String>,
    /// Kubernetes pod UID from the caller's cgroup, dashes normalised.
    pub pod_uid: Option<String>,
}

/// The process at the other end of a Workload API connection, pinned by a
/// pidfd so that "is it still there" is asked of that process and never of
/// whoever got its pid number later.
///
/// A pid is a name the kernel hands out again once its process has exited
/// and been reaped. A connection outlives its maker when it is inherited by
/// a child, so reading `/proc/<pid>` for a connection is only sound while
/// the process that connected still exists: the agent identifies the
/// caller once, at accept, checks that the process was alive after the
/// reads (so they were of it), and refuses every later call on the
/// connection once that process is gone.
#[derive(Debug)]
pub struct PinnedProcess {
    pid: i32,
    pidfd: OwnedFd,
}

impl PinnedProcess {
    /// The peer of a connected unix socket. `SO_PEERPIDFD` (Linux 6.5+)
    /// names the very process that called connect(2); on older kernels the
    /// pid from SO_PEERCRED is opened with pidfd_open(2), which leaves the
    /// window between connect and accept (the peer would have to exit and
    /// its pid be reused in between).
    pub fn of_peer(socket: BorrowedFd<'_>, pid: i32) -> std::io::Result<Self> {
        let pidfd = match peer_pidfd(socket) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => pidfd_open(pid)?,
            Err(e) => return Err(e),
        };
        Ok(Self { pid, pidfd })
    }

    /// Process `pid`, whichever it is now (pidfd_open(2)): facts read about
    /// `pid` afterwards are of this process if it is still alive after the
    /// reads, since its pid cannot name another one until it is reaped.
    pub fn open(pid: i32) -> std::io::Result<Self> {
        Ok(Self {
            pid,
            pidfd: pidfd_open(pid)?,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// True while the process exists (a zombie still does: its pid cannot
    /// be reused until it is reaped).
    pub fn is_alive(&self) -> bool {
        pidfd_signal_zero(&self.pidfd)
    }
}

#[allow(unsafe_code, reason = "getsockopt(SO_PEERPIDFD) has no std equivalent")]
fn peer_pidfd(socket: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    /// From linux/socket.h (6.5); not in every libc release yet.
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if fd < 0 {
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[allow(unsafe_code, reason = "pidfd_open(2) has no std equivalent")]
fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

#[allow(unsafe_code, reason = "pidfd_send_signal(2) has no std equivalent")]
fn pidfd_signal_zero(pidfd: &OwnedFd) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be
    // signalled; no siginfo is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    // EPERM means it exists but we may not signal it (not root): alive.
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Identifies the caller behind `process` and proves the reads were of it:
/// `None` when the process is gone by the end, because then its pid may
/// already name another process whose facts we read.
pub fn identify_pinned(
    process: &PinnedProcess,
    uid: u32,
    proc_root: &Path,
    netns_dir: &Path,
) -> Option<Caller> {
    let caller = identify(Some(process.pid), uid, proc_root, netns_dir);
    process.is_alive().then_some(caller)
}

/// Builds a Caller from peer credentials: reads /proc/<pid>/ns/net (stat, following the nsfs link,
/// comparing (dev, ino)) against every entry of `netns_dir` (default /var/run/netns), and
/// /proc/<pid>/cgroup for the pod UID. `proc_root` lets tests point at a fixture directory instead of
/// /proc.
///
/// The pid is only a hint about the caller at the moment it connected: a process that exits can have
/// its pid reused, so callers of this function should identify once per connection, as early as
/// possible. A missing or non-positive pid (the peer sits in a pid namespace we cannot see) leaves
/// everything but the uid unknown.
pub fn identify(pid: Option<i32>, uid: u32, proc_root: &Path, netns_dir: &Path) -> Caller {
    let Some(pid) = pid.filter(|pid| *pid > 0) else {
        return Caller {
            pid,
            uid,
            netns: None,
            pod_uid: None,
        };
    };
    let proc_dir = proc_root.join(pid.to_string());
    let netns = netns_name(&proc_dir.join("ns").join("net"), netns_dir);
    let pod_uid = match fs::read_to_string(proc_dir.join("cgroup")) {
        Ok(contents) => pod_uid_from_cgroup(&contents),
        Err(error) => {
            tracing::debug!(pid, %error, "cannot read caller cgroup");
            None
        }
    };
    Caller {
        pid: Some(pid),
        uid,
        netns,
        pod_uid,
    }
}

/// The netns name whose (dev, ino) equals that of `ns_path`, if any. Entries that cannot be stat'ed
/// are skipped.
///
/// `ip netns add` keeps a namespace alive by bind-mounting its nsfs file under the netns directory,
/// so the (dev, ino) pair is the namespace's identity, while names are only labels. When several
/// names point at one namespace the lexicographically smallest wins, so the answer does not depend
/// on directory order.
pub fn netns_name(ns_path: &Path, netns_dir: &Path) -> Option<String> {
    let target = match fs::metadata(ns_path) {
        Ok(meta) => (meta.dev(), meta.ino()),
        Err(error) => {
            tracing::debug!(path = %ns_path.display(), %error, "cannot stat caller network namespace");
            return None;
        }
    };
    let entries = match fs::read_dir(netns_dir) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::debug!(dir = %netns_dir.display(), %error, "cannot list network namespaces");
            return None;
        }
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| fs::metadata(entry.path()).is_ok_and(|meta| (meta.dev(), meta.ino()) == target))
        .filter_map(|entry| entry.file_name().into_string().ok())
        .min()
}

/// Pod UID from /proc/<pid>/cgroup contents, because on Kubernetes the pod, not the process, carries
/// the identity (pod -> service account), and the kubelet writes the pod UID into every container's
/// cgroup path. The layout differs by cgroup version, cgroup driver (cgroupfs `pod<uid>` or systemd
/// `kubepods-<qos>-pod<uid>.slice` with underscores), QoS class (guaranteed pods have no QoS level)
/// and runtime (containerd, CRI-O, Docker scopes), so segments are recognised by their `pod` prefix
/// rather than by position. The result is normalised (`-`, lowercase) and must have the 8-4-4-4-12
/// hex shape of a UUID, so a malformed path never yields something that could match a selector.
///
/// A `kubepods` ancestor is deliberately not required: when the agent runs in its own cgroup
/// namespace, other pods' paths start with `/..` and the ancestors above the namespace root are not
/// shown. If the file names more than one distinct pod (nested clusters), the answer is ambiguous and
/// we return None rather than guess, because this UID decides which identity is issued.
pub fn pod_uid_from_cgroup(contents: &str) -> Option<String> {
    let found: BTreeSet<String> = contents
        .lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .flat_map(|path| path.split(['/', ':']))
        .filter_map(pod_uid_from_segment)
        .collect();
    let mut found = found.into_iter();
    match (found.next(), found.next()) {
        (Some(uid), None) => Some(uid),
        _ => None,
    }
}

/// One cgroup path segment: `pod<uid>` (cgroupfs driver) or `<parents>-pod<uid>.slice` (systemd
/// driver, where systemd forbids dashes inside a name component so the UID uses underscores).
fn pod_uid_from_segment(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".slice").unwrap_or(segment);
    let candidate = match name.strip_prefix("pod") {
        Some(rest) => rest,
        None => name.rsplit_once("-pod")?.1,
    };
    let uid = normalise_pod_uid(candidate);
    is_uuid(&uid).then_some(uid)
}

pub(crate) fn normalise_pod_uid(uid: &str) -> String {
    uid.replace('_', "-").to_ascii_lowercase()
}

/// 8-4-4-4-12 hex digits.
fn is_uuid(s: &str) -> bool {
    const GROUPS: [usize; 5] = [8, 4, 4, 4, 12];
    let mut groups = s.split('-');
    GROUPS.iter().all(|len| {
        groups
            .next()
            .is_some_and(|g| g.len() == *len && g.bytes().all(|b| b.is_ascii_hexdigit()))
    }) && groups.next().is_none()
}

/// True when every selector matches, as in SPIRE: each selector narrows the set of callers, so adding
/// one can only take an identity away, never hand it to more processes. `netns:NAME` matches
/// caller.netns == Some(NAME); `unix:uid:N` matches caller.uid == N; `k8s:pod-uid:UID` matches
/// caller.pod_uid. An empty list matches nobody, and an unknown selector never matches, so a Workload
/// that carries one gives its identity to nobody on this agent.
///
/// Unknown or malformed selectors are not rejected here so that a document written for a newer agent
/// fails closed on this one instead of failing to load. Pod UIDs compare after the same normalisation
/// as the cgroup side, since a UUID's case and separator carry no meaning.
pub fn matches(selectors: &[String], caller: &Caller) -> bool {
    !selectors.is_empty()
        && selectors
            .iter()
            .all(|selector| selector_matches(selector, caller))
}

fn selector_matches(selector: &str, caller: &Caller) -> bool {
    if let Some(name) = selector.strip_prefix("netns:") {
        caller.netns.as_deref() == Some(name)
    } else if let Some(uid) = selector.strip_prefix("unix:uid:") {
        !uid.is_empty() && uid.bytes().all(|b| b.is_ascii_digit()) && uid.parse() == Ok(caller.uid)
    } else if let Some(uid) = selector.strip_prefix("k8s:pod-uid:") {
        caller
            .pod_uid
            .as_deref()
            .is_some_and(|pod_uid| pod_uid == normalise_pod_uid(uid))
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD_UID: &str = "1b2c3d4e-5f60-7a8b-9c0d-e1f2a3b4c5d6";
    const CONTAINER: &str = "4f8c2d1e9a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d";

    /// cgroup v2, systemd driver, containerd, burstable QoS.
    const V2_SYSTEMD_BURSTABLE: &str = "0::/kubepods.slice/kubepods-burstable.slice/\
        kubepods-burstable-pod1b2c3d4e_5f60_7a8b_9c0d_e1f2a3b4c5d6.slice/\
        cri-containerd-4f8c2d1e9a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d.scope\n";

    /// cgroup v2, systemd driver, CRI-O, besteffort QoS.
    const V2_SYSTEMD_BESTEFFORT_CRIO: &str = "0::/kubepods.slice/kubepods-besteffort.slice/\
        kubepods-besteffort-pod1b2c3d4e_5f60_7a8b_9c0d_e1f2a3b4c5d6.slice/\
        crio-4f8c2d1e9a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d.scope\n";

    /// cgroup v2, systemd driver, Docker (cri-dockerd), guaranteed QoS: no QoS slice.
    const V2_SYSTEMD_GUARANTEED_DOCKER: &str = "0::/kubepods.slice/\
        kubepods-pod1b2c3d4e_5f60_7a8b_9c0d_e1f2a3b4c5d6.slice/\
        docker-4f8c2d1e9a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d.scope\n";

    /// cgroup v2 seen from inside the agent's own cgroup namespace (kind: kubelet cgroup root /kubelet).
    const V2_CGROUPNS_KIND: &str = "0::/../../kubelet-kubepods-besteffort.slice/\
        kubelet-kubepods-besteffort-pod1b2c3d4e_5f60_7a8b_9c0d_e1f2a3b4c5d6.slice/\
        cri-containerd-4f8c2d1e9a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d.scope\n";

    /// cgroup v1, cgroupfs driver, Docker, burstable QoS (a whole file, controllers in kernel order).
    const V1_CGROUPFS_BURSTABLE: &str = "\
12:hugetlb:/kubepods/burstable/pod1b2c3d4e-5f60-7a8b-9c0d-e1f2a3b4c5d6/4f8c2d1e9a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d
11:memory:/kubepods/burstable/pod1b2c3d4e-5f60-7a8b-9c0d-e1f2a3b4c5d6/4f8c2d1e9a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d
10:cpu,cpuacct:/kubepods/burstable/pod1b2c3d4e-5f60-7a8b-9c0d-e1f2a3b4c5d6/4f8c2d1e9a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d
9:pids:/kubepods/burstable/pod1b2c3d4e-5f60-7a8b-9c0d-e1f2a3b4c5d6/4f8c2d1e9a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d
1:name=systemd:/kubepods/burstable/pod1b2c3d4e-5f60-7a8b-9c0d-e1f2a3b4c5d6/4f8c2d1e9a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d
0::/
";

    /// cgroup v1, cgroupfs driver, guaranteed QoS: the pod sits directly under kubepods.
    const V1_CGROUPFS_GUARANTEED: &str = "\
4:memory:/kubepods/pod1b2c3d4e-5f60-7a8b-9c0d-e1f2a3b4c5d6/4f8c2d1e9a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d
";

    /// cgroup v1, cgroupfs driver, CRI-O, besteffort QoS.
    const V1_CGROUPFS_BESTEFFORT_CRIO: &str = "\
4:memory:/kubepods/besteffort/pod1b2c3d4e-5f60-7a8b-9c0d-e1f2a3b4c5d6/crio-4f8c2d1e9a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d
";

    /// cgroup v1, systemd driver, older containerd: the container id follows colons.
    const V1_SYSTEMD_CONTAINERD_COLONS: &str = "\
5:memory:/system.slice/containerd.service/kubepods-burstable-pod1b2c3d4e_5f60_7a8b_9c0d_e1f2a3b4c5d6.slice:cri-containerd:4f8c2d1e9a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d
";

    /// A desktop process: a systemd user slice, with a UUID that is not a pod UID.
    const SYSTEMD_USER_SLICE: &str = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/\
        app-org.gnome.Terminal.slice/vte-spawn-0c8b9a3e-2d1f-4e5a-9b6c-7d8e9f0a1b2c.scope\n";

    /// A plain Docker container outside Kubernetes, and a podman one.
    const DOCKER_NOT_K8S: &str = "0::/system.slice/\
        docker-4f8c2d1e9a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d.scope\n";
    const PODMAN_NOT_K8S: &str = "0::/user.slice/user-1000.slice/user@1000.service/user.slice/\
        libpod-4f8c2d1e9a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d.scope\n";

    /// A pod segment that is not a UUID (truncated, and with a non-hex digit).
    const MALFORMED_POD: &str = "\
0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_5f60_7a8b_9c0d.slice/x.scope
11:memory:/kubepods/burstable/pod1b2c3d4e-5f60-7a8b-9c0d-e1f2a3b4c5dg/4f8c
";

    /// Two different pods in one file (nested clusters): ambiguous.
    const TWO_PODS: &str = "0::/kubepods.slice/kubepods-pod1b2c3d4e_5f60_7a8b_9c0d_e1f2a3b4c5d6.slice/\
        cri-containerd-aa.scope/kubelet.slice/kubelet-kubepods.slice/\
        kubelet-kubepods-pod99999999_5f60_7a8b_9c0d_e1f2a3b4c5d6.slice/cri-containerd-bb.scope\n";

    #[test]
    fn pod_uid_from_every_kubernetes_cgroup_layout() {
        for (name, contents) in [
            ("v2 systemd burstable", V2_SYSTEMD_BURSTABLE),
            ("v2 systemd besteffort crio", V2_SYSTEMD_BESTEFFORT_CRIO),
            ("v2 systemd guaranteed docker", V2_SYSTEMD_GUARANTEED_DOCKER),
            ("v2 cgroup namespace kind", V2_CGROUPNS_KIND),
            ("v1 cgroupfs burstable", V1_CGROUPFS_BURSTABLE),
            ("v1 cgroupfs guaranteed", V1_CGROUPFS_GUARANTEED),
            ("v1 cgroupfs besteffort crio", V1_CGROUPFS_BESTEFFORT_CRIO),
            ("v1 systemd containerd colons", V1_SYSTEMD_CONTAINERD_COLONS),
        ] {
            assert!(
                contents.contains(CONTAINER),
                "{name}: fixture lost its container id"
            );
            assert_eq!(pod_uid_from_cgroup(contents).as_deref(), Some(POD_UID), "{name}");
        }
    }

    #[test]
    fn pod_uid_is_lowercased() {
        let upper = V1_CGROUPFS_GUARANTEED.replace("e1f2a3b4c5d6", "E1F2A3B4C5D6");
        assert_eq!(pod_uid_from_cgroup(&upper).as_deref(), Some(POD_UID));
    }

    #[test]
    fn no_pod_uid_outside_kubernetes_or_when_malformed() {
        for (name, contents) in [
            ("systemd user slice", SYSTEMD_USER_SLICE),
            ("docker outside kubernetes", DOCKER_NOT_K8S),
            ("podman", PODMAN_NOT_K8S),
            ("malformed pod segment", MALFORMED_POD),
            ("two pods", TWO_PODS),
            ("root cgroup", "0::/\n"),
            ("empty", ""),
            ("not a cgroup file", "hello\nworld"),
        ] {
            assert_eq!(pod_uid_from_cgroup(contents), None, "{name}");
        }
    }

    fn caller() -> Caller {
        Caller {
            pid: Some(42),
            uid: 1000,
            netns: Some("blue".to_owned()),
            pod_uid: Some(POD_UID.to_owned()),
        }
    }

    fn selectors(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn selectors_match_the_callers_facts() {
        let caller = caller();
        assert!(matches(&selectors(&["netns:blue"]), &caller));
        assert!(matches(&selectors(&["unix:uid:1000"]), &caller));
        assert!(matches(&selectors(&[&format!("k8s:pod-uid:{POD_UID}")]), &caller));
        assert!(matches(
            &selectors(&["k8s:pod-uid:1B2C3D4E_5F60_7A8B_9C0D_E1F2A3B4C5D6"]),
            &caller
        ));
        // Every selector must match (SPIRE's rule): each one narrows.
        assert!(matches(&selectors(&["netns:blue", "unix:uid:1000"]), &caller));
        assert!(matches(
            &selectors(&["netns:blue", "unix:uid:1000", &format!("k8s:pod-uid:{POD_UID}")]),
            &caller
        ));
    }

    /// The README's example, `["netns:frontend", "unix:uid:1000"]`, used to hand frontend's SVID to
    /// any uid-1000 process in any namespace, because one matching selector was enough.
    #[test]
    fn all_selectors_must_match_not_just_one() {
        let caller = caller();
        for list in [
            &["netns:red", "unix:uid:1000"][..],
            &["netns:blue", "unix:uid:7"],
            &["netns:red", "unix:uid:7", "unix:uid:1000"],
            &[
                "netns:blue",
                "unix:uid:1000",
                "k8s:pod-uid:00000000-0000-0000-0000-000000000000",
            ],
            &["netns:blue", "unix:uid:1000", "spiffe:unknown-kind"],
        ] {
            assert!(!matches(&selectors(list), &caller), "{list:?}");
        }
    }

    #[test]
    fn selectors_that_do_not_match() {
        let caller = caller();
        for selector in [
            "netns:red",
            "netns:",
            "netns:blue2",
            "unix:uid:0",
            "unix:uid:+1000",
            "unix:uid:1000 ",
            "unix:uid:",
            "unix:uid:99999999999",
            "k8s:pod-uid:00000000-0000-0000-0000-000000000000",
            "k8s:pod-uid:",
            "unix:gid:1000",
            "spiffe:blue",
            "blue",
            "",
        ] {
            assert!(!matches(&selectors(&[selector]), &caller), "{selector:?}");
        }
        assert!(!matches(&[], &caller));
    }

    #[test]
    fn unknown_facts_never_match() {
        let unknown = Caller {
            pid: None,
            uid: 1000,
            netns: None,
            pod_uid: None,
        };
        assert!(!matches(
            &selectors(&["netns:", "netns:blue", "k8s:pod-uid:"]),
            &unknown
        ));
        assert!(matches(&selectors(&["unix:uid:1000"]), &unknown));
    }

    #[test]
    fn netns_name_finds_the_entry_with_the_same_inode() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ns = dir.path().join("caller-ns");
        fs::write(&ns, "").expect("write ns file");
        let netns_dir = dir.path().join("netns");
        fs::create_dir(&netns_dir).expect("netns dir");
        fs::write(netns_dir.join("other"), "").expect("unrelated file");
        fs::hard_link(&ns, netns_dir.join("blue")).expect("hard link");
        fs::create_dir(netns_dir.join("a-directory")).expect("subdir");
        std::os::unix::fs::symlink(dir.path().join("missing"), netns_dir.join("dangling"))
            .expect("dangling symlink");

        assert_eq!(netns_name(&ns, &netns_dir).as_deref(), Some("blue"));

        fs::hard_link(&ns, netns_dir.join("azure")).expect("second hard link");
        assert_eq!(
            netns_name(&ns, &netns_dir).as_deref(),
            Some("azure"),
            "smallest name wins"
        );
    }

    #[test]
    fn netns_name_is_none_without_a_match() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ns = dir.path().join("caller-ns");
        fs::write(&ns, "").expect("write ns file");
        let netns_dir = dir.path().join("netns");
        fs::create_dir(&netns_dir).expect("netns dir");
        fs::write(netns_dir.join("other"), "").expect("unrelated file");

        assert_eq!(netns_name(&ns, &netns_dir), None);
        assert_eq!(netns_name(&ns, &dir.path().join("no-such-dir")), None);
        assert_eq!(netns_name(&dir.path().join("no-such-ns"), &netns_dir), None);
    }

    #[test]
    fn identify_reads_a_fixture_proc_root() {
        let dir = tempfile::tempdir().expect("temp dir");
        let proc_root = dir.path().join("proc");
        let ns_dir = proc_root.join("4242").join("ns");
        fs::create_dir_all(&ns_dir).expect("ns dir");
        fs::write(ns_dir.join("net"), "").expect("ns file");
        fs::write(proc_root.join("4242").join("cgroup"), V1_CGROUPFS_BURSTABLE).expect("cgroup");
        let netns_dir = dir.path().join("netns");
        fs::create_dir(&netns_dir).expect("netns dir");
        fs::write(netns_dir.join("other"), "").expect("unrelated file");
        fs::hard_link(ns_dir.join("net"), netns_dir.join("blue")).expect("hard link");

        let caller = identify(Some(4242), 1000, &proc_root, &netns_dir);
        assert_eq!(
            caller,
            Caller {
                pid: Some(4242),
                uid: 1000,
                netns: Some("blue".to_owned()),
                pod_uid: Some(POD_UID.to_owned()),
            }
        );
        assert!(matches(&selectors(&["netns:blue"]), &caller));

        let gone = identify(Some(4343), 1000, &proc_root, &netns_dir);
        assert_eq!(
            gone,
            Caller {
                pid: Some(4343),
                uid: 1000,
                netns: None,
                pod_uid: None
            }
        );

        for pid in [None, Some(0), Some(-1)] {
            let unknown = identify(pid, 1000, &proc_root, &netns_dir);
            assert_eq!(
                unknown,
                Caller {
                    pid,
                    uid: 1000,
                    netns: None,
                    pod_uid: None
                }
            );
        }
    }

    #[test]
    fn a_pinned_process_is_alive_until_it_exits_even_if_its_pid_is_reused() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        // A socketpair's peer is this process; pin the child by pid instead.
        let pinned = PinnedProcess {
            pid,
            pidfd: pidfd_open(pid).expect("pidfd_open"),
        };
        drop(a);
        assert!(pinned.is_alive());
        assert!(identify_pinned(&pinned, 0, Path::new("/proc"), Path::new("/nonexistent")).is_some());
        child.kill().expect("kill");
        child.wait().expect("reap");
        assert!(
            !pinned.is_alive(),
            "reaped: whatever has this pid now is another process"
        );
        assert!(identify_pinned(&pinned, 0, Path::new("/proc"), Path::new("/nonexistent")).is_none());
    }

    #[test]
    fn the_peer_pidfd_names_the_connecting_process() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let _client = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let me = i32::try_from(std::process::id()).expect("pid");
        let pinned = PinnedProcess::of_peer(std::os::fd::AsFd::as_fd(&server), me).expect("pin");
        assert_eq!(pinned.pid(), me);
        assert!(pinned.is_alive());
    }

    #[test]
    fn identify_against_the_real_proc() {
        let pid = i32::try_from(std::process::id()).expect("pid fits in i32");
        let dir = tempfile::tempdir().expect("temp dir");
        fs::write(dir.path().join("other"), "").expect("unrelated file");

        let caller = identify(Some(pid), 0, Path::new("/proc"), dir.path());
        assert_eq!(caller.pid, Some(pid));
        assert_eq!(caller.netns, None);

        // A link to our own nsfs file resolves to the namespace's (dev, ino), as a bind mount does.
        let own_ns = Path::new("/proc").join(pid.to_string()).join("ns").join("net");
        if fs::metadata(&own_ns).is_ok() {
            std::os::unix::fs::symlink(&own_ns, dir.path().join("self")).expect("symlink");
            let caller = identify(Some(pid), 0, Path::new("/proc"), dir.path());
            assert_eq!(caller.netns.as_deref(), Some("self"));
        }
    }
}
