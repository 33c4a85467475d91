//! `make bench`, issuance part: end-to-end X509-SVID issuance over gRPC (mTLS,
//! CSR checks, signing, the issuance log flushed to disk) against the raw
//! in-process rcgen+ring rate measured in the same run. Budget (DESIGN.md
//! section 7): at least 50% of the raw single-core rate.
//!
//! Writes `bench-results/issuance.md` (linked from the README).

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyway_tests::{InProcess, Options, TD, workload_yaml};
use node_agent::control_plane::{self, ControlPlaneClient};
use proto::keyway as pb;
use tokio::sync::watch;

const N: usize = 3000;
const CONCURRENCY: usize = 32;

fn csrs(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|_| keyway_identity::csr::generate().expect("csr").1)
        .collect()
}

fn per_sec(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let cp = InProcess::start(Options::default()).await;
    cp.apply(&workload_yaml("frontend", "frontend", "node-a", "10.244.1.10"))
        .await;
    let id = format!("spiffe://{TD}/ns/default/sa/frontend");
    let spiffe_id = keyway_identity::spiffe_id::parse_svid_id(&id).expect("id");
    let authority = cp.cp.authority();
    let inputs = csrs(N);

    // Raw, single core: what issuing costs with no network and no disk.
    let start = Instant::now();
    for csr in &inputs {
        let key = ::control_plane::csr::check(csr, &id).expect("csr");
        authority
            .issue(&key, &spiffe_id, Duration::from_secs(3600), 1_700_000_000, None)
            .expect("issue");
    }
    let raw = per_sec(N, start.elapsed());
    // Signing only (public key already parsed), for reference.
    let key = ::control_plane::csr::check(&inputs[0], &id).expect("csr");
    let start = Instant::now();
    for _ in 0..N {
        authority
            .issue(&key, &spiffe_id, Duration::from_secs(3600), 1_700_000_000, None)
            .expect("issue");
    }
    let sign_only = per_sec(N, start.elapsed());

    // End to end: attested node, mTLS gRPC, issuance logged and flushed.
    let token = cp.token("node-a").await;
    let node = control_plane::attest_with_join_token(&cp.addr, cp.bundle(), "node-a", &token)
        .await
        .expect("attest");
    let (_b, bundle) = watch::channel(cp.bundle());
    let (_c, cert) = watch::channel(Some(node.svid.certified_key().expect("key")));
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(
            ControlPlaneClient::connect(&cp.addr, bundle.clone(), cert.clone())
                .await
                .expect("connect"),
        );
    }
    let before = cp.issuance_count().await;
    let inputs = Arc::new(inputs);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..CONCURRENCY {
        let mut client = clients[t % clients.len()].clone();
        let inputs = inputs.clone();
        let next = next.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= inputs.len() {
                    break;
                }
                client
                    .raw()
                    .sign_workload_csr(pb::SignWorkloadCsrRequest {
                        spiffe_id: id.clone(),
                        csr: inputs[i].clone(),
                    })
                    .await
                    .expect("sign");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let e2e = per_sec(N, start.elapsed());
    assert_eq!(cp.issuance_count().await, before + N, "every issuance persisted");
    let ratio = e2e / raw;

    let report = format!(
        "# Issuance benchmark\n\n\
         Measured by `make bench` on this machine ({cores} cores), all in one run.\n\n\
         | What | Rate |\n|---|---|\n\
         | raw, in-process, 1 core: CSR parse+verify + rcgen/ring issue | {raw:.0}/s |\n\
         | raw, in-process, 1 core: issue only (key already parsed) | {sign_only:.0}/s |\n\
         | end to end: SignWorkloadCsr over mTLS gRPC, {CONCURRENCY} in flight, issuance log flushed | {e2e:.0}/s |\n\n\
         **Ratio end-to-end / raw single-core: {pct:.0}%** (budget: at least 50%; {verdict}).\n\n\
         The end-to-end figure uses both cores for the server and the client together; the raw\n\
         figure is one core, as DESIGN.md section 7 defines the budget.\n",
        cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        pct = ratio * 100.0,
        verdict = if ratio >= 0.5 {
            "within budget"
        } else {
            "OVER BUDGET"
        },
    );
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench-results");
    std::fs::create_dir_all(&out).expect("results dir");
    std::fs::write(out.join("issuance.md"), &report).expect("write results");
    println!("{report}");
}
