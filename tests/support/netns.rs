//! Privileged test topology: network namespaces, veth pairs and routes made
//! with iproute2, the way a routing CNI plugin (Calico-style) leaves a node:
//! each pod has a /32 on `eth0` and a default route to 169.254.1.1 on the
//! link; the node routes each pod's /32 to the pod's host-side veth. Pods
//! are dual-stack: each also has the /128 [`v6_of`] its IPv4 address, with a
//! default route to the link-local fe80::1 on the host-side veth, and
//! neighbours found by real neighbour discovery. Every namespace and pin
//! directory is removed by name when the topology drops, including when a
//! test fails.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

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

/// The IPv6 address of a dual-stack pod whose IPv4 address is `ip`:
/// `fd00::a:b:c:d` for a.b.c.d, so an IPv4 /24 is an IPv6 /112.
pub fn v6_of(ip: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d] = ip.octets();
    Ipv6Addr::new(0xfd00, 0, 0, 0, a.into(), b.into(), c.into(), d.into())
}

/// The IPv6 prefix length that covers what IPv4 prefix `len` (a multiple
/// of 8) covers, under [`v6_of`].
pub fn v6_prefix(len: u8) -> u8 {
    64 + 2 * len
}

/// The family a dual-stack test runs its traffic in. Pods and the state
/// are dual-stack either way (each pod has both addresses, one identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fam {
    V4,
    V6,
}

impl Fam {
    /// The pod whose IPv4 address is `v4`'s address in this family.
    pub fn ip(self, v4: Ipv4Addr) -> IpAddr {
        match self {
            Fam::V4 => IpAddr::V4(v4),
            Fam::V6 => IpAddr::V6(v6_of(v4)),
        }
    }

    /// The IPv4 prefix `v4/len`, or the IPv6 one covering the same pods.
    pub fn cidr(self, v4: Ipv4Addr, len: u8) -> String {
        match self {
            Fam::V4 => format!("{v4}/{len}"),
            Fam::V6 => format!("{}/{}", v6_of(v4), v6_prefix(len)),
        }
    }

    /// `pod`'s address in this family.
    pub fn of(self, pod: &Pod) -> IpAddr {
        pod.addr(self == Fam::V6)
    }

    /// The sysctl that turns the node's routing on and off.
    pub fn forwarding(self) -> &'static str {
        match self {
            Fam::V4 => "net.ipv4.ip_forward",
            Fam::V6 => "net.ipv6.conf.all.forwarding",
        }
    }
}

/// `#[test]`s `name::ipv4` and `name::ipv6` for each `fn name(fam: Fam)`:
/// every assertion made for IPv4 is also made for IPv6.
#[macro_export]
macro_rules! dual_stack {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn ipv4() {
                super::$name($crate::netns::Fam::V4)
            }

            #[test]
            fn ipv6() {
                super::$name($crate::netns::Fam::V6)
            }
        }
    )*};
}

/// IPv6 on in namespace `ns`, with duplicate address detection off (so an
/// address is usable the moment it is added; nothing here can collide).
fn enable_ipv6(ns: &str) {
    for conf in ["all", "default"] {
        sysctl(ns, &format!("net.ipv6.conf.{conf}.disable_ipv6"), "0");
        sysctl(ns, &format!("net.ipv6.conf.{conf}.accept_dad"), "0");
    }
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
    /// [`v6_of`] `ip`, when the pod is dual-stack.
    pub ip6: Option<Ipv6Addr>,
}

