//! `/metrics`, `/healthz` and `/readyz` of the real binaries, scraped over
//! HTTP: readiness turns true only when each component has reported in, and
//! the counters and gauges move with the events they name.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keyway_tests::http::{get, get_accepting, value};
use keyway_tests::{Binary, MTLS_INGRESS, TD, bin, wait_until};

/// A `node-agent run` process; killed on drop.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn scrape(addr: &str) -> String {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "GET /metrics on {addr}");
    body
}

fn metric(addr: &str, series: &str) -> f64 {
    let text = scrape(addr);
    value(&text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

fn wait_metric(addr: &str, series: &str, want: f64) {
    wait_until(Duration::from_secs(30), &format!("{series} == {want}"), || {
        value(&scrape(addr), series) == Some(want)
    });
}

fn spawn_agent(cp_listen: &str, dir: &Path, node: &str, token: &str, metrics: &str) -> AgentProcess {
    let child = Command::new(bin("node-agent"))
        .args([
            "run",
            "--server",
            cp_listen,
            "--trust-domain",
            TD,
            "--node-name",
            node,
        ])
        .arg("--trust-bundle")
        .arg(dir.join("bundle.pem"))
        .arg("--data-dir")
        .arg(dir.join(format!("{node}-data")))
        .arg("--socket")
        .arg(dir.join(format!("{node}.sock")))
        .arg("--admin-socket")
        .arg(dir.join(format!("{node}-admin.sock")))
        .args(["--auth-port", "0", "--metrics-address", metrics])
        .env("KEYWAY_JOIN_TOKEN", token)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    AgentProcess(child)
}

#[test]
fn metrics_and_readiness_follow_the_events() {
    let dir = tempfile::tempdir().unwrap();
    let cp_dir = dir.path().join("cp");
    let cp_metrics = free_address();
    let cp = Binary::spawn(&cp_dir, &["--metrics-address", &cp_metrics]);
    let spiffe_id = format!("spiffe://{TD}/ns/default/sa/web");
    std::fs::write(
        dir.path().join("web.yaml"),
        keyway_tests::workload_for_me("web", "web", "node-a", None),
    )
    .unwrap();
    cp.ok(&["apply", "-f", dir.path().join("web.yaml").to_str().unwrap()]);
    std::fs::write(dir.path().join("bundle.pem"), cp.ok(&["bundle", "show"])).unwrap();
    let token = cp.ok(&["token", "create", "--node", "node-a"]).trim().to_owned();
    let listen = cp.listen.clone();

    // The control plane: healthy and ready (store, CA, agent API), nothing issued to workloads yet.
    assert_eq!(get(&cp_metrics, "/healthz").0, 200);
    wait_until(Duration::from_secs(10), "control plane ready", || {
        get(&cp_metrics, "/readyz").0 == 200
    });
    let text = scrape(&cp_metrics);
    assert!(
        text.contains("# TYPE keyway_svids_issued_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE keyway_svid_issuance_seconds histogram\n"),
        "{text}"
    );
    assert_eq!(
        value(&text, r#"keyway_svids_issued_total{kind="workload"}"#),
        Some(0.0)
    );
    assert_eq!(
        value(&text, r#"keyway_svids_issued_total{kind="control-plane"}"#),
        Some(1.0)
    );
    assert_eq!(value(&text, "keyway_is_leader"), Some(1.0));
    assert_eq!(value(&text, "keyway_sync_streams"), Some(0.0));
    // Prometheus asks for OpenMetrics first; it gets the text format 0.0.4,
    // whose histogram bounds (`le="1"`) its stored series and dashboards
    // already name.
    let (status, content_type, prometheus) = get_accepting(
        &cp_metrics,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
    );
    assert_eq!(
        (status, content_type.as_str()),
        (200, "text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(
        value(
            &prometheus,
            r#"keyway_svid_issuance_seconds_bucket{kind="control-plane",le="1"}"#
        ),
        Some(1.0),
        "{prometheus}"
    );
    assert!(value(&text, "keyway_registry_revision").unwrap() >= 1.0, "{text}");
    let active: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("keyway_ca_expiry_timestamp_seconds{") && l.contains(r#"phase="active""#))
        .collect();
    assert_eq!(active.len(), 1, "{text}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let ca_expiry: f64 = active[0].rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        ca_expiry > now + 86400.0 * 300.0,
        "the default 365d CA: {ca_expiry}"
    );

    // The control plane goes away: the agent's listener is up before
    // attestation, healthy but not ready, and says what it waits for.
    cp.kill9();
    let agent_metrics = free_address();
    let _agent = spawn_agent(&listen, dir.path(), "node-a", &token, &agent_metrics);
    wait_until(Duration::from_secs(20), "agent /healthz", || {
        get(&agent_metrics, "/healthz").0 == 200
    });
    let (status, body) = get(&agent_metrics, "/readyz");
    assert_eq!(status, 503, "{body}");
    for missing in ["node_svid", "first_sync", "workload_api"] {
        assert!(
            body.lines().any(|l| l == missing),
            "{missing} not listed in {body:?}"
        );
    }
    // Every family is listed while the agent attests, as after: dashboards
    // and absent() alerts see the same names either side of attestation.
    let text = scrape(&agent_metrics);
    for family in [
        "keyway_svid_expiry_timestamp_seconds",
        "keyway_svid_rotations_total",
        "keyway_sync_lag_seconds",
        "keyway_handshakes_total",
        "keyway_auth_map_entries",
        "keyway_workload_api_streams",
        "keyway_datapath_drops_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} not listed while the agent attests:\n{text}"
        );
    }

    // Back in place: the agent attests, syncs, serves, gets the workload's SVID.
    let cp = Binary::spawn_on(&cp_dir, &listen, &["--metrics-address", &cp_metrics]);
    wait_until(Duration::from_secs(40), "agent ready", || {
        get(&agent_metrics, "/readyz").0 == 200
    });
    let agent_series = format!(r#"keyway_svid_expiry_timestamp_seconds{{spiffe_id="{spiffe_id}"}}"#);
    wait_until(
        Duration::from_secs(20),
        "the agent holds the workload SVID",
        || value(&scrape(&agent_metrics), &agent_series).is_some(),
    );
    let expiry = metric(&agent_metrics, &agent_series);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        expiry > now + 3000.0 && expiry < now + 3700.0,
        "default 1h SVID: expires at {expiry}, now {now}"
    );
    let text = scrape(&agent_metrics);
    assert_eq!(value(&text, "keyway_svid_rotations_total"), Some(0.0), "{text}");
    assert_eq!(value(&text, "keyway_sync_lag_seconds"), Some(0.0), "{text}");
    assert!(value(&text, "keyway_sync_last_applied_timestamp_seconds").unwrap() > now - 60.0);
    assert_eq!(value(&text, "keyway_auth_map_entries"), Some(0.0), "{text}");
    assert_eq!(value(&text, "keyway_workload_api_streams"), Some(0.0), "{text}");
    assert_eq!(
        value(&text, r#"keyway_handshakes_total{role="dial",result="ok"}"#),
        Some(0.0)
    );

    // The restarted control plane counted what it did since: one node SVID,
    // one workload SVID, one open Sync stream.
    wait_metric(&cp_metrics, r#"keyway_svids_issued_total{kind="workload"}"#, 1.0);
    let text = scrape(&cp_metrics);
    assert_eq!(
        value(&text, r#"keyway_svids_issued_total{kind="node"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(value(&text, "keyway_sync_streams"), Some(1.0), "{text}");
    assert_eq!(
        value(&text, r#"keyway_svid_issuance_seconds_count{kind="workload"}"#),
        Some(1.0),
        "{text}"
    );

    // Refusals, by reason: a used join token, and a CSR that is not one.
    let mut second = spawn_agent(&listen, dir.path(), "node-b", &token, "off");
    let exited = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        second.0.try_wait().unwrap().is_some()
    });
    assert!(exited, "an agent with a used token gives up");
    wait_metric(
        &cp_metrics,
        r#"keyway_svid_requests_refused_total{reason="token_refused"}"#,
        1.0,
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut admin = control_plane::admin::connect(&cp.admin_socket).await.unwrap();
        let r = admin
            .mint_x509_svid(proto::keyway::MintX509SvidRequest {
                spiffe_id: spiffe_id.clone(),
                csr: b"not a CSR".to_vec(),
                ttl_seconds: 600,
            })
            .await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::InvalidArgument);
    });
    wait_metric(
        &cp_metrics,
        r#"keyway_svid_requests_refused_total{reason="bad_csr"}"#,
        1.0,
    );
    assert_eq!(
        metric(&cp_metrics, r#"keyway_svids_issued_total{kind="admin"}"#),
        0.0
    );

    // A rotation step moves the rotations counter and adds the prepared CA.
    cp.ok(&["ca", "prepare"]);
    let text = scrape(&cp_metrics);
    assert_eq!(
        value(&text, r#"keyway_ca_rotations_total{step="prepare"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, r#"keyway_ca_rotations_total{step="activate"}"#),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        text.lines()
            .filter(
                |l| l.starts_with("keyway_ca_expiry_timestamp_seconds{") && l.contains(r#"phase="prepared""#)
            )
            .count(),
        1,
        "{text}"
    );
    assert_eq!(get(&cp_metrics, "/nothing").0, 404);
}

#[test]
fn a_taken_metrics_address_is_a_start_up_error_naming_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("control-plane"))
        .args(["serve", "--trust-domain", TD, "--listen", &free_address()])
        .arg("--data-dir")
        .arg(dir.path().join("cp"))
        .args(["--metrics-address", &addr])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("--metrics-address: cannot bind {addr}")),
        "{stderr}"
    );
    let out = Command::new(bin("control-plane"))
        .args(["serve", "--metrics-address", "nine-thousand"])
        .arg("--data-dir")
        .arg(dir.path().join("cp2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--metrics-address: \"nine-thousand\" is not HOST:PORT"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Serves `metrics` over HTTP on a free loopback port; returns the address.
async fn serve_metrics(telemetry: &node_agent::telemetry::Telemetry) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn({
        let registry = telemetry.registry.clone();
        let readiness = telemetry.readiness.clone();
        let gate = keyway_serve::Gate::new(
            "metrics",
            keyway_serve::http::limits(),
            telemetry.listeners.clone(),
        );
        async move {
            let _stop = _stop;
            keyway_serve::http::serve(listener, gate, registry, readiness, rx).await
        }
    });
    addr
}

/// Mutual auth between two in-process agents: the dialling side counts an
/// `ok` handshake and times it, the answering side counts one answered, and
/// the auth entries gauge follows the entries held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_and_auth_entries_are_counted() {
    let cp = keyway_tests::InProcess::start(keyway_tests::Options::default()).await;
    cp.apply(&format!(
        "{}---\n{}---\n{MTLS_INGRESS}",
        keyway_tests::workload_yaml("frontend", "frontend", "node-a", "10.0.1.1"),
        keyway_tests::workload_yaml("api", "api", "node-b", "10.0.2.1"),
    ))
    .await;
    let metrics_a = node_agent::telemetry::Telemetry::new(node_agent::agent::READY_COMPONENTS);
    let metrics_b = node_agent::telemetry::Telemetry::new(node_agent::agent::READY_COMPONENTS);
    let auth_metrics = |t: &node_agent::telemetry::Telemetry| {
        node_agent::mutual_auth::AuthMetrics::register(&t.registry, t.listeners.clone())
    };
    let a =
        keyway_tests::mesh::MeshAgent::start_with(&cp, "node-a", |c| c.metrics = auth_metrics(&metrics_a))
            .await;
    let b =
        keyway_tests::mesh::MeshAgent::start_with(&cp, "node-b", |c| c.metrics = auth_metrics(&metrics_b))
            .await;
    let addr_a = serve_metrics(&metrics_a).await;
    let addr_b = serve_metrics(&metrics_b).await;
    // b guards api's ingress: it dials node-a and holds one entry.
    b.wait_entries("b's entry", Duration::from_secs(15), |e| e.len() == 1)
        .await;
    let (text_a, text_b) = tokio::task::spawn_blocking(move || (scrape(&addr_a), scrape(&addr_b)))
        .await
        .unwrap();
    assert_eq!(
        value(&text_b, r#"keyway_handshakes_total{role="dial",result="ok"}"#),
        Some(1.0),
        "{text_b}"
    );
    assert_eq!(
        value(&text_b, r#"keyway_handshake_seconds_count{role="dial"}"#),
        Some(1.0),
        "{text_b}"
    );
    let seconds = value(&text_b, r#"keyway_handshake_seconds_sum{role="dial"}"#).unwrap();
    assert!(seconds > 0.0 && seconds < 15.0, "{seconds}");
    assert_eq!(value(&text_b, "keyway_auth_map_entries"), Some(1.0), "{text_b}");
    // The answering side records its count once its reply is written,
    // which may be just after the dialler has its entry.
    let _ = text_a;
    let addr_a = serve_metrics(&metrics_a).await;
    tokio::task::spawn_blocking(move || {
        wait_metric(
            &addr_a,
            r#"keyway_handshakes_total{role="answer",result="ok"}"#,
            1.0,
        )
    })
    .await
    .unwrap();
    a.stop().await;
    b.stop().await;
}

/// An open Workload API stream is counted while it lasts, and the SVID it
/// delivers is the one whose expiry the agent reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_streams_are_counted_while_open() {
    let cp = keyway_tests::InProcess::start(keyway_tests::Options::default()).await;
    cp.apply(&keyway_tests::workload_for_me("web", "web", "node-a", None))
        .await;
    let agent = keyway_tests::Agent::start(&cp, "node-a", None).await;
    let spiffe_id = format!("spiffe://{TD}/ns/default/sa/web");
    agent.wait_for_svid(&spiffe_id).await;
    let addr = serve_metrics(&agent.handles.telemetry).await;
    let streams = |want: f64| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || wait_metric(&addr, "keyway_workload_api_streams", want))
    };
    streams(0.0).await.unwrap();
    let mut client = keyway_tests::raw_workload_client(&agent.socket).await.unwrap();
    let mut stream = client
        .fetch_x509svid(keyway_tests::with_security_header(
            proto::workload::X509svidRequest {},
        ))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first message");
    assert_eq!(first.svids[0].spiffe_id, spiffe_id);
    streams(1.0).await.unwrap();
    let expiry = {
        let addr = addr.clone();
        let series = format!(r#"keyway_svid_expiry_timestamp_seconds{{spiffe_id="{spiffe_id}"}}"#);
        tokio::task::spawn_blocking(move || metric(&addr, &series))
            .await
            .unwrap()
    };
    let held = agent.handles.svids.borrow()[&spiffe_id]
        .not_after()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert_eq!(expiry, held);
    drop(stream);
    drop(client);
    streams(0.0).await.unwrap();
    agent.stop().await;
}

/// The leader prunes the issuance log to its caps, and the metrics show what
/// it holds and what went (the real binary, with a one-record cap).
#[test]
fn the_issuance_log_is_pruned_and_the_metrics_show_it() {
    let dir = tempfile::tempdir().unwrap();
    let cp_metrics = free_address();
    let cp = Binary::spawn(
        &dir.path().join("cp"),
        &[
            "--metrics-address",
            &cp_metrics,
            "--issuance-max-records",
            "1",
            "--issuance-keep-after-expiry",
            "4s",
        ],
    );
    wait_until(Duration::from_secs(10), "control plane ready", || {
        get(&cp_metrics, "/readyz").0 == 200
    });
    let out = dir.path().join("svid");
    for i in 0..3 {
        cp.ok(&[
            "x509",
            "mint",
            "--spiffe-id",
            &format!("spiffe://{TD}/ops/{i}"),
            "--out",
            out.to_str().unwrap(),
        ]);
    }
    // Its own SVID and three operator SVIDs were logged; one stays.
    wait_metric(&cp_metrics, "keyway_issuance_log_records", 1.0);
    assert!(metric(&cp_metrics, "keyway_issuance_log_pruned_total") >= 3.0);
    assert!(metric(&cp_metrics, "keyway_issuance_log_bytes") > 0.0);
}
