//! Which network namespace is a local pod's, found from what the pod cannot
//! choose: its record's selectors, the same ones that decide which callers
//! of the Workload API get its identity.
//!
//! - `k8s:pod-uid:UID`: the namespace the pod's processes are in. The
//!   kubelet puts every process of a pod in a cgroup named after the pod's
//!   UID, which the pod cannot leave; the agent, in the host's pid
//!   namespace (`hostPID`, as for attestation), finds them under /proc.
//! - `netns:NAME`: the namespace bind-mounted at `<netns_dir>/NAME`
//!   (standalone mode, where the operator names each workload's namespace).
//!
//! The answer is the id the node's namespace gives it (RTM_GETNSID), the
//! id a veth port of the node reports for its far end.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::netlink;
use crate::caller;

/// One selector that names a pod's network namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Home {
    /// `netns:NAME`.
    Netns(String),
    /// `k8s:pod-uid:UID`, normalised as the cgroup side is.
    Pod(String),
}

/// The selectors among `selectors` that name a namespace.
pub fn homes(selectors: &[String]) -> Vec<Home> {
    selectors
        .iter()
        .filter_map(|s| {
            if let Some(name) = s.strip_prefix("netns:") {
                Some(Home::Netns(name.to_owned()))
            } else {
                s.strip_prefix("k8s:pod-uid:")
                    .map(|uid| Home::Pod(caller::normalise_pod_uid(uid)))
            }
        })
        .collect()
}

/// The node's processes by pod UID, from a walk of `/proc` kept for a
/// while: the walk reads every process's cgroup, so it is not taken again
/// for every scan (a pod can make the node scan often, see
/// `DatapathConfig::min_scan_gap`).
#[derive(Debug, Default)]
pub struct Processes {
    walked: Option<(Instant, Result<ByPod, String>)>,
}

/// Pids by pod UID.
type ByPod = HashMap<String, Vec<i32>>;

/// A walk is taken again once it is this old...
const WALK_TTL: Duration = Duration::from_secs(1);
/// ... or, when a pod UID is not in it, this old (a pod just made).
const WALK_MIN_GAP: Duration = Duration::from_millis(50);
/// At most this many processes of one pod are looked at, lowest pids
/// first (the sandbox's, started first): a pod that forks without end
/// costs the agent no more than this.
const PIDS_PER_POD: usize = 64;

impl Processes {
    fn of(&mut self, proc_root: &Path, uid: &str) -> Result<Vec<i32>, String> {
        let stale = match &self.walked {
            None => true,
            Some((at, Ok(pods))) if !pods.contains_key(uid) => at.elapsed() >= WALK_MIN_GAP,
            Some((at, _)) => at.elapsed() >= WALK_TTL,
        };
        if stale {
            self.walked = Some((Instant::now(), walk(proc_root)));
        }
        let pods = match &self.walked {
            Some((_, r)) => r.as_ref().map_err(Clone::clone)?,
            None => unreachable!("walked above"),
        };
        if pods.is_empty() {
            return Err(format!(
                "no process under {} is in any pod's cgroup: the agent needs the host's pid namespace \
                 (hostPID) to find pods' network namespaces",
                proc_root.display()
            ));
        }
        let mut pids = pods.get(uid).cloned().unwrap_or_default();
        pids.sort_unstable();
        pids.truncate(PIDS_PER_POD);
        Ok(pids)
    }
}

/// Finds namespaces for one scan.
#[derive(Debug)]
pub struct Resolver<'a> {
    proc_root: &'a Path,
    netns_dir: &'a Path,
    processes: &'a mut Processes,
}

impl<'a> Resolver<'a> {
    pub fn new(proc_root: &'a Path, netns_dir: &'a Path, processes: &'a mut Processes) -> Self {
        Resolver {
            proc_root,
            netns_dir,
            processes,
        }
    }

    /// The ids, in the calling thread's namespace, of the namespaces that
    /// all of `homes` name: for a pod UID, every namespace its processes
    /// are in (a pod's processes need not share one: a runtime's monitor in
    /// the pod's cgroup may sit in the node's, a workload may make its
    /// own), each of them the pod's. Namespaces with no id (nothing joins
    /// them to the node's: the node's own, one being made) are left out;
    /// empty when none is found yet. An error says why the pod cannot be
    /// tied to any.
    pub fn nsids(&mut self, homes: &[Home]) -> Result<Vec<i32>, String> {
        if homes.is_empty() {
            return Err(
                "its record has no netns: or k8s:pod-uid: selector, so nothing names its network namespace"
                    .into(),
            );
        }
        let mut common: Option<Vec<i32>> = None;
        for home in homes {
            let files = match home {
                Home::Netns(name) => self.named(name)?.into_iter().collect(),
                Home::Pod(uid) => self.of_pod(uid)?,
            };
            let mut ids = Vec::new();
            for file in files {
                if let Some(id) = netlink::nsid_of(file.as_fd())
                    .map_err(|e| format!("asking the node for a namespace's id: {e}"))?
                {
                    ids.push(id);
                }
            }
            common = Some(match common {
                None => ids,
                Some(mut c) => {
                    let (before, found) = (c.len(), !ids.is_empty());
                    c.retain(|id| ids.contains(id));
                    if c.is_empty() && before > 0 && found {
                        return Err("its selectors name different network namespaces".into());
                    }
                    c
                }
            });
        }
        Ok(common.unwrap_or_default())
    }