impl Pod {
    /// The pod's IPv6 address when `v6`, else its IPv4 one.
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.ip6.expect("a dual-stack pod"))
        } else {
            IpAddr::V4(self.ip)
        }
    }
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
        enable_ipv6(&t.node);
        sysctl(&t.node, "net.ipv6.conf.all.forwarding", "1");
        t
    }

    fn add_ns(&mut self, name: &str) {
        run("ip", &["netns", "add", name]);
        self.namespaces.push(name.to_string());
        run("ip", &["-n", name, "link", "set", "lo", "up"]);
        enable_ipv6(name);
    }

    /// A pod on this node: its namespace, a veth pair, its address and routes.
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> Pod {
        self.add_pod_namespace(name);
        self.plug_pod(name, ip)
    }

    /// The first half of `add_pod`: the pod's namespace, with nothing in it.
    pub fn add_pod_namespace(&mut self, name: &str) {
        let netns = format!("kw{}{name}", self.tag);
        self.add_ns(&netns);
    }

    /// The second half of `add_pod`, what a CNI plugin does: from creating
    /// the veth pair to the node's route to the pod.
    pub fn plug_pod(&mut self, name: &str, ip: Ipv4Addr) -> Pod {
        let netns = format!("kw{}{name}", self.tag);
        let pod = plug_pod(&self.node, &self.tag, name, netns, ip);
        self.pods.push(pod.clone());
        pod
    }

    /// A Linux bridge in the node namespace, as Debian's `bridge` CNI plugin
    /// leaves it with `isGateway: true`: it holds the pods' gateway address
    /// (`gateway_cidr`, e.g. `10.201.0.254/24`, and its [`v6_of`] in the
    /// matching IPv6 prefix), so the pods' whole subnet is routed to the
    /// bridge, not to any pod's veth. Returns its name.
    pub fn add_bridge(&mut self, gateway_cidr: &str) -> String {
        let bridge = format!("kw{}br", self.tag);
        run(
            "ip",
            &["-n", &self.node, "link", "add", &bridge, "type", "bridge"],
        );
        run(
            "ip",
            &["-n", &self.node, "addr", "add", gateway_cidr, "dev", &bridge],
        );
        // The same gateway and subnet in IPv6, for dual-stack pods.
        let (gw, len) = gateway_cidr.split_once('/').expect("a CIDR");
        let gw6 = v6_of(gw.parse().expect("an IPv4 gateway"));
        let len6 = v6_prefix(len.parse().expect("a prefix length"));
        run(
            "ip",
            &[
                "-n",
                &self.node,
                "addr",
                "add",
                &format!("{gw6}/{len6}"),
                "dev",
                &bridge,
            ],
        );
        run("ip", &["-n", &self.node, "link", "set", &bridge, "up"]);
        bridge
    }

    /// A pod on `bridge`, plumbed in the order the bridge plugin uses: the
    /// veth pair, its host end made a port of the bridge and up, the pod's
    /// end up (the last change the node's namespace hears of), then inside
    /// the pod its address (`ip/prefix`) and the default route via
    /// `gateway`.
    pub fn add_bridged_pod(
        &mut self,
        bridge: &str,
        name: &str,
        ip: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
    ) -> Pod {
        self.add_pod_namespace(name);
        self.plug_bridged_pod(bridge, name, ip, prefix, gateway)
    }

    /// The second half of `add_bridged_pod`, what the bridge plugin does.
    pub fn plug_bridged_pod(
        &mut self,
        bridge: &str,
        name: &str,
        ip: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
    ) -> Pod {
        let netns = format!("kw{}{name}", self.tag);
        let host_if = format!("kw{}{name}", self.tag);
        let node = self.node.clone();
        run(
            "ip",
            &[
                "-n", &node, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        );
        run("ip", &["-n", &node, "link", "set", &host_if, "master", bridge]);
        run("ip", &["-n", &node, "link", "set", &host_if, "up"]);
        run("ip", &["-n", &netns, "link", "set", "eth0", "up"]);
        run(
            "ip",
            &[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{ip}/{prefix}"),
                "dev",
                "eth0",
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
                &gateway.to_string(),
            ],
        );
        let pod = Pod {
            name: name.to_string(),
            netns,
            host_if,
            ip,
            ip6: None,
        };
        self.pods.push(pod.clone());
        pod
    }

    /// [`Topology::add_bridged_pod`], dual-stack: the pod also gets
    /// [`v6_of`] `ip` in the IPv6 prefix that covers what `prefix` covers,
    /// and a default route via [`v6_of`] `gateway` (which
    /// [`Topology::add_bridge`] puts on the bridge too).
    pub fn add_dual_stack_bridged_pod(
        &mut self,
        bridge: &str,
        name: &str,
        ip: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
    ) -> Pod {
        let mut pod = self.add_bridged_pod(bridge, name, ip, prefix, gateway);
        let ip6 = v6_of(ip);
        run(
            "ip",
            &[
                "-n",
                &pod.netns,
                "addr",
                "add",
                &format!("{ip6}/{}", v6_prefix(prefix)),
                "dev",
                "eth0",
            ],
        );
        run(
            "ip",
            &[
                "-n",
                &pod.netns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &v6_of(gateway).to_string(),
            ],
        );
        pod.ip6 = Some(ip6);
        if let Some(p) = self.pods.iter_mut().find(|p| p.name == name) {
            p.ip6 = Some(ip6);
        }
        pod
    }

    /// The name of pod `name`'s namespace (made or not yet), as a `netns:`
    /// selector names it.
    pub fn pod_netns(&self, name: &str) -> String {
        format!("kw{}{name}", self.tag)
    }

    /// A process of pod `name` as the kubelet leaves one: in the pod's
    /// namespace, in a cgroup named after the pod's UID (`pod<uid>`, the
    /// cgroupfs driver's layout, under the v1 `pids` hierarchy). Returns
    /// once the process is in both. Killed, and its cgroup removed, on drop.
    pub fn pod_process(&self, name: &str, uid: &str) -> PodProcess {
        self.process_in(&self.pod_netns(name), uid)
    }

    /// A process in pod `uid`'s cgroup but in namespace `netns`, as a
    /// runtime's monitor (CRI-O's conmon with `conmon_cgroup = "pod"`) sits
    /// in the node's.
    pub fn process_in(&self, netns: &str, uid: &str) -> PodProcess {
        let parent = PathBuf::from(format!("/sys/fs/cgroup/pids/keyway-test-{}", self.tag));
        let cgroup = parent.join(format!("pod{uid}"));
        std::fs::create_dir_all(&cgroup).expect("make the pod's cgroup");
        // `ip netns exec` gives the command a mount namespace of its own,
        // with /sys remounted: the cgroup is joined from here, once the
        // shell (in the pod's namespace by then) has said its pid.
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "sh",
                "-c",
                "echo $$ && exec sleep infinity",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the pod's process");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("piped")),
            &mut line,
        )
        .expect("read from the pod's process");
        assert_eq!(
            line.trim(),
            child.id().to_string(),
            "ip netns exec runs the shell in its own process"
        );
        std::fs::write(cgroup.join("cgroup.procs"), line.trim())
            .expect("move the pod's process into its cgroup");
        PodProcess {
            child,
            cgroups: vec![cgroup, parent],
        }
    }

    /// What a CNI DEL does to a pod's plumbing: its host-side veth is
    /// deleted (the pod's end goes with it). The namespace stays.
    pub fn unplug_pod(&mut self, name: &str) {
        let i = self.pods.iter().position(|p| p.name == name).expect("pod exists");
        let pod = self.pods.remove(i);
        run("ip", &["-n", &self.node, "link", "del", &pod.host_if]);
    }

    /// A peer outside this node, behind a plain veth (no programs on it):
    /// the node reaches it at `ip` through 10.201.9.254/24, and at
    /// [`v6_of`] `ip` through fd00::a:c9:9:fe/112.
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
        let gw6 = v6_of(Ipv4Addr::new(10, 201, 9, 254));
        let ip6 = v6_of(ip);
        run(
            "ip",
            &["-n", &node, "addr", "add", &format!("{gw6}/112"), "dev", &host_if],
        );
        run(
            "ip",
            &["-n", &netns, "addr", "add", &format!("{ip6}/112"), "dev", "eth0"],
        );
        run(
            "ip",
            &[
                "-n",
                &netns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gw6.to_string(),
            ],
        );
        let pod = Pod {
            name: "remote".into(),
            netns,
            host_if,
            ip,
            ip6: Some(ip6),
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

/// A process standing in for a pod's (see [`Topology::pod_process`]).
#[derive(Debug)]
pub struct PodProcess {
    child: std::process::Child,
    cgroups: Vec<PathBuf>,
}

impl PodProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for dir in &self.cgroups {
            let _ = std::fs::remove_dir(dir);
        }
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

/// Wires pod namespace `netns` to node namespace `node` the way a routing
/// CNI plugin does: a veth pair, the pod's /32 on `eth0`, a default route to
/// 169.254.1.1 on the link, and on the node a /32 route to the host-side veth
/// (static neighbours both ways, so no ARP races). IPv6 likewise: the pod's
/// /128 ([`v6_of`]), a default route to fe80::1 (the host-side veth's), a
/// /128 route on the node; neighbours found by neighbour discovery, which
/// the datapath must let through.
fn plug_pod(node: &str, tag: &str, name: &str, netns: String, ip: Ipv4Addr) -> Pod {
    let host_if = format!("kw{tag}{name}");
    run(
        "ip",
        &[
            "-n", node, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ],
    );
    run("ip", &["-n", node, "link", "set", &host_if, "up"]);
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
    let host_mac = mac(node, &host_if);
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
        &["-n", node, "route", "add", &format!("{ip}/32"), "dev", &host_if],
    );
    run(
        "ip",
        &[
            "-n",
            node,
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
    let ip6 = v6_of(ip);
    run("ip", &["-n", node, "addr", "add", "fe80::1/64", "dev", &host_if]);
    run(
        "ip",
        &["-n", &netns, "addr", "add", &format!("{ip6}/128"), "dev", "eth0"],
    );
    run(
        "ip",
        &[
            "-n", &netns, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
        ],
    );
    run(
        "ip",
        &[
            "-n",
            node,
            "-6",
            "route",
            "add",
            &format!("{ip6}/128"),
            "dev",
            &host_if,
        ],
    );
    Pod {
        name: name.to_string(),
        netns,
        host_if,
        ip,
        ip6: Some(ip6),
    }
}

pub fn sysctl(ns: &str, key: &str, value: &str) {
    run(
        "ip",
        &["netns", "exec", ns, "sysctl", "-qw", &format!("{key}={value}")],
    );
}

pub fn mac(ns: &str, iface: &str) -> String {
    let out = run("ip", &["-n", ns, "-o", "link", "show", iface]);
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC for {iface} in {ns}: {out}"))
        .to_string()
}

/// `ping -c 1` from a namespace; true when a reply came back within `wait_s`.
pub fn ping(ns: &str, ip: impl Into<IpAddr>, wait_s: u32) -> bool {
    let ip: IpAddr = ip.into();
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

/// One node of a [`Cluster`]: its namespace, underlay address and pin dir.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub netns: String,
    /// The node's address on the underlay (what its agent advertises).
    pub ip: Ipv4Addr,
    pub pin_dir: PathBuf,
    /// The /24 its pods get addresses from (10.201.<n>.0/24).
    pub pod_cidr_octet: u8,
}

/// Several nodes on one kernel: each node is a network namespace with its
/// pods behind veths (as [`Topology`] makes them), and the nodes are joined
/// by an underlay bridge-less mesh of veth pairs (10.202.0.<n>/24 through a
/// hub namespace), with routes to each other's pod CIDRs. Everything is
/// removed by name on drop.
#[derive(Debug)]
pub struct Cluster {
    pub tag: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<(usize, Pod)>,
    namespaces: Vec<String>,
}

impl Cluster {
    /// `names.len()` nodes; node i (from 1) has underlay 10.202.0.i and pods
    /// in 10.201.i.0/24.
    pub fn new(names: &[&str]) -> Cluster {
        require_root();
        let tag = unique_tag();
        let hub = format!("kw{tag}h");
        let mut c = Cluster {
            tag: tag.clone(),
            nodes: Vec::new(),
            pods: Vec::new(),
            namespaces: Vec::new(),
        };
        c.add_ns(&hub);
        run("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        run("ip", &["-n", &hub, "link", "set", "br0", "up"]);
        for (i, name) in names.iter().enumerate() {
            let n = (i + 1) as u8;
            let netns = format!("kw{tag}n{n}");
            c.add_ns(&netns);
            sysctl(&netns, "net.ipv4.ip_forward", "1");
            sysctl(&netns, "net.ipv6.conf.all.forwarding", "1");
            let up = format!("kw{tag}u{n}");
            run(
                "ip",
                &[
                    "-n", &hub, "link", "add", &up, "type", "veth", "peer", "name", "eth0", "netns", &netns,
                ],
            );
            run("ip", &["-n", &hub, "link", "set", &up, "master", "br0", "up"]);
            let ip = Ipv4Addr::new(10, 202, 0, n);
            run(
                "ip",
                &["-n", &netns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
            );
            run(
                "ip",
                &[
                    "-n",
                    &netns,
                    "addr",
                    "add",
                    &format!("{}/112", v6_of(ip)),
                    "dev",
                    "eth0",
                ],
            );
            run("ip", &["-n", &netns, "link", "set", "eth0", "up"]);
            c.nodes.push(Node {
                name: name.to_string(),
                netns,
                ip,
                pin_dir: PathBuf::from(format!("/sys/fs/bpf/keyway-test-{tag}-{n}")),
                pod_cidr_octet: n,
            });
        }
        for a in &c.nodes {
            for b in c.nodes.iter().filter(|b| b.name != a.name) {
                run(
                    "ip",
                    &[
                        "-n",
                        &a.netns,
                        "route",
                        "add",
                        &format!("10.201.{}.0/24", b.pod_cidr_octet),
                        "via",
                        &b.ip.to_string(),
                    ],
                );
                let pods6 = v6_of(Ipv4Addr::new(10, 201, b.pod_cidr_octet, 0));
                run(
                    "ip",
                    &[
                        "-n",
                        &a.netns,
                        "-6",
                        "route",
                        "add",
                        &format!("{pods6}/112"),
                        "via",
                        &v6_of(b.ip).to_string(),
                    ],
                );
            }
        }
        c
    }

    fn add_ns(&mut self, name: &str) {
        run("ip", &["netns", "add", name]);
        self.namespaces.push(name.to_string());
        run("ip", &["-n", name, "link", "set", "lo", "up"]);
        enable_ipv6(name);
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).expect("node exists")
    }

    /// A pod on node `node`, address 10.201.<node>.<host>.
    pub fn add_pod(&mut self, node: &str, name: &str, host: u8) -> Pod {
        let idx = self
            .nodes
            .iter()
            .position(|n| n.name == node)
            .expect("node exists");
        let n = self.nodes[idx].clone();
        let ip = Ipv4Addr::new(10, 201, n.pod_cidr_octet, host);
        let netns = format!("kw{}{name}", self.tag);
        self.add_ns(&netns);
        let pod = plug_pod(&n.netns, &self.tag, name, netns, ip);
        self.pods.push((idx, pod.clone()));
        pod
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for n in &self.nodes {
            let _ = node_agent::datapath::uninstall(&n.pin_dir);
        }
    }
}

/// A Workload document with an explicit `app` label (so two workloads can
/// share one, or a workload can share none with its name).
pub fn labelled_workload(name: &str, sa: &str, app: &str, node: &str, ip: Ipv4Addr) -> String {
    // Dual-stack, as the cluster's pods are.
    crate::workload_yaml(name, sa, node, &ip.to_string())
        .replace(&format!("app: {name}"), &format!("app: {app}"))
        .replace(
            &format!("ips: [\"{ip}\"]"),
            &format!("ips: [\"{ip}\", \"{}\"]", v6_of(ip)),
        )
}

/// True once `node`'s agent has pinned both programs' links for `pod`'s
/// veth (the datapath attaches on its own schedule, independent of auth).
pub fn attached(node: &Node, pod: &Pod) -> bool {
    std::fs::read_dir(node.pin_dir.join("links"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("{}@", pod.host_if))
                })
                .count()
                == 2
        })
        .unwrap_or(false)
}

