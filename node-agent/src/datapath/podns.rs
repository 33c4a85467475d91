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

/// Finds namespaces for one scan. Processes are listed at most once per
/// scan, and only when a pod named by UID has to be found.
#[derive(Debug)]
pub struct Resolver<'a> {
    proc_root: &'a Path,
    netns_dir: &'a Path,
    /// Pod UID -> pids of its processes, from one walk of `proc_root`.
    pods: Option<Result<HashMap<String, Vec<i32>>, String>>,
}

impl<'a> Resolver<'a> {
    pub fn new(proc_root: &'a Path, netns_dir: &'a Path) -> Self {
        Resolver {
            proc_root,
            netns_dir,
            pods: None,
        }
    }

    /// The id, in the calling thread's namespace, of the one namespace all
    /// of `homes` name; `Ok(None)` when there is none yet (no such named
    /// namespace, no process of the pod) or it has no id (nothing joins it
    /// to the node's yet): a pod being made. An error says why the pod
    /// cannot be tied to one.
    pub fn nsid(&mut self, homes: &[Home]) -> Result<Option<i32>, String> {
        if homes.is_empty() {
            return Err(
                "its record has no netns: or k8s:pod-uid: selector, so nothing names its network namespace"
                    .into(),
            );
        }
        let mut chosen: Option<OpenNs> = None;
        for home in homes {
            let found = match home {
                Home::Netns(name) => self.named(name)?,
                Home::Pod(uid) => self.of_pod(uid)?,
            };
            let Some((key, file)) = found else { return Ok(None) };
            match &chosen {
                Some((k, _)) if *k != key => {
                    return Err("its selectors name different network namespaces".into());
                }
                Some(_) => {}
                None => chosen = Some((key, file)),
            }
        }
        let (_, file) = chosen.expect("homes is not empty");
        netlink::nsid_of(file.as_fd()).map_err(|e| format!("asking the node for its namespace's id: {e}"))
    }

    fn named(&self, name: &str) -> Result<Option<OpenNs>, String> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(format!(
                "netns:{name} does not name a namespace under {}",
                self.netns_dir.display()
            ));
        }
        let path = self.netns_dir.join(name);
        match open_ns(&path) {
            Ok(found) => Ok(Some(found)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("opening {}: {e}", path.display())),
        }
    }

    /// The namespace the processes of pod `uid` are in. A pid found in the
    /// walk may have exited and its number gone to another process by the
    /// time its namespace is opened: its cgroup is read again after the
    /// open, so the namespace is kept only if the pid still is the pod's.
    fn of_pod(&mut self, uid: &str) -> Result<Option<OpenNs>, String> {
        let proc_root = self.proc_root;
        let pods = self
            .pods
            .get_or_insert_with(|| walk(proc_root))
            .as_ref()
            .map_err(Clone::clone)?;
        let pids = pods.get(uid).map(Vec::as_slice).unwrap_or_default();
        let mut found: Option<OpenNs> = None;
        for pid in pids {
            let dir = proc_root.join(pid.to_string());
            let Ok(opened) = open_ns(&dir.join("ns/net")) else {
                continue;
            };
            if pod_of(&dir).as_deref() != Some(uid) {
                continue;
            }
            match &found {
                Some((k, _)) if *k != opened.0 => {
                    return Err(format!(
                        "the processes of pod {uid} are in several network namespaces"
                    ));
                }
                Some(_) => {}
                None => found = Some(opened),
            }
        }
        Ok(found)
    }
}

/// A namespace file opened, with its identity (device, inode).
type OpenNs = ((u64, u64), File);

fn open_ns(path: &Path) -> std::io::Result<OpenNs> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    Ok(((meta.dev(), meta.ino()), file))
}

fn pod_of(proc_dir: &Path) -> Option<String> {
    fs::read_to_string(proc_dir.join("cgroup"))
        .ok()
        .and_then(|c| caller::pod_uid_from_cgroup(&c))
}

/// Every process under `proc_root` that belongs to a pod, by pod UID.
fn walk(proc_root: &Path) -> Result<HashMap<String, Vec<i32>>, String> {
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
        // pid 10 has no namespace file to open: no namespace found (yet).
        let mut r = Resolver::new(&root, Path::new("/nonexistent"));
        assert_eq!(r.nsid(&[Home::Pod(UID.into())]), Ok(None));
        assert_eq!(r.nsid(&[Home::Netns("absent".into())]), Ok(None));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_pod_with_no_namespace_selector_or_a_path_for_a_name_is_unbound() {
        let mut r = Resolver::new(Path::new("/proc"), Path::new("/var/run/netns"));
        assert!(
            r.nsid(&[])
                .unwrap_err()
                .contains("no netns: or k8s:pod-uid: selector")
        );
        for name in ["../../proc/1/ns/net", "..", ""] {
            let err = r.nsid(&[Home::Netns(name.into())]).unwrap_err();
            assert!(err.contains("does not name a namespace"), "{name}: {err}");
        }
    }
}