    fn named(&self, name: &str) -> Result<Option<File>, String> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(format!(
                "netns:{name} does not name a namespace under {}",
                self.netns_dir.display()
            ));
        }
        let path = self.netns_dir.join(name);
        match File::open(&path) {
            Ok(file) => Ok(Some(file)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("opening {}: {e}", path.display())),
        }
    }

    /// The namespaces the processes of pod `uid` are in, one file each. A
    /// pid found in the walk may have exited and its number gone to another
    /// process since: each pid is pinned (pidfd) before its cgroup is read
    /// and its namespace opened, and kept only if the pinned process is
    /// the pod's and still alive after both reads, so they were of it.
    fn of_pod(&mut self, uid: &str) -> Result<Vec<File>, String> {
        let pids = self.processes.of(self.proc_root, uid)?;
        let mut found: HashMap<(u64, u64), File> = HashMap::new();
        for pid in pids {
            let pinned = match caller::PinnedProcess::open(pid) {
                Ok(p) => p,
                // Gone since the walk.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
                Err(e) => return Err(format!("pinning process {pid} of pod {uid} (pidfd_open): {e}")),
            };
            let dir = self.proc_root.join(pid.to_string());
            if pod_of(&dir).as_deref() != Some(uid) {
                continue;
            }
            let Ok(file) = File::open(dir.join("ns/net")) else {
                continue;
            };
            let Ok(meta) = file.metadata() else { continue };
            if pinned.is_alive() {
                found.entry((meta.dev(), meta.ino())).or_insert(file);
            }
        }
        Ok(found.into_values().collect())
    }
}

fn pod_of(proc_dir: &Path) -> Option<String> {
    fs::read_to_string(proc_dir.join("cgroup"))
        .ok()
        .and_then(|c| caller::pod_uid_from_cgroup(&c))
}

/// Every process under `proc_root` that belongs to a pod, by pod UID.
fn walk(proc_root: &Path) -> Result<ByPod, String> {
    let entries = fs::read_dir(proc_root)
        .map_err(|e| format!("listing processes under {}: {e}", proc_root.display()))?;
    let mut pods: HashMap<String, Vec<i32>> = HashMap::new();
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if let Some(uid) = pod_of(&entry.path()) {
            pods.entry(uid).or_default().push(pid);
        }
    }
    Ok(pods)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const UID: &str = "1b2c3d4e-5f60-7a8b-9c0d-e1f2a3b4c5d6";

    #[test]
    fn the_selectors_that_name_a_namespace() {
        let s: Vec<String> = [
            "unix:uid:0",
            "netns:blue",
            "k8s:pod-uid:1B2C3D4E_5F60_7A8B_9C0D_E1F2A3B4C5D6",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(homes(&s), vec![Home::Netns("blue".into()), Home::Pod(UID.into())]);
        assert!(homes(&["unix:uid:0".to_string()]).is_empty());
    }

    fn fixture() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "keyway-podns-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        for (pid, cgroup) in [
            ("10", format!("12:pids:/kubepods/besteffort/pod{UID}/abc\n")),
            ("11", "12:pids:/system.slice/sshd.service\n".to_string()),
        ] {
            fs::create_dir_all(dir.join(pid).join("ns")).unwrap();
            fs::write(dir.join(pid).join("cgroup"), cgroup).unwrap();
        }
        dir
    }

    #[test]
    fn a_pod_is_found_by_the_uid_in_its_processes_cgroup() {
        let root = fixture();
        let pods = walk(&root).unwrap();
        assert_eq!(pods.get(UID), Some(&vec![10]));
        assert_eq!(pods.len(), 1, "a process outside any pod is nobody's");
        // pid 10 of the fixture is not a live process of that pod: nothing
        // found (yet).
        let mut processes = Processes::default();
        let mut r = Resolver::new(&root, Path::new("/nonexistent"), &mut processes);
        assert_eq!(r.nsids(&[Home::Pod(UID.into())]), Ok(vec![]));
        assert_eq!(r.nsids(&[Home::Netns("absent".into())]), Ok(vec![]));
        fs::remove_dir_all(&root).unwrap();
        // No process in any pod's cgroup at all: the agent cannot see the
        // node's processes, and says so.
        let empty = std::env::temp_dir().join(format!("keyway-podns-empty-{}", std::process::id()));
        fs::create_dir_all(&empty).unwrap();
        let mut processes = Processes::default();
        let mut r = Resolver::new(&empty, Path::new("/nonexistent"), &mut processes);
        assert!(r.nsids(&[Home::Pod(UID.into())]).unwrap_err().contains("hostPID"));
        fs::remove_dir_all(&empty).unwrap();
    }

    #[test]
    fn a_pod_with_no_namespace_selector_or_a_path_for_a_name_is_unbound() {
        let mut processes = Processes::default();
        let mut r = Resolver::new(Path::new("/proc"), Path::new("/var/run/netns"), &mut processes);
        assert!(
            r.nsids(&[])
                .unwrap_err()
                .contains("no netns: or k8s:pod-uid: selector")
        );
        for name in ["../../proc/1/ns/net", "..", ""] {
            let err = r.nsids(&[Home::Netns(name.into())]).unwrap_err();
            assert!(err.contains("does not name a namespace"), "{name}: {err}");
        }
    }
}
