//! Privileged test topology: network namespaces, veth pairs and routes made
//! with iproute2, the way a routing CNI plugin (Calico-style) leaves a node:
//! each pod has a /32 on `eth0` and a default route to 169.254.1.1 on the
//! link; the node routes each pod's /32 to the pod's host-side veth. Every
//! namespace and pin directory is removed by name when the topology drops,
//! including when a test fails.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Runs `ip` (or any command) and panics with its stderr on failure.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails (never skips) when the privileged tests cannot run here.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code, reason = "geteuid has no std equivalent")]
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the privileged tests need root (network namespaces, veth pairs, BPF programs); \
         CI runs as root. Run `sudo make test`."
    );
}

/// Runs `f` on a thread that has entered network namespace `ns`. Sockets
/// made there stay in that namespace wherever they are used afterwards.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        enter_netns(&path);
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_netns(path: &str) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    use std::os::fd::AsRawFd;
    // SAFETY: a valid namespace fd; setns only changes this thread's namespace.
    #[allow(unsafe_code, reason = "setns has no std equivalent")]
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A short unique tag for names (interface names are at most 15 bytes).
pub fn unique_tag() -> String {
    format!(
        "{}{}",
        std::process::id() % 10000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    /// The host-side veth, in the node namespace.
    pub host_if: String,
    pub ip: Ipv4Addr,
}

/// One node namespace with pods behind veths, and an optional "remote"
/// namespace routed through the node (a peer on another node, as far as
/// this node's datapath can tell).
#[derive(Debug)]
pub struct Topology {
    pub tag: String,
    pub node: String,
    pub pods: Vec<Pod>,
    pub remote: Option<Pod>,
    pub pin_dir: PathBuf,
    namespaces: Vec<String>,
}

impl Topology {
    pub fn new() -> Topology {
        require_root();
        let tag = unique_tag();
        let node = format!("kw{tag}n");
        let t = Topology {
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/keyway-test-{tag}")),
            namespaces: vec![node.clone()],
            node,
            tag,
            pods: Vec::new(),
            remote: None,
        };
        run("ip", &["netns", "add", &t.node]);
        run("ip", &["-n", &t.node, "link", "set", "lo", "up"]);
        sysctl(&t.node, "net.ipv4.ip_forward", "1");
        sysctl(&t.node, "net.ipv6.conf.all.disable_ipv6", "1");
        sysctl(&t.node, "net.ipv6.conf.default.disable_ipv6", "1");
        t
    }

    fn add_ns(&mut self, name: &str) {
        run("ip", &["netns", "add", name]);
        self.namespaces.push(name.to_string());
        run("ip", &["-n", name, "link", "set", "lo", "up"]);
        sysctl(name, "net.ipv6.conf.all.disable_ipv6", "1");
        sysctl(name, "net.ipv6.conf.default.disable_ipv6", "1");
    }

    /// A pod on this node: its namespace, a veth pair, its address and routes.
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> Pod {
        let netns = format!("kw{}{name}", self.tag);
        let host_if = format!("kw{}{name}", self.tag);
        self.add_ns(&netns);
        let node = self.node.clone();
        run(
            "ip",
            &[
                "-n", &node, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        );
        run("ip", &["-n", &node, "link", "set", &host_if, "up"]);
        run(
            "ip",
            &["-n", &netns, "addr", "add", &format!("{ip}/32"), "dev", "eth0"],
        );
        run("ip", &["-n", &netns, "link", "set", "eth0", "up"]);
        run(
            "ip",
            &[
                "-n",
                &netns,
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ],
        );
        run(
            "ip",
            &[
                "-n",
                &netns,
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ],
        );
        let host_mac = mac(&node, &host_if);
        let pod_mac = mac(&netns, "eth0");
        run(
            "ip",
            &[
                "-n",
                &netns,
                "neigh",
                "replace",
                "169.254.1.1",
                "lladdr",
                &host_mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        );
        run(
            "ip",
            &["-n", &node, "route", "add", &format!("{ip}/32"), "dev", &host_if],
        );
        run(
            "ip",
            &[
                "-n",
                &node,
                "neigh",
                "replace",
                &ip.to_string(),
                "lladdr",
                &pod_mac,
                "dev",
                &host_if,
                "nud",
                "permanent",
            ],
        );
        let pod = Pod {
            name: name.to_string(),
            netns,
            host_if,
            ip,
        };
        self.pods.push(pod.clone());
        pod
    }

    /// A peer outside this node, behind a plain veth (no programs on it):
    /// the node reaches it at `ip` through 10.201.9.254/24.
    pub fn add_remote(&mut self, ip: Ipv4Addr) -> Pod {
        let netns = format!("kw{}r", self.tag);
        let host_if = format!("kw{}u", self.tag);
        self.add_ns(&netns);
        let node = self.node.clone();
        run(
            "ip",
            &[
                "-n", &node, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        );
        run(
            "ip",
            &["-n", &node, "addr", "add", "10.201.9.254/24", "dev", &host_if],
        );
        run("ip", &["-n", &node, "link", "set", &host_if, "up"]);
        run(
            "ip",
            &["-n", &netns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        );
        run("ip", &["-n", &netns, "link", "set", "eth0", "up"]);
        run(
            "ip",
            &["-n", &netns, "route", "add", "default", "via", "10.201.9.254"],
        );
        let pod = Pod {
            name: "remote".into(),
            netns,
            host_if,
            ip,
        };
        self.remote = Some(pod.clone());
        pod
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).expect("pod exists")
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Pods first (their veths go with them), the node last.
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = node_agent::datapath::uninstall(&self.pin_dir);
    }
}

pub fn sysctl(ns: &str, key: &str, value: &str) {
    run(
        "ip",
        &["netns", "exec", ns, "sysctl", "-qw", &format!("{key}={value}")],
    );
}

fn mac(ns: &str, iface: &str) -> String {
    let out = run("ip", &["-n", ns, "-o", "link", "show", iface]);
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC for {iface} in {ns}: {out}"))
        .to_string()
}

/// `ping -c 1` from a namespace; true when a reply came back within `wait_s`.
pub fn ping(ns: &str, ip: Ipv4Addr, wait_s: u32) -> bool {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "ping",
            "-c",
            "1",
            "-W",
            &wait_s.to_string(),
            &ip.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