/// The real control plane on the first node's underlay address with `docs`
/// applied, and the real agent on every node, joined with a token each.
/// Dropped in field order: agents, then the control plane, then the files.
#[allow(missing_debug_implementations, reason = "test harness")]
pub struct Deployment {
    pub agents: Vec<AgentProcess>,
    pub cp: crate::Binary,
    pub bundle: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn deploy(&self, cp_flags: &[&str], docs: &[String]) -> Deployment {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = &self.nodes[0];
        let listen = format!("{}:18081", first.ip);
        let cp = crate::Binary::spawn_in_netns_on(&first.netns, &listen, &dir.path().join("cp"), cp_flags);
        let bundle = dir.path().join("bundle.pem");
        std::fs::write(&bundle, cp.ok(&["bundle", "show"])).expect("bundle");
        let file = dir.path().join("docs.yaml");
        std::fs::write(&file, docs.join("---\n")).expect("docs");
        cp.ok(&["apply", "-f", file.to_str().expect("utf-8 path")]);
        let agents = self
            .nodes
            .iter()
            .map(|n| {
                let token = cp.ok(&["token", "create", "--node", &n.name]).trim().to_string();
                AgentProcess::spawn(
                    &n.netns,
                    &listen,
                    &n.name,
                    &bundle,
                    dir.path(),
                    &n.pin_dir,
                    Some(&token),
                    &[],
                )
            })
            .collect();
        Deployment {
            agents,
            cp,
            bundle,
            dir,
        }
    }
}

