//! `make bench`, agent part: 1000 concurrent FetchX509SVID streams, the time
//! from an SVID rotation to the last stream updated (p50/p99 over several
//! rotations), and the agent's RSS with 1000 workloads on its node (budget:
//! at most 30 MB, DESIGN.md section 7). The agent is the real release binary,
//! a separate process, so its RSS is its own.
//!
//! Appends to `bench-results/agent.md`.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyway_tests::bench::percentile;
use keyway_tests::{Binary, TD, bin};
use proto::workload as pb;

const STREAMS: usize = 1000;
const WORKLOADS: usize = 1000;
const ROTATIONS: usize = 4;

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("tmp");
    let cp = Binary::spawn(&dir.path().join("cp"), &["--ca-ttl", "600s"]);
    let uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(0);
    let mut docs = vec![format!(
        "apiVersion: keyway.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: bench, namespace: default }}\n\
         spec:\n  serviceAccount: bench\n  node: node-a\n  selectors: [\"unix:uid:{uid}\"]\n  svidTTL: 6s\n"
    )];
    for i in 0..WORKLOADS {
        docs.push(format!(
            "apiVersion: keyway.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: w{i}, namespace: bench, labels: {{ app: w{i} }} }}\n\
             spec:\n  serviceAccount: sa{i}\n  node: node-a\n  ips: [\"10.1.{}.{}\"]\n  selectors: [\"unix:uid:{}\"]\n",
            i / 250,
            i % 250 + 1,
            20000 + i
        ));
    }
    let yaml = dir.path().join("w.yaml");
    std::fs::write(&yaml, docs.join("---\n")).expect("write");
    cp.ok(&["apply", "-f", yaml.to_str().expect("path")]);
    let token = cp.ok(&["token", "create", "--node", "node-a"]).trim().to_owned();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, cp.ok(&["bundle", "show"])).expect("bundle");
    let socket = dir.path().join("agent.sock");
    let mut agent = Command::new(bin("node-agent"))
        .args([
            "run",
            "--server",
            &cp.listen,
            "--trust-domain",
            TD,
            "--node-name",
            "node-a",
        ])
        .arg("--trust-bundle")
        .arg(&bundle)
        .arg("--data-dir")
        .arg(dir.path().join("agent"))
        .arg("--socket")
        .arg(&socket)
        .arg("--admin-socket")
        .arg(dir.path().join("agent-admin.sock"))
        .args(["--auth-port", "0"])
        .args(["--metrics-address", "off"])
        .env("KEYWAY_JOIN_TOKEN", token)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .spawn()
        .expect("agent");

    // Connect STREAMS streams over 10 connections once the agent serves us.
    let connect = || keyway_tests::raw_workload_client(&socket);
    let request = || keyway_tests::with_security_header(pb::X509svidRequest {});
    let start = Instant::now();
    let first = loop {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "agent did not serve within 120s"
        );
        if let Ok(mut c) = connect().await
            && let Ok(mut s) = c.fetch_x509svid(request()).await.map(|r| r.into_inner())
            && let Ok(Some(_)) = s.message().await
        {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(first);
    // Open the streams; RSS is read after the rotations were observed.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Vec<u8>, Instant)>();
    let mut clients = Vec::new();
    for c in 0..10 {
        let mut client = connect().await.expect("connect");
        for s in 0..STREAMS / 10 {
            let mut stream = client
                .fetch_x509svid(request())
                .await
                .expect("stream")
                .into_inner();
            let tx = tx.clone();
            let idx = c * (STREAMS / 10) + s;
            tokio::spawn(async move {
                while let Ok(Some(msg)) = stream.message().await {
                    let serial = keyway_identity::x509::split_der(&msg.svids[0].x509_svid)
                        .ok()
                        .and_then(|chain| keyway_identity::x509::inspect_leaf(&chain[0]).ok())
                        .map(|l| l.serial)
                        .unwrap_or_default();
                    if tx.send((idx, serial, Instant::now())).is_err() {
                        return;
                    }
                }
            });
        }
        clients.push(client);
    }
    // Per serial: when each stream saw it.
    let mut seen: HashMap<Vec<u8>, Vec<Instant>> = HashMap::new();
    let mut order: Vec<Vec<u8>> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while order.len() < ROTATIONS + 2 && Instant::now() < deadline {
        let Ok(Some((_, serial, at))) = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await else {
            break;
        };
        if !seen.contains_key(&serial) {
            order.push(serial.clone());
        }
        seen.entry(serial).or_default().push(at);
    }
    let rss = keyway_tests::rss_kib(agent.id());
    let mut fanout = Vec::new();
    // Skip the first serial (streams opened at different times) and the last
    // (may still be arriving); measure complete rotations only.
    for serial in order.iter().skip(1).take(order.len().saturating_sub(2)) {
        let times = &seen[serial];
        if times.len() < STREAMS {
            continue;
        }
        let first = times.iter().min().copied().expect("times");
        fanout.extend(times.iter().map(|t| t.duration_since(first)));
    }
    fanout.sort();
    let _ = agent.kill();
    let _ = agent.wait();
    let report = format!(
        "# Agent benchmark\n\n\
         Measured by `make bench` on this machine, in one run: the release `node-agent` binary with {WORKLOADS} \
         workloads (each with its own identity and SVID) plus one benchmark workload on its node, and {STREAMS} \
         concurrent FetchX509SVID streams over 10 connections.\n\n\
         | What | Value |\n|---|---|\n\
         | rotations observed on all {STREAMS} streams | {rot} |\n\
         | rotation to stream updated, p50 | {p50:.1} ms |\n\
         | rotation to stream updated, p99 | {p99:.1} ms |\n\
         | rotation to last stream updated (max) | {max:.1} ms |\n\
         | agent RSS with {WORKLOADS} workloads and {STREAMS} streams | {rss_mb:.1} MB (budget 30 MB: {verdict}) |\n\n\
         Fan-out is measured from the first stream to see a new SVID to each other stream seeing it.\n",
        rot = fanout.len() / STREAMS,
        p50 = percentile(&fanout, 0.5).unwrap_or_default().as_secs_f64() * 1000.0,
        p99 = percentile(&fanout, 0.99).unwrap_or_default().as_secs_f64() * 1000.0,
        max = fanout.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
        rss_mb = rss as f64 / 1024.0,
        verdict = if rss as f64 / 1024.0 <= 30.0 {
            "within budget"
        } else {
            "OVER BUDGET"
        },
    );
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench-results");
    std::fs::create_dir_all(&out).expect("results dir");
    std::fs::write(out.join("agent.md"), &report).expect("write results");
    println!("{report}");
}
