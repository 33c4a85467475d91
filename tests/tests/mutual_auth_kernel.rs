//! Mutual authentication end to end in the real kernel: two nodes (network
//! namespaces joined by an underlay), each with the real `node-agent run
//! --datapath`, pods behind veths, the control plane binary on node-a's
//! underlay address, and real TCP. Needs root; fails without it.

use keyway_tests::MTLS_INGRESS;
use std::net::{IpAddr, TcpStream};
use std::time::{Duration, Instant};

use keyway_tests::netns::{
    AgentProcess, Cluster, Deployment, Fam, Pod, attached, echo_round_trip, labelled_workload, tcp_echo,
    tcp_retransmits,
};
use keyway_tests::{dual_stack, wait_until};

struct Setup {
    cluster: Cluster,
    deployment: Deployment,
    frontend: Pod,
    api: Pod,
    intruder: Pod,
    ghost: Pod,
}

fn setup(cp_flags: &[&str]) -> Setup {
    let mut cluster = Cluster::new(&["node-a", "node-b"]);
    let frontend = cluster.add_pod("node-a", "fe", 10);
    let intruder = cluster.add_pod("node-a", "in", 20);
    // Physically on node-a, but its Workload says node-c, where no agent
    // runs: nobody can obtain its SVID.
    let ghost = cluster.add_pod("node-a", "gh", 30);
    let api = cluster.add_pod("node-b", "api", 10);
    let deployment = cluster.deploy(
        cp_flags,
        &[
            labelled_workload("frontend", "frontend", "frontend", "node-a", frontend.ip),
            labelled_workload("intruder", "other", "intruder", "node-a", intruder.ip),
            labelled_workload("ghost", "ghost", "frontend", "node-c", ghost.ip),
            labelled_workload("api", "api", "api", "node-b", api.ip),
            MTLS_INGRESS.to_string(),
        ],
    );
    Setup {
        cluster,
        deployment,
        frontend,
        api,
        intruder,
        ghost,
    }
}

fn echo_server(fam: Fam, pod: &Pod, port: u16) {
    tcp_echo(&pod.netns, fam.of(pod), port);
}

fn connect(from: &Pod, to: IpAddr, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    keyway_tests::netns::connect(&from.netns, to, port, timeout)
}

fn api_has_entry_for(agent: &AgentProcess, peer_sa: &str) -> bool {
    agent.auth_list().iter().any(|e| {
        e["local_spiffe_id"]
            .as_str()
            .is_some_and(|s| s.ends_with("/sa/api"))
            && e["remote_spiffe_id"]
                .as_str()
                .is_some_and(|s| s.ends_with(&format!("/sa/{peer_sa}")))
    })
}

dual_stack!(
    the_first_connection_of_a_pre_authenticated_pair_loses_no_packet,
    rotations_and_an_agent_restart_during_steady_traffic_fail_no_connection,
);