/// The real `node-agent run --datapath` inside a node's network namespace
/// (entered with nsenter: only the network namespace, so the host's BPF
/// filesystem and the sockets' directory are shared). Killed on drop.
#[derive(Debug)]
pub struct AgentProcess {
    pub child: std::process::Child,
    pub admin_socket: PathBuf,
    pub socket: PathBuf,
    netns: String,
}

/// Where each agent serves `/metrics`, on the loopback of its node's
/// network namespace.
pub const AGENT_METRICS: &str = "127.0.0.1:9091";

impl AgentProcess {
    /// `dir` holds the agent's data dir and sockets (named after `node`).
    #[allow(clippy::too_many_arguments, reason = "a test harness mirroring the CLI")]
    pub fn spawn(
        netns: &str,
        server: &str,
        node: &str,
        bundle: &std::path::Path,
        dir: &std::path::Path,
        pin_dir: &std::path::Path,
        token: Option<&str>,
        extra: &[&str],
    ) -> AgentProcess {
        let admin_socket = dir.join(format!("{node}-admin.sock"));
        let socket = dir.join(format!("{node}.sock"));
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .arg(crate::bin("node-agent"))
            .args([
                "run",
                "--server",
                server,
                "--node-name",
                node,
                "--trust-domain",
                crate::TD,
            ])
            .arg("--trust-bundle")
            .arg(bundle)
            .arg("--data-dir")
            .arg(dir.join(format!("{node}-data")))
            .arg("--socket")
            .arg(&socket)
            .arg("--admin-socket")
            .arg(&admin_socket)
            .arg("--datapath")
            .arg("--bpf-pin-dir")
            .arg(pin_dir)
            .args(["--metrics-address", AGENT_METRICS])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("KEYWAY_TEST_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(std::process::Stdio::null());
        if let Some(t) = token {
            cmd.args(["--join-token", t]);
        }
        AgentProcess {
            child: cmd.spawn().expect("spawn node-agent"),
            admin_socket,
            socket,
            netns: netns.to_string(),
        }
    }

    /// GET `path` on the agent's metrics listener: (status, body); (0, "")
    /// while nothing answers.
    pub fn http_get(&self, path: &'static str) -> (u16, String) {
        in_netns(&self.netns, move || crate::http::get(AGENT_METRICS, path))
    }

    /// One scrape of the agent's `/metrics`.
    pub fn scrape(&self) -> String {
        let (status, body) = self.http_get("/metrics");
        assert_eq!(status, 200, "GET /metrics on the agent in {}", self.netns);
        body
    }

    /// `node-agent auth list -o json`: one JSON object per entry.
    pub fn auth_list(&self) -> Vec<serde_json::Value> {
        self.cli(&["auth", "list", "-o", "json"])
    }

    /// `node-agent observe -o json` with extra filters.
    pub fn observe(&self, filters: &[&str]) -> Vec<serde_json::Value> {
        let mut args = vec!["observe", "-o", "json"];
        args.extend_from_slice(filters);
        self.cli(&args)
    }

    fn cli(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let out = Command::new(crate::bin("node-agent"))
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .output()
            .expect("node-agent cli");
        if !out.status.success() {
            eprintln!(
                "node-agent {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// TCP segments retransmitted by a namespace's stack so far (from its
/// /proc/net/snmp), to prove a connection needed no retry.
pub fn tcp_retransmits(ns: &str) -> u64 {
    let snmp = run("ip", &["netns", "exec", ns, "cat", "/proc/net/snmp"]);
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        panic!("no Tcp lines in /proc/net/snmp of {ns}");
    };
    let idx = names
        .split_whitespace()
        .position(|n| n == "RetransSegs")
        .expect("RetransSegs column");
    values
        .split_whitespace()
        .nth(idx)
        .and_then(|v| v.parse().ok())
        .expect("a number")
}

/// A TCP echo server on `ip:port` inside namespace `ns`, serving until the
/// process ends.
pub fn tcp_echo(ns: &str, ip: impl Into<IpAddr>, port: u16) {
    use std::io::{Read, Write};
    let ip: IpAddr = ip.into();
    let listener = in_netns(ns, move || {
        std::net::TcpListener::bind((ip, port)).expect("bind echo server")
    });
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// A TCP connection from namespace `ns` to `ip:port` (reads time out after 3 s).
pub fn connect(
    ns: &str,
    ip: impl Into<IpAddr>,
    port: u16,
    timeout: std::time::Duration,
) -> std::io::Result<std::net::TcpStream> {
    let ip: IpAddr = ip.into();
    in_netns(ns, move || {
        let s = std::net::TcpStream::connect_timeout(&std::net::SocketAddr::from((ip, port)), timeout)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
        Ok(s)
    })
}

/// Sends `msg` and reads it back from an echo server.
pub fn echo_round_trip(s: &mut std::net::TcpStream, msg: &[u8]) -> bool {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; msg.len()];
    s.write_all(msg).is_ok() && s.read_exact(&mut buf).is_ok() && buf == msg
}

/// A packet to forge with [`send_forged`].
#[derive(Debug, Clone)]
pub enum Forged<'a> {
    Udp {
        src_port: u16,
        dst_port: u16,
        payload: &'a [u8],
    },
    TcpSyn {
        src_port: u16,
        dst_port: u16,
    },
}

/// The Internet checksum (RFC 1071) over `chunks`.
fn inet_checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for b in chunks.iter().flat_map(|c| c.iter()) {
        match odd.take() {
            None => odd = Some(*b),
            Some(hi) => sum += u32::from(u16::from_be_bytes([hi, *b])),
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends one IPv4 or IPv6 packet with source address `src` (whatever the
/// sender's own address is) from inside network namespace `ns`, through a
/// raw socket (what a pod with CAP_NET_RAW, in the default capability set,
/// can do). Checksums are correct, so a receiving stack would accept it.
pub fn send_forged(ns: &str, src: impl Into<IpAddr>, dst: impl Into<IpAddr>, packet: Forged<'_>) {
    let (src, dst): (IpAddr, IpAddr) = (src.into(), dst.into());
    let (proto, l4) = match packet {
        Forged::Udp {
            src_port,
            dst_port,
            payload,
        } => {
            let len = (8 + payload.len()) as u16;
            let mut h = Vec::with_capacity(len as usize);
            h.extend_from_slice(&src_port.to_be_bytes());
            h.extend_from_slice(&dst_port.to_be_bytes());
            h.extend_from_slice(&len.to_be_bytes());
            h.extend_from_slice(&[0, 0]);
            h.extend_from_slice(payload);
            (17u8, h)
        }
        Forged::TcpSyn { src_port, dst_port } => {
            let mut h = Vec::with_capacity(20);
            h.extend_from_slice(&src_port.to_be_bytes());
            h.extend_from_slice(&dst_port.to_be_bytes());
            h.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // seq
            h.extend_from_slice(&0u32.to_be_bytes()); // ack
            h.extend_from_slice(&[5 << 4, 0x02]); // data offset 5, SYN
            h.extend_from_slice(&64240u16.to_be_bytes()); // window
            h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            (6u8, h)
        }
    };
    let mut l4 = l4;
    let sum = l4_checksum(src, dst, proto, &l4);
    let at = if proto == 17 { 6 } else { 16 };
    l4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    let packet = match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut ip = ipv4_header(src, dst, proto, l4.len(), true);
            ip.extend_from_slice(&l4);
            ip
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let mut ip = ipv6_header(src, dst, proto, l4.len());
            ip.extend_from_slice(&l4);
            ip
        }
        _ => panic!("{src} and {dst} are of two families"),
    };
    send_raw(ns, dst, &packet);
}

/// The checksum of a UDP or TCP segment `l4` (its own checksum field zero)
/// over the family's pseudo-header.
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> u16 {
    let pseudo = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => [
            &s.octets()[..],
            &d.octets()[..],
            &[0, proto],
            &(l4.len() as u16).to_be_bytes(),
        ]
        .concat(),
        (IpAddr::V6(s), IpAddr::V6(d)) => [
            &s.octets()[..],
            &d.octets()[..],
            &(l4.len() as u32).to_be_bytes(),
            &[0, 0, 0, proto],
        ]
        .concat(),
        _ => panic!("{src} and {dst} are of two families"),
    };
    inet_checksum(&[&pseudo, l4])
}

/// An ICMP message of `(type, code)` from `src` to `dst`, sent from
/// namespace `ns`, quoting the headers of a UDP datagram `from` ->
/// `about`, as a router on the path sends an error (with
/// [`unreachable`]: IPv4 host unreachable, IPv6 address unreachable).
/// Checksums are correct.
pub fn send_icmp_error(
    ns: &str,
    src: IpAddr,
    dst: IpAddr,
    (ty, code): (u8, u8),
    from: (IpAddr, u16),
    about: (IpAddr, u16),
) {
    let mut udp = Vec::with_capacity(8);
    udp.extend_from_slice(&from.1.to_be_bytes());
    udp.extend_from_slice(&about.1.to_be_bytes());
    udp.extend_from_slice(&[0, 8, 0, 0]);
    let packet = match (src, dst, from.0, about.0) {
        (IpAddr::V4(src), IpAddr::V4(dst), IpAddr::V4(qs), IpAddr::V4(qd)) => {
            let mut icmp = vec![ty, code, 0, 0, 0, 0, 0, 0];
            icmp.extend_from_slice(&ipv4_header(qs, qd, 17, udp.len(), true));
            icmp.extend_from_slice(&udp);
            let sum = inet_checksum(&[&icmp]);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            let mut ip = ipv4_header(src, dst, 1, icmp.len(), false);
            ip.extend_from_slice(&icmp);
            ip
        }
        (IpAddr::V6(src), IpAddr::V6(dst), IpAddr::V6(qs), IpAddr::V6(qd)) => {
            let mut icmp = vec![ty, code, 0, 0, 0, 0, 0, 0];
            icmp.extend_from_slice(&ipv6_header(qs, qd, 17, udp.len()));
            icmp.extend_from_slice(&udp);
            ipv6_packet(src, dst, &[], 58, icmp, Some(2))
        }
        _ => panic!("an ICMP error and what it quotes are of one family"),
    };
    send_raw(ns, dst, &packet);
}

/// The types of an echo request and an echo reply in `ip`'s ICMP version.
pub fn echo_types(ip: IpAddr) -> (u8, u8) {
    if ip.is_ipv4() { (8, 0) } else { (128, 129) }
}

/// Sends one ICMP (ICMPv6) message of type `ty` from `src` to `dst` in
/// namespace `ns`, its identifier `id` (an echo's), its sequence 1.
pub fn send_icmp(ns: &str, src: IpAddr, dst: IpAddr, ty: u8, id: u16) {
    let mut icmp = vec![ty, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&[0, 1]);
    icmp.extend_from_slice(b"keyway echo");
    let packet = match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let sum = inet_checksum(&[&icmp]);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            let mut ip = ipv4_header(src, dst, 1, icmp.len(), false);
            ip.extend_from_slice(&icmp);
            ip
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => ipv6_packet(src, dst, &[], 58, icmp, Some(2)),
        _ => panic!("one family"),
    };
    send_raw(ns, dst, &packet);
}

/// A raw ICMP (ICMPv6, with `v6`) socket in namespace `ns`: it sees a copy
/// of every such message the namespace receives.
pub fn icmp_socket(ns: &str, v6: bool) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    in_netns(ns, move || {
        let (family, proto) = if v6 {
            (libc::AF_INET6, libc::IPPROTO_ICMPV6)
        } else {
            (libc::AF_INET, libc::IPPROTO_ICMP)
        };
        #[allow(unsafe_code, reason = "raw sockets have no std equivalent")]
        // SAFETY: a new descriptor, owned from here on.
        unsafe {
            let fd = libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto);
            assert!(fd >= 0, "raw ICMP socket: {}", std::io::Error::last_os_error());
            std::os::fd::OwnedFd::from_raw_fd(fd)
        }
    })
}

