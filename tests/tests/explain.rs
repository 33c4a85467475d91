//! `node-agent explain` against what the kernel actually did: two nodes
//! (network namespaces on an underlay) with the real `node-agent run
//! --datapath` and the real control plane, pods behind veths, real TCP for
//! allowed, policy-denied and auth-required pairs; then the real `explain`
//! binary against the judging agent's admin socket must agree with the
//! connection's fate and with `observe`'s record of it. Needs root; fails
//! without it.

use std::process::Command;
use std::time::{Duration, Instant};

use keyway_tests::netns::{
    AgentProcess, Cluster, Fam, Pod, attached, connect, echo_round_trip, labelled_workload, tcp_echo,
};
use keyway_tests::{dual_stack, wait_until};

/// api takes 8080 from frontend with mutual auth, 9090 from intruder without.
const POLICY: &str = "apiVersion: keyway.dev/v1alpha1
kind: KeywayNetworkPolicy
metadata: { name: api-in, namespace: default }
spec:
  endpointSelector: { matchLabels: { app: api } }
  ingress:
    - authentication: { mode: required }
      fromEndpoints: [{ matchLabels: { app: frontend } }]
      toPorts: [{ ports: [{ port: \"8080\", protocol: TCP }] }]
    - authentication: { mode: disabled }
      fromEndpoints: [{ matchLabels: { app: intruder } }]
      toPorts: [{ ports: [{ port: \"9090\", protocol: TCP }] }]
";

/// The real `node-agent explain` binary against `agent`'s admin socket.
fn explain(agent: &AgentProcess, from: &str, to: &str, port: u16, json: bool) -> String {
    let mut cmd = Command::new(keyway_tests::bin("node-agent"));
    cmd.args(["explain", "--from", from, "--to", to, "--port", &port.to_string()])
        .arg("--admin-socket")
        .arg(&agent.admin_socket);
    if json {
        cmd.args(["-o", "json"]);
    }
    let out = cmd.output().expect("node-agent explain");
    assert!(
        out.status.success(),
        "node-agent explain --from {from} --to {to} --port {port}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn explain_json(agent: &AgentProcess, from: &str, to: &str, port: u16) -> serde_json::Value {
    serde_json::from_str(&explain(agent, from, to, port, true)).expect("explain -o json is one JSON object")
}

/// One pair: connect for real, then ask explain on the agent of the node
/// whose hooks judge it, and compare.
struct Case<'a> {
    fam: Fam,
    what: &'a str,
    client: &'a Pod,
    from: String,
    server: &'a Pod,
    to: String,
    port: u16,
    judge: &'a AgentProcess,
    expect: &'a str,
}

fn check(c: &Case<'_>) {
    let passed = match connect(
        &c.client.netns,
        c.fam.of(c.server),
        c.port,
        Duration::from_secs(2),
    ) {
        Ok(mut s) => echo_round_trip(&mut s, c.what.as_bytes()),
        Err(_) => false,
    };
    let r = explain_json(c.judge, &c.from, &c.to, c.port);
    let verdict = r["verdict"].as_str().unwrap_or_default();
    assert_eq!(
        passed,
        verdict == "FORWARDED",
        "{}: the connection {} but explain says {verdict}: {r:#}",
        c.what,
        if passed { "succeeded" } else { "failed" }
    );
    let expect = if r["drop_reason"] == "" {
        verdict.to_string()
    } else {
        format!("{verdict} {}", r["drop_reason"].as_str().unwrap())
    };
    assert_eq!(expect, c.expect, "{}: {r:#}", c.what);

    // observe's records of the flow at each hook judged here agree with
    // explain's hooks: verdict, drop reason and rule.
    for h in r["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["judged_here"] == true)
    {
        let direction = h["direction"].as_str().unwrap().to_string();
        let src = c.fam.of(c.client).to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        let record = loop {
            let flows = c.judge.observe(&["--port", &c.port.to_string()]);
            if let Some(f) = flows
                .into_iter()
                .rev()
                .find(|f| f["source"]["ip"] == src.as_str() && f["direction"] == direction.as_str())
            {
                break f;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no {direction} flow record from {src} on port {}",
                c.what,
                c.port
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(record["verdict"], h["verdict"], "{}: {record:#} vs {h:#}", c.what);
        assert_eq!(
            record["drop_reason"], h["drop_reason"],
            "{}: {record:#} vs {h:#}",
            c.what
        );
        let rule = h["policy"]["rule"].as_str().unwrap_or_default();
        assert_eq!(record["rule"], rule, "{}: {record:#} vs {h:#}", c.what);
        let auth = h["auth"]["state"].as_str().unwrap_or_default();
        match record["auth"].as_str().unwrap() {
            "missing" => assert_ne!(auth, "valid", "{}", c.what),
            "authenticated" | "pre-authenticated" => assert_eq!(auth, "valid", "{}", c.what),
            _ => assert!(h["auth"].is_null(), "{}: {h:#}", c.what),
        }
    }
}

dual_stack!(explain_agrees_with_what_the_kernel_did_for_allowed_denied_and_auth_required_pairs);

fn explain_agrees_with_what_the_kernel_did_for_allowed_denied_and_auth_required_pairs(fam: Fam) {
    let mut cluster = Cluster::new(&["node-a", "node-b"]);
    let frontend = cluster.add_pod("node-a", "fe", 10);
    let intruder = cluster.add_pod("node-a", "in", 20);
    // Its Workload says node-c, where no agent runs: nobody can obtain its
    // SVID, so a pair that needs auth with it stays unauthenticated.
    let ghost = cluster.add_pod("node-a", "gh", 30);
    let api = cluster.add_pod("node-b", "api", 10);
    let (na, nb) = (cluster.node("node-a").clone(), cluster.node("node-b").clone());
    // Workloads by name where names resolve to the family tested (IPv4, a
    // dual-stack pod's first address); by IPv6 address otherwise.
    let who = |name: &str, pod: &Pod| match fam {
        Fam::V4 => format!("default/{name}"),
        Fam::V6 => fam.of(pod).to_string(),
    };
    let deployment = cluster.deploy(
        &[],
        &[
            labelled_workload("frontend", "frontend", "frontend", "node-a", frontend.ip),
            labelled_workload("intruder", "intruder", "intruder", "node-a", intruder.ip),
            labelled_workload("ghost", "ghost", "frontend", "node-c", ghost.ip),
            labelled_workload("api", "api", "api", "node-b", api.ip),
            POLICY.to_string(),
        ],
    );
    let agents = &deployment.agents;
    let (agent_a, agent_b) = (&agents[0], &agents[1]);
    tcp_echo(&api.netns, fam.of(&api), 8080);
    tcp_echo(&api.netns, fam.of(&api), 9090);
    tcp_echo(&frontend.netns, fam.of(&frontend), 7070);
    wait_until(
        Duration::from_secs(30),
        "both agents to attach to their pods",
        || attached(&nb, &api) && attached(&na, &frontend) && attached(&na, &intruder),
    );
    wait_until(
        Duration::from_secs(30),
        "api's agent to pre-authenticate frontend",
        || {
            agent_b.auth_list().iter().any(|e| {
                e["remote_spiffe_id"]
                    .as_str()
                    .is_some_and(|s| s.ends_with("/sa/frontend"))
            })
        },
    );

    // The judging agent's counters before any traffic.
    let before = agent_b.scrape();
    let series = |text: &str, s: &str| keyway_tests::http::value(text, s).unwrap_or(0.0);
    const DENIED: &str = r#"keyway_datapath_drops_total{reason="policy-denied"}"#;
    const UNAUTHENTICATED: &str = r#"keyway_datapath_drops_total{reason="auth-required"}"#;
    const SIGNALS: &str = r#"keyway_datapath_signals_total{result="queued"}"#;

    // Before any traffic: the names resolve and the answer reads.
    let text = explain(
        agent_b,
        &who("frontend", &frontend),
        &who("api", &api),
        8080,
        false,
    );
    assert!(
        text.contains("FORWARDED")
            && text.contains("default/api-in ingress[0]")
            && text.contains("valid for"),
        "{text}"
    );
    let r = explain_json(agent_b, &who("frontend", &frontend), &who("api", &api), 8080);
    assert_eq!(r["source"]["workload"], "frontend");
    assert_eq!(r["source"]["node"], "node-a");
    assert!(
        r["destination"]["spiffe_id"]
            .as_str()
            .unwrap()
            .ends_with("/sa/api")
    );
    assert_eq!(
        r["hooks"][0]["judged_here"], false,
        "frontend's egress is node-a's: {r:#}"
    );
    assert_eq!(r["hooks"][1]["policy"]["matched"], "exact");

    let cases = [
        Case {
            fam,
            what: "frontend -> api:8080 (auth required, pre-authenticated)",
            client: &frontend,
            from: who("frontend", &frontend),
            server: &api,
            to: who("api", &api),
            port: 8080,
            judge: agent_b,
            expect: "FORWARDED",
        },
        Case {
            fam,
            what: "intruder -> api:9090 (allowed without auth)",
            client: &intruder,
            from: who("intruder", &intruder),
            server: &api,
            to: fam.of(&api).to_string(),
            port: 9090,
            judge: agent_b,
            expect: "FORWARDED",
        },
        Case {
            fam,
            what: "intruder -> api:8080 (no rule: default-deny)",
            client: &intruder,
            from: fam.of(&intruder).to_string(),
            server: &api,
            to: who("api", &api),
            port: 8080,
            judge: agent_b,
            expect: "DROPPED policy-denied",
        },
        Case {
            fam,
            what: "ghost -> api:8080 (auth required, nobody can authenticate)",
            client: &ghost,
            from: who("ghost", &ghost),
            server: &api,
            to: who("api", &api),
            port: 8080,
            judge: agent_b,
            expect: "DROPPED auth-required",
        },
        Case {
            fam,
            what: "intruder -> frontend:7070 (same node, no policy: both hooks here)",
            client: &intruder,
            from: who("intruder", &intruder),
            server: &frontend,
            to: who("frontend", &frontend),
            port: 7070,
            judge: agent_a,
            expect: "FORWARDED",
        },
    ];
    for c in &cases {
        check(c);
    }

    // `/metrics` moved with what the kernel did: each drop counted under its
    // reason, the ghost's unauthenticated packets signalled to the agent,
    // the signal queue drained, and the agent ready (datapath included).
    wait_until(
        Duration::from_secs(10),
        "agent_b's drop and signal counters to move with the traffic",
        || {
            let now = agent_b.scrape();
            series(&now, DENIED) > series(&before, DENIED)
                && series(&now, UNAUTHENTICATED) > series(&before, UNAUTHENTICATED)
                && series(&now, SIGNALS) > series(&before, SIGNALS)
        },
    );
    let after = agent_b.scrape();
    assert_eq!(
        keyway_tests::http::value(&after, "keyway_signal_queue_depth"),
        Some(0.0),
        "the handshake driver keeps up with a handful of signals:\n{after}"
    );
    assert!(
        keyway_tests::http::value(&after, "keyway_auth_map_entries").unwrap_or(0.0) >= 1.0,
        "frontend's pre-authenticated pair is an auth entry:\n{after}"
    );
    let (status, body) = agent_b.http_get("/readyz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("datapath"), "readiness names the datapath: {body}");
    // Node-a's intruder -> frontend flow was forwarded; no drop counted there
    // for a reason that did not happen.
    let a = agent_a.scrape();
    assert_eq!(series(&a, UNAUTHENTICATED), 0.0, "{a}");

    // What to change, for the two drops.
    eprintln!(
        "{}\n{}",
        explain(
            agent_b,
            &who("intruder", &intruder),
            &who("api", &api),
            8080,
            false
        ),
        explain(agent_b, &who("ghost", &ghost), &who("api", &api), 8080, false)
    );
    let denied = explain_json(agent_b, &who("intruder", &intruder), &who("api", &api), 8080);
    let hint = denied["hooks"][1]["to_allow"][0].as_str().unwrap();
    assert!(
        hint.contains("no rule allows") && hint.contains("policy default/api-in"),
        "{denied:#}"
    );
    let ghostly = explain_json(agent_b, &who("ghost", &ghost), &who("api", &api), 8080);
    assert_eq!(ghostly["hooks"][1]["auth"]["state"], "missing", "{ghostly:#}");
    assert!(
        ghostly["hooks"][1]["to_allow"][0]
            .as_str()
            .unwrap()
            .starts_with("auth required but no entry"),
        "{ghostly:#}"
    );
    let both = explain_json(
        agent_a,
        &who("intruder", &intruder),
        &who("frontend", &frontend),
        7070,
    );
    assert!(
        both["hooks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["judged_here"] == true),
        "{both:#}"
    );
    let _ = (&deployment, &cluster);
}