fn the_first_connection_of_a_pre_authenticated_pair_loses_no_packet(fam: Fam) {
    let s = setup(&[]);
    echo_server(fam, &s.api, 8080);
    let node_b = &s.deployment.agents[1];
    let (na, nb) = (s.cluster.node("node-a").clone(), s.cluster.node("node-b").clone());
    wait_until(
        Duration::from_secs(30),
        "both agents to attach to their pods",
        || attached(&nb, &s.api) && attached(&na, &s.frontend) && attached(&na, &s.intruder),
    );
    wait_until(
        Duration::from_secs(30),
        "api's agent to pre-authenticate frontend",
        || api_has_entry_for(node_b, "frontend"),
    );

    // The very first connection: no drop, no SYN retransmit.
    let before = tcp_retransmits(&s.frontend.netns);
    let t0 = Instant::now();
    let mut c = connect(&s.frontend, fam.of(&s.api), 8080, Duration::from_secs(3)).expect("frontend -> api");
    let took = t0.elapsed();
    assert!(echo_round_trip(&mut c, b"first try"));
    assert_eq!(
        tcp_retransmits(&s.frontend.netns),
        before,
        "no segment was retransmitted"
    );
    assert!(took < Duration::from_millis(900), "no SYN retry (took {took:?})");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let flows = node_b.observe(&["--port", "8080"]);
        let reported = flows.iter().any(|f| {
            f["auth"] == "pre-authenticated" && f["source"]["ip"] == fam.of(&s.frontend).to_string()
        });
        if reported {
            break;
        }
        if Instant::now() >= deadline {
            let pin = s.cluster.node("node-b").pin_dir.clone();
            let dump = |m: &str| {
                std::process::Command::new("bpftool")
                    .args(["map", "dump", "pinned"])
                    .arg(pin.join(m))
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            };
            panic!(
                "no flow reported as pre-authenticated: flows {flows:#?}\nauth entries {:#?}\nflow table {}\nconfig {}\nlinks {:?}\nnet {}\nbpf {}",
                node_b.auth_list(),
                dump("KEYWAY_FLOW_TABLE"),
                dump("KEYWAY_CONFIG"),
                std::fs::read_dir(pin.join("links"))
                    .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>()),
                keyway_tests::netns::run(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &s.cluster.node("node-b").netns,
                        "bpftool",
                        "net",
                        "show"
                    ]
                ),
                keyway_tests::netns::run("ls", &["-la", "/sys/fs/bpf"]),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let drops = node_b.observe(&["--verdict", "DROPPED", "--port", "8080"]);
    assert!(drops.is_empty(), "nothing was dropped: {drops:?}");

    // The intruder (another service account) is dropped by policy.
    assert!(connect(&s.intruder, fam.of(&s.api), 8080, Duration::from_secs(1)).is_err());
    wait_until(Duration::from_secs(5), "a policy-denied flow record", || {
        node_b
            .observe(&["--drop-reason", "policy-denied", "--port", "8080"])
            .iter()
            .any(|f| f["source"]["ip"] == fam.of(&s.intruder).to_string())
    });

    // ghost matches the policy but its SVID cannot be obtained (no agent on
    // its node): it stays dropped with AUTH_REQUIRED.
    for _ in 0..2 {
        assert!(connect(&s.ghost, fam.of(&s.api), 8080, Duration::from_secs(1)).is_err());
    }
    let denied = node_b.observe(&["--drop-reason", "auth-required", "--port", "8080"]);
    assert!(
        denied
            .iter()
            .any(|f| f["source"]["ip"] == fam.of(&s.ghost).to_string() && f["auth"] == "missing"),
        "{denied:?}"
    );
    assert!(!api_has_entry_for(node_b, "ghost"));

    // Filters select exactly: every DROPPED flow on 8080 is the intruder's
    // or ghost's, and both are there; a drop reason narrows it to one.
    let drops = node_b.observe(&["--verdict", "DROPPED", "--port", "8080"]);
    let sources: std::collections::BTreeSet<String> = drops
        .iter()
        .map(|f| f["source"]["ip"].as_str().unwrap_or_default().to_string())
        .collect();
    let expected: std::collections::BTreeSet<String> =
        [fam.of(&s.intruder).to_string(), fam.of(&s.ghost).to_string()].into();
    assert_eq!(sources, expected, "{drops:#?}");
    assert!(
        drops
            .iter()
            .all(|f| f["verdict"] == "DROPPED" && f["destination"]["port"] == 8080)
    );
    let denied = node_b.observe(&["--drop-reason", "policy-denied", "--port", "8080"]);
    assert!(
        !denied.is_empty()
            && denied
                .iter()
                .all(|f| f["source"]["ip"] == fam.of(&s.intruder).to_string()),
        "{denied:#?}"
    );

    // --identity takes a SPIFFE ID or the number flow lines show; either
    // selects exactly the flows with that identity at one end.
    let ghost_flow = drops
        .iter()
        .find(|f| f["source"]["ip"] == fam.of(&s.ghost).to_string())
        .expect("a ghost flow");
    let ghost_id = ghost_flow["source"]["spiffe_id"]
        .as_str()
        .expect("ghost's SPIFFE ID")
        .to_string();
    let ghost_number = ghost_flow["source"]["identity"].to_string();
    assert!(ghost_id.ends_with("/sa/ghost"), "{ghost_flow:#}");
    for selector in [&ghost_id, &ghost_number] {
        let mine = node_b.observe(&["--identity", selector, "--port", "8080"]);
        assert!(
            !mine.is_empty()
                && mine.iter().all(|f| {
                    f["source"]["spiffe_id"] == ghost_id.as_str()
                        || f["destination"]["spiffe_id"] == ghost_id.as_str()
                }),
            "--identity {selector}: {mine:#?}"
        );
    }

    // --follow streams a new flow within a second.
    let mut follow = std::process::Command::new(keyway_tests::bin("node-agent"))
        .args([
            "observe",
            "--follow",
            "-o",
            "json",
            "--verdict",
            "FORWARDED",
            "--port",
            "8080",
        ])
        .arg("--admin-socket")
        .arg(&node_b.admin_socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("observe --follow");
    let stdout = follow.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    // What is already in the ring comes first; then the new connection.
    while rx.recv_timeout(Duration::from_millis(300)).is_ok() {}
    let t0 = Instant::now();
    let mut c =
        connect(&s.frontend, fam.of(&s.api), 8080, Duration::from_secs(3)).expect("frontend -> api again");
    assert!(echo_round_trip(&mut c, b"followed"));
    let port = c.local_addr().expect("local addr").port();
    let (at, line) = loop {
        let (at, line) = rx
            .recv_timeout(Duration::from_secs(1).saturating_sub(t0.elapsed()))
            .expect("observe --follow printed the new flow within a second");
        let f: serde_json::Value = serde_json::from_str(&line).expect("json line");
        if f["source"]["port"] == port {
            break (at, line);
        }
    };
    println!(
        "observe --follow: the new flow arrived {:?} after connect(): {line}",
        at - t0
    );
    let _ = follow.kill();
    let _ = follow.wait();
    let _ = (&s.deployment, &s.cluster);
}

fn rotations_and_an_agent_restart_during_steady_traffic_fail_no_connection(fam: Fam) {
    let mut s = setup(&["--svid-ttl", "8s", "--ca-ttl", "60s"]);
    echo_server(fam, &s.api, 8080);
    let nb = s.cluster.node("node-b").clone();
    wait_until(Duration::from_secs(30), "the datapath on api's veth", || {
        attached(&nb, &s.api)
    });
    wait_until(Duration::from_secs(30), "pre-authentication", || {
        api_has_entry_for(&s.deployment.agents[1], "frontend")
    });
    let mut long_lived = connect(&s.frontend, fam.of(&s.api), 8080, Duration::from_secs(3)).expect("connect");

    // ~20 s of new connections, one every 100 ms, across SVID rotations (8 s
    // SVIDs), a CA prepare + activate, and a kill -9 and restart of api's agent.
    let mut failures = Vec::new();
    let mut attempts = 0;
    let start = Instant::now();
    let mut ca_rotated = false;
    let mut restarted = false;
    while start.elapsed() < Duration::from_secs(20) {
        attempts += 1;
        match connect(&s.frontend, fam.of(&s.api), 8080, Duration::from_secs(2)) {
            Ok(mut c) => {
                if !echo_round_trip(&mut c, b"steady") {
                    failures.push(format!("{:?}: no echo", start.elapsed()));
                }
            }
            Err(e) => failures.push(format!("{:?}: {e}", start.elapsed())),
        }
        if !ca_rotated && start.elapsed() > Duration::from_secs(5) {
            s.deployment.cp.ok(&["ca", "prepare"]);
            s.deployment.cp.ok(&["ca", "activate"]);
            ca_rotated = true;
        }
        if !restarted && start.elapsed() > Duration::from_secs(10) {
            let node = s.cluster.node("node-b").clone();
            s.deployment.agents[1].kill9();
            assert!(
                echo_round_trip(&mut long_lived, b"agent down"),
                "established flows survive the agent"
            );
            s.deployment.agents[1] = AgentProcess::spawn(
                &node.netns,
                &s.deployment.cp.listen,
                "node-b",
                &s.deployment.bundle,
                s.deployment.dir.path(),
                &node.pin_dir,
                None,
                &[],
            );
            restarted = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        failures.is_empty(),
        "{} of {attempts} connections failed: {failures:?}",
        failures.len()
    );
    assert!(echo_round_trip(&mut long_lived, b"still here"));
    // The restarted agent took over the entries and re-authenticated them.
    wait_until(
        Duration::from_secs(15),
        "re-authentication after the restart",
        || {
            s.deployment.agents[1].auth_list().iter().any(|e| {
                e["remote_spiffe_id"]
                    .as_str()
                    .is_some_and(|x| x.ends_with("/sa/frontend"))
                    && e["via"] != "inherited"
            })
        },
    );
}