/// Whether an ICMP message of type `ty` with identifier `id` from `from`
/// reaches an [`icmp_socket`] within `wait`.
pub fn icmp_arrives(sock: &std::os::fd::OwnedFd, from: IpAddr, ty: u8, id: u16, wait: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + wait;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        #[allow(unsafe_code, reason = "raw sockets have no std equivalent")]
        // SAFETY: poll on one valid pollfd; recvfrom into buffers that
        // outlive the call, with their true sizes (all-zero bytes are a
        // valid sockaddr_storage).
        let (n, sa) = unsafe {
            let mut sa: libc::sockaddr_storage = std::mem::zeroed();
            if libc::poll(&mut pfd, 1, left.as_millis() as libc::c_int) <= 0 {
                return false;
            }
            let n = libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut sa as *mut libc::sockaddr_storage).cast(),
                &mut len,
            );
            (n, sa)
        };
        if n <= 0 {
            continue;
        }
        let msg = &buf[..n as usize];
        // IPv4 raw sockets deliver the IP header; IPv6 ones do not.
        let (src, icmp) = match from {
            IpAddr::V4(_) if msg.len() >= 20 => {
                let ihl = usize::from(msg[0] & 0x0f) * 4;
                let src = IpAddr::V4(Ipv4Addr::new(msg[12], msg[13], msg[14], msg[15]));
                (src, msg.get(ihl..).unwrap_or(&[]))
            }
            IpAddr::V6(_) => {
                #[allow(unsafe_code, reason = "reading the sockaddr recvfrom filled in")]
                // SAFETY: an AF_INET6 socket fills in a sockaddr_in6.
                let sin6 = unsafe { *(&sa as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
                (IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)), msg)
            }
            _ => continue,
        };
        if src == from && icmp.len() >= 8 && icmp[0] == ty && icmp[4..6] == id.to_be_bytes() {
            return true;
        }
    }
}

/// `(type, code)` of the destination unreachable [`send_icmp_error`] sends
/// to `dst`: host unreachable in IPv4, address unreachable in IPv6.
pub fn unreachable(dst: IpAddr) -> (u8, u8) {
    if dst.is_ipv4() { (3, 1) } else { (1, 3) }
}

/// A UDP socket in `ns`, bound to `local`:`port` and connected to `to`,
/// that sends without fragmenting (path MTU discovery, as TCP does) and
/// queues the ICMP errors about what it sends (`IP_RECVERR`), for
/// [`icmp_error`].
pub fn pmtu_socket(ns: &str, local: IpAddr, port: u16, to: std::net::SocketAddr) -> std::net::UdpSocket {
    use std::os::fd::AsRawFd;
    in_netns(ns, move || {
        let s = std::net::UdpSocket::bind((local, port)).expect("bind");
        s.connect(to).expect("connect");
        let (level, recverr, discover, always) = if local.is_ipv4() {
            (
                libc::IPPROTO_IP,
                libc::IP_RECVERR,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_DO,
            )
        } else {
            (
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVERR,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_DO,
            )
        };
        for (opt, v) in [(recverr, 1), (discover, always)] {
            let v: libc::c_int = v;
            #[allow(unsafe_code, reason = "IP_RECVERR and IP_MTU_DISCOVER have no std equivalent")]
            // SAFETY: a valid socket and an int option of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    level,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "setsockopt {opt}: {}", std::io::Error::last_os_error());
        }
        s
    })
}

/// The next ICMP error queued on a [`pmtu_socket`] within `wait` (none:
/// only one already queued): its type, code and info (the MTU, for
/// fragmentation needed and packet too big).
pub fn icmp_error(s: &std::net::UdpSocket, wait: Duration) -> Option<(u8, u8, u32)> {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let mut pfd = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    let mut data = [0u8; 2048];
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    #[allow(unsafe_code, reason = "the socket error queue has no std equivalent")]
    // SAFETY: poll on one valid pollfd; recvmsg into buffers that outlive
    // the call; the control messages walked are the ones it filled in.
    unsafe {
        let n = libc::poll(&mut pfd, 1, wait.as_millis() as libc::c_int);
        if n <= 0 || pfd.revents & libc::POLLERR == 0 {
            return None;
        }
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        let rc = libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT);
        assert!(
            rc >= 0,
            "reading the error queue: {}",
            std::io::Error::last_os_error()
        );
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let (level, ty) = ((*c).cmsg_level, (*c).cmsg_type);
            if (level, ty) == (libc::IPPROTO_IP, libc::IP_RECVERR)
                || (level, ty) == (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
            {
                let e: libc::sock_extended_err = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                return Some((e.ee_type, e.ee_code, e.ee_info));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    panic!("an error was queued with no IP_RECVERR message");
}

/// An IPv4 header without options (TTL 64, don't-fragment as `df` says)
/// for `payload_len` bytes of protocol `proto` after it, its checksum set.
pub fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload_len: usize, df: bool) -> Vec<u8> {
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, if df { 0x40 } else { 0 }, 0, 64, proto, 0, 0];
    ip[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = inet_checksum(&[&ip]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip
}

/// An IPv6 header (hop limit 64) for `payload_len` bytes after it, the
/// first of which is a header of type `next`.
pub fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload_len: usize) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(payload_len as u16).to_be_bytes());
    ip.extend_from_slice(&[next, 64]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip
}

/// Sends `packet`, a whole IPv4 or IPv6 packet headers included, towards
/// `dst` from namespace `ns` through a raw socket (`IPPROTO_RAW`: the
/// kernel adds nothing, and routes it by `dst`).
pub fn send_raw(ns: &str, dst: IpAddr, packet: &[u8]) {
    let packet = packet.to_vec();
    in_netns(ns, move || {
        #[allow(unsafe_code, reason = "raw sockets have no std equivalent")]
        // SAFETY: plain socket calls on a descriptor this block owns; the
        // buffers outlive the calls.
        unsafe {
            let (family, addr): (i32, std::net::SocketAddr) = match dst {
                IpAddr::V4(_) => (libc::AF_INET, std::net::SocketAddr::new(dst, 0)),
                IpAddr::V6(_) => (libc::AF_INET6, std::net::SocketAddr::new(dst, 0)),
            };
            let fd = libc::socket(family, libc::SOCK_RAW, libc::IPPROTO_RAW);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let n = match addr {
                std::net::SocketAddr::V4(a) => {
                    let sa = libc::sockaddr_in {
                        sin_family: libc::AF_INET as libc::sa_family_t,
                        sin_port: 0,
                        sin_addr: libc::in_addr {
                            s_addr: u32::from_ne_bytes(a.ip().octets()),
                        },
                        sin_zero: [0; 8],
                    };
                    libc::sendto(
                        fd,
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        (&sa as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                }
                std::net::SocketAddr::V6(a) => {
                    let sa = libc::sockaddr_in6 {
                        sin6_family: libc::AF_INET6 as libc::sa_family_t,
                        sin6_port: 0,
                        sin6_flowinfo: 0,
                        sin6_addr: libc::in6_addr {
                            s6_addr: a.ip().octets(),
                        },
                        sin6_scope_id: 0,
                    };
                    libc::sendto(
                        fd,
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        (&sa as *const libc::sockaddr_in6).cast(),
                        std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                    )
                }
            };
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(n, packet.len() as isize, "sendto: {err}");
        }
    });
}

/// An Ethernet/IPv4 ARP reply from `src_mac` claiming `sender` (the address
/// it speaks for), to `dst_mac` about `target`: what a pod answering ARP
/// for someone else sends. Written to `iface` in `ns` with a packet socket.
pub fn send_arp_reply(
    ns: &str,
    iface: &str,
    src_mac: [u8; 6],
    sender: Ipv4Addr,
    dst_mac: [u8; 6],
    target: Ipv4Addr,
) {
    send_arp_reply_naming(ns, iface, src_mac, src_mac, sender, dst_mac, target)
}

/// [`send_arp_reply`] whose ARP sender hardware address, `sha`, need not be
/// the frame's source MAC: what the receiver's neighbour cache takes.
pub fn send_arp_reply_naming(
    ns: &str,
    iface: &str,
    src_mac: [u8; 6],
    sha: [u8; 6],
    sender: Ipv4Addr,
    dst_mac: [u8; 6],
    target: Ipv4Addr,
) {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 2]); // Ethernet, IPv4, reply
    f.extend_from_slice(&sha);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&target.octets());
    send_frame(ns, iface, &f);
}

/// Writes `frame`, a whole Ethernet frame (whatever its source MAC), to
/// `iface` in `ns` with a packet socket.
pub fn send_frame(ns: &str, iface: &str, frame: &[u8]) {
    let f = frame.to_vec();
    let iface = iface.to_string();
    in_netns(ns, move || {
        let index = if_index(&iface);
        #[allow(unsafe_code, reason = "packet sockets have no std equivalent")]
        // SAFETY: plain socket calls on a descriptor this block owns; the
        // buffers outlive the calls.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = u16::from_be_bytes([f[12], f[13]]).to_be();
            addr.sll_ifindex = index as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&f[..6]);
            let n = libc::sendto(
                fd,
                f.as_ptr().cast(),
                f.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            );
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(n, f.len() as isize, "sendto: {err}");
        }
    });
}

/// ARP frames arriving on `iface` in `ns`, from the moment this is made.
#[derive(Debug)]
pub struct ArpListener(std::os::fd::OwnedFd);

impl ArpListener {
    pub fn new(ns: &str, iface: &str) -> ArpListener {
        let iface = iface.to_string();
        in_netns(ns, move || {
            let index = if_index(&iface);
            #[allow(unsafe_code, reason = "packet sockets have no std equivalent")]
            // SAFETY: socket and bind on a descriptor handed to OwnedFd at
            // once; the address struct outlives the call.
            unsafe {
                use std::os::fd::FromRawFd;
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (0x0806u16.to_be()) as i32);
                assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
                let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_protocol = 0x0806u16.to_be();
                addr.sll_ifindex = index as i32;
                use std::os::fd::AsRawFd;
                let rc = libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                );
                assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
                ArpListener(fd)
            }
        })
    }

    /// The senders (hardware and protocol address) of the ARP frames that
    /// arrive, in order, until one speaking for `last` (returned too) or
    /// `timeout` passes.
    pub fn senders_until(&self, last: Ipv4Addr, timeout: Duration) -> Vec<([u8; 6], Ipv4Addr)> {
        use std::os::fd::AsRawFd;
        let deadline = std::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        let mut buf = [0u8; 128];
        while std::time::Instant::now() < deadline {
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            #[allow(unsafe_code, reason = "poll and recv on a packet socket")]
            // SAFETY: one valid pollfd; a buffer that outlives the call.
            let n = unsafe {
                if libc::poll(&mut pfd, 1, left.as_millis() as i32) <= 0 {
                    continue;
                }
                libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
            };
            if n >= 42 {
                let sender = Ipv4Addr::new(buf[28], buf[29], buf[30], buf[31]);
                let mut sha = [0u8; 6];
                sha.copy_from_slice(&buf[22..28]);
                seen.push((sha, sender));
                if sender == last {
                    break;
                }
            }
        }
        seen
    }
}

fn if_index(iface: &str) -> u32 {
    let c = std::ffi::CString::new(iface).expect("interface name");
    #[allow(unsafe_code, reason = "if_nametoindex has no std equivalent")]
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert!(index != 0, "no interface {iface}");
    index
}

/// `aa:bb:..` as bytes.
pub fn parse_mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, part) in s.trim().split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(part, 16).expect("mac");
    }
    m
}

/// An IPv6 packet from `src` to `dst`: `chain`'s extension headers in
/// order (each given whole, its first byte, the next header, filled in
/// here), then `l4` of protocol `proto`, whose checksum (UDP, ICMPv6) is
/// computed over the final header's pseudo-header when `checksum_at` says
/// where it goes.
pub fn ipv6_packet(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    chain: &[(u8, Vec<u8>)],
    proto: u8,
    mut l4: Vec<u8>,
    checksum_at: Option<usize>,
) -> Vec<u8> {
    if let Some(at) = checksum_at {
        l4[at..at + 2].copy_from_slice(&[0, 0]);
        let sum = l4_checksum(IpAddr::V6(src), IpAddr::V6(dst), proto, &l4);
        l4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    let mut rest = Vec::new();
    for (i, (_, h)) in chain.iter().enumerate() {
        let mut h = h.clone();
        h[0] = chain.get(i + 1).map(|(t, _)| *t).unwrap_or(proto);
        rest.extend_from_slice(&h);
    }
    rest.extend_from_slice(&l4);
    let first = chain.first().map(|(t, _)| *t).unwrap_or(proto);
    let mut p = ipv6_header(src, dst, first, rest.len());
    p.extend_from_slice(&rest);
    p
}

/// An 8-byte hop-by-hop (0) or destination options (60) header holding
/// only padding, for [`ipv6_packet`].
pub fn ipv6_options(kind: u8) -> (u8, Vec<u8>) {
    (kind, vec![0, 0, 1, 4, 0, 0, 0, 0])
}

/// A UDP datagram (checksum left for [`ipv6_packet`], at 6).
pub fn udp_datagram(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + payload.len());
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}
