//! Third-party gRPC clients against the real `control-plane serve` and
//! `node-agent run` binaries: py-spiffe (the `spiffe` package on PyPI),
//! plain grpcio with default channel options and Node's `@grpc/grpc-js` on
//! the Workload API socket, and plain grpcio on both admin sockets. These
//! are what a Python or Node user meets first: gRPC C-core (grpcio >= 1.57)
//! sends the socket path, percent-encoded, as `:authority` on unix sockets,
//! which h2 refused with RST_STREAM PROTOCOL_ERROR (grpcio: INTERNAL "Stream
//! removed") until keyway-serve's `authority` layer (issue 15); grpc-js
//! sends `localhost` and was never affected. The clients are in
//! `tests/clients` and installed by `scripts/setup.sh clients`; each run
//! prints the client versions it used.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyway_identity::x509::LeafInfo;
use keyway_tests::{
    AgentBinary, Binary, MTLS_BOTH_WAYS, TD, bin, openssl, wait_until, workload_for_me, workload_yaml,
};
use serde_json::Value;

/// How long one client run may take (the clients' own calls have 20s
/// deadlines; this catches a client that hangs anyway).
const CLIENT_DEADLINE: Duration = Duration::from_secs(90);

fn id(sa: &str) -> String {
    format!("spiffe://{TD}/ns/default/sa/{sa}")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The venv's interpreter; fails (never skips) when setup has not run.
fn python() -> PathBuf {
    let venv = repo_root().join("target/clients/venv");
    let stamp = venv.join(".keyway-clients-stamp");
    assert!(
        stamp.exists(),
        "the Python clients (py-spiffe, grpcio) are not installed: {} is missing; \
         run `make setup` (or `scripts/setup.sh clients`)",
        stamp.display()
    );
    venv.join("bin/python")
}

/// `node` running the grpc-js client; fails (never skips) when setup has not run.
fn node_client() -> Command {
    let dir = repo_root().join("tests/clients/node");
    for pkg in ["@grpc/grpc-js", "@grpc/proto-loader"] {
        let manifest = dir.join("node_modules").join(pkg).join("package.json");
        assert!(
            manifest.exists(),
            "the Node client is not installed: {} is missing; run `make setup` (or `scripts/setup.sh clients`)",
            manifest.display()
        );
    }
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("client.js"));
    cmd
}

fn py_client(script: &str) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(repo_root().join("tests/clients").join(script));
    cmd
}

/// A client's run: the JSON lines it printed and how it exited.
struct Run {
    what: String,
    code: Option<i32>,
    events: Vec<Value>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn transcript(&self) -> String {
        format!(
            "{} exited with {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.what, self.code, self.stdout, self.stderr
        )
    }

    /// Every event named `name`.
    fn all(&self, name: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == name).collect()
    }

    /// The one event named `name`; the transcript on failure.
    fn event(&self, name: &str) -> &Value {
        self.all(name)
            .first()
            .copied()
            .unwrap_or_else(|| panic!("no {name:?} event from {}", self.transcript()))
    }

    /// Asserts that the client succeeded; prints the client's gRPC error
    /// (with its status and details) otherwise.
    fn succeeded(self) -> Self {
        assert_eq!(self.code, Some(0), "{}", self.transcript());
        self
    }
}

/// Runs a client with `args` (SOCKET ACTION OUTDIR ...), waits for it with a
/// deadline, and prints the client versions it reported.
fn run(what: &str, mut cmd: Command, args: &[&str]) -> Run {
    let child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let (out, timed_out) = match rx.recv_timeout(CLIENT_DEADLINE) {
        Ok(out) => (out, false),
        Err(_) => {
            // SAFETY: kill(2) on the pid of our own child, which has not
            // been reaped (the waiting thread has not returned).
            #[allow(unsafe_code, reason = "kill(2) on a child another thread waits for")]
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            (rx.recv().expect("the waiting thread reports"), true)
        }
    };
    let out = out.unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let run = Run {
        what: what.to_owned(),
        code: out.status.code(),
        events: stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !timed_out,
        "{what} still ran after {CLIENT_DEADLINE:?} (killed)\n{}",
        run.transcript()
    );
    println!("{what}: client versions {}", run.event("versions"));
    run
}

/// A control plane and its agents (each node's agent killed before the
/// control plane, the directory removed last).
struct Cluster {
    agents: Vec<AgentBinary>,
    cp: Binary,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// The control plane with `yaml` applied and an agent per node in `nodes`.
    fn start(yaml: &str, nodes: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cp = Binary::spawn(&dir.path().join("cp"), &[]);
        let docs = dir.path().join("docs.yaml");
        std::fs::write(&docs, yaml).unwrap();
        cp.ok(&["apply", "-f", docs.to_str().unwrap()]);
        let agents = nodes
            .iter()
            .map(|node| AgentBinary::spawn(&cp, dir.path(), node, &[]))
            .collect();
        Self { agents, cp, dir }
    }

    /// One node ("node-a") with the Workload "web" matching this test
    /// process, and that agent already holding web's SVID.
    fn with_web(ttl: Option<&str>) -> Self {
        let cluster = Self::start(&workload_for_me("web", "web", "node-a", ttl), &["node-a"]);
        let socket = &cluster.agents[0].socket;
        let fetch = || {
            Command::new(bin("node-agent"))
                .args(["svid", "fetch", "-o", "json", "--socket"])
                .arg(socket)
                .output()
                .unwrap()
        };
        wait_until(Duration::from_secs(30), "the agent serves web's SVID", || {
            fetch().status.success()
        });
        cluster
    }

    fn socket(&self) -> &str {
        self.agents[0].socket.to_str().unwrap()
    }

    /// A fresh directory for one client run's files.
    fn out_dir(&self, name: &str) -> PathBuf {
        let d = self.dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        d
    }
}

/// Verifies `chain` (leaf first, then any intermediates) against the CA
/// certificates `bundle` with `openssl verify`, at `at` (Unix seconds) if
/// given; returns the leaf.
fn openssl_verifies(dir: &Path, chain: &[Vec<u8>], bundle: &[Vec<u8>], at: Option<i64>) -> LeafInfo {
    assert!(
        !chain.is_empty() && !bundle.is_empty(),
        "an SVID chain and a bundle"
    );
    let pem = |name: &str, certs: &[Vec<u8>]| {
        let path = dir.join(name);
        std::fs::write(
            &path,
            keyway_identity::pem::encode_certs(certs.iter().map(Vec::as_slice)),
        )
        .unwrap();
        path.to_str().unwrap().to_owned()
    };
    let leaf = pem("verify-leaf.pem", &chain[..1]);
    let ca = pem("verify-bundle.pem", bundle);
    let mut args = vec!["verify".to_owned(), "-CAfile".to_owned(), ca];
    if chain.len() > 1 {
        args.extend(["-untrusted".to_owned(), pem("verify-untrusted.pem", &chain[1..])]);
    }
    if let Some(t) = at {
        args.extend(["-attime".to_owned(), t.to_string()]);
    }
    args.push(leaf.clone());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = openssl(&args);
    assert!(
        ok && out.contains(&format!("{leaf}: OK")),
        "openssl verify {args:?}: {out}"
    );
    keyway_identity::x509::inspect_leaf(&chain[0]).expect("an X509-SVID leaf")
}

fn pem_file(path: &Value) -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(path.as_str().expect("a path")).unwrap();
    keyway_identity::pem::decode_certs(&text).expect("PEM certificates")
}

fn der_file(path: &Value) -> Vec<Vec<u8>> {
    let der = std::fs::read(path.as_str().expect("a path")).unwrap();
    keyway_identity::x509::split_der(&der).expect("concatenated DER certificates")
}

/// A serial number as Python prints an integer in hex.
fn hex(bytes: &[u8]) -> String {
    let s: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let trimmed = s.trim_start_matches('0');
    if trimmed.is_empty() { "0" } else { trimmed }.to_owned()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The control plane's bundle as `control-plane bundle show` prints it.
fn cli_bundle(cp: &Binary) -> Vec<Vec<u8>> {
    keyway_identity::pem::decode_certs(&cp.ok(&["bundle", "show"])).unwrap()
}

#[test]
fn wl09_wl13_py_spiffe_fetches_the_x509_svid_and_bundles_that_openssl_verifies() {
    let client = py_client("py_spiffe_client.py");
    let cluster = Cluster::with_web(None);
    let out = cluster.out_dir("py-spiffe");
    let run = run(
        "py-spiffe x509",
        client,
        &[cluster.socket(), "x509", out.to_str().unwrap()],
    )
    .succeeded();
    let svid = run.event("x509_svid");
    assert_eq!(svid["spiffe_id"], id("web"), "{}", run.transcript());
    let bundles = &run.event("x509_bundles")["bundles"];
    let tds: Vec<&String> = bundles.as_object().unwrap().keys().collect();
    assert_eq!(tds, [TD], "only our trust domain's bundle: {bundles}");
    let bundle = pem_file(&bundles[TD]["pem"]);
    let mut expected = cli_bundle(&cluster.cp);
    let mut got = bundle.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "py-spiffe's bundle is `control-plane bundle show`");
    let leaf = openssl_verifies(&out, &pem_file(&svid["chain_pem"]), &bundle, None);
    assert_eq!(leaf.spiffe_id.to_string(), id("web"));
    assert_eq!(svid["serial"], hex(&leaf.serial));
}

/// py-spiffe's X.509 context watch (`stream_x509_contexts`) sees each
/// rotation: a new serial before the previous SVID expires, every context
/// valid, when it arrived, against the bundle that came with it. The
/// registry takes any svidTTL above zero (in whole seconds, so 1s is the
/// least); 4s keeps the test short without racing the clock on a loaded
/// machine.
#[test]
fn wl04_wl05_py_spiffe_watch_sees_rotations_within_one_svid_ttl() {
    const TTL_SECONDS: f64 = 4.0;
    let client = py_client("py_spiffe_client.py");
    let cluster = Cluster::with_web(Some("4s"));
    let out = cluster.out_dir("py-spiffe-watch");
    // Two rotations (three serials) within 30s.
    let run = run(
        "py-spiffe watch",
        client,
        &[cluster.socket(), "watch", out.to_str().unwrap(), "2", "30"],
    )
    .succeeded();
    let updates = run.all("x509_context");
    for u in &updates {
        let at = u["received_unix"].as_f64().unwrap() as i64;
        let leaf = openssl_verifies(
            &out,
            &pem_file(&u["chain_pem"]),
            &pem_file(&u["bundle_pem"]),
            Some(at),
        );
        assert_eq!(leaf.spiffe_id.to_string(), id("web"));
        assert_eq!(u["spiffe_id"], id("web"));
        assert_eq!(u["serial"], hex(&leaf.serial));
    }
    // The first context carrying each serial.
    let mut firsts: Vec<&Value> = Vec::new();
    for u in updates {
        if firsts.last().is_none_or(|f| f["serial"] != u["serial"]) {
            firsts.push(u);
        }
    }
    let serials: BTreeSet<String> = firsts.iter().map(|u| u["serial"].to_string()).collect();
    assert_eq!(
        serials.len(),
        3,
        "three distinct serials, in turn: {}",
        run.transcript()
    );
    for pair in firsts.windows(2) {
        let (old, new) = (pair[0], pair[1]);
        let expired = old["not_after"].as_f64().unwrap();
        let arrived = new["received_unix"].as_f64().unwrap();
        assert!(
            arrived < expired,
            "serial {} arrived at {arrived}, after serial {} expired at {expired}",
            new["serial"],
            old["serial"]
        );
        let waited = arrived - old["received_unix"].as_f64().unwrap();
        assert!(
            waited <= TTL_SECONDS,
            "{waited:.2}s between serial {} and serial {}: more than one SVID TTL",
            old["serial"],
            new["serial"]
        );
    }
}

/// A JWT-SVID for an audience through py-spiffe: `sub` is the caller's
/// SPIFFE ID, the agent's ValidateJWTSVID and py-spiffe's own validation
/// (signature against the JWT bundle) both accept it, and both refuse it for
/// another audience (JWT-06).
#[test]
fn wl14_wl16_py_spiffe_fetches_a_jwt_svid_and_validates_it() {
    let client = py_client("py_spiffe_client.py");
    let cluster = Cluster::with_web(None);
    let out = cluster.out_dir("py-spiffe-jwt");
    let run = run(
        "py-spiffe jwt",
        client,
        &[cluster.socket(), "jwt", out.to_str().unwrap(), "billing"],
    )
    .succeeded();
    let jwt = run.event("jwt_svid");
    assert_eq!(jwt["sub"], id("web"), "{}", run.transcript());
    assert_eq!(jwt["spiffe_id"], id("web"));
    let aud = &jwt["aud"];
    assert!(
        *aud == "billing" || *aud == serde_json::json!(["billing"]),
        "aud: {aud}"
    );
    assert!(jwt["exp"].as_f64().unwrap() > unix_now(), "not expired");
    assert_eq!(jwt["agent_validated"], id("web"));
    assert_eq!(jwt["locally_validated"], id("web"));
    assert!(jwt["jwt_authorities"].as_u64().unwrap() >= 1);
    for k in ["other_audience_agent", "other_audience_local"] {
        let outcome = jwt[k].as_str().unwrap();
        assert!(
            outcome.starts_with("rejected"),
            "{k}: another audience must be refused: {outcome}"
        );
    }
}

/// The checks every raw FetchX509SVID client gets: one SVID, web's, with a
/// key, and a chain openssl verifies against the bundle in the same message,
/// which is the control plane's.
fn assert_web_svid_response(run: &Run, cp: &Binary, out: &Path) {
    let resp = run.event("x509_svid_response");
    let svids = resp["svids"].as_array().unwrap();
    assert_eq!(svids.len(), 1, "{}", run.transcript());
    let s = &svids[0];
    assert_eq!(s["spiffe_id"], id("web"));
    assert!(s["key_bytes"].as_u64().unwrap() > 0, "a private key");
    let bundle = der_file(&s["bundle_der"]);
    let mut sorted = bundle.clone();
    sorted.sort();
    let mut expected = cli_bundle(cp);
    expected.sort();
    assert_eq!(sorted, expected, "the bundle is `control-plane bundle show`");
    let leaf = openssl_verifies(out, &der_file(&s["x509_svid_der"]), &bundle, None);
    assert_eq!(leaf.spiffe_id.to_string(), id("web"));
}

/// grpcio with default channel options (no `grpc.default_authority`
/// override), as anyone would write it, with the security header (EP-03).
#[test]
fn wl09_plain_grpcio_with_default_options_fetches_the_x509_svid() {
    let client = py_client("grpcio_client.py");
    let cluster = Cluster::with_web(None);
    let out = cluster.out_dir("grpcio");
    let run = run(
        "grpcio FetchX509SVID",
        client,
        &[cluster.socket(), "x509", out.to_str().unwrap()],
    )
    .succeeded();
    assert_web_svid_response(&run, &cluster.cp, &out);
}

#[test]
fn ep04_plain_grpcio_without_the_security_header_gets_invalid_argument() {
    let client = py_client("grpcio_client.py");
    let cluster = Cluster::with_web(None);
    let out = cluster.out_dir("grpcio-no-header");
    let run = run(
        "grpcio FetchX509SVID without workload.spiffe.io",
        client,
        &[cluster.socket(), "x509-no-header", out.to_str().unwrap()],
    );
    let err = run.event("rpc_error");
    assert_eq!(err["code"], "INVALID_ARGUMENT", "{}", run.transcript());
    assert_eq!(err["details"], "security header missing from request");
    assert_eq!(run.code, Some(3));
    assert!(run.all("x509_svid_response").is_empty());
}

/// @grpc/grpc-js with the service loaded from proto/spiffe/workloadapi.proto
/// by @grpc/proto-loader.
#[test]
fn wl09_grpc_js_fetches_the_x509_svid_that_openssl_verifies() {
    let client = node_client();
    let cluster = Cluster::with_web(None);
    let out = cluster.out_dir("grpc-js");
    let run = run(
        "grpc-js FetchX509SVID",
        client,
        &[cluster.socket(), "x509", out.to_str().unwrap()],
    )
    .succeeded();
    assert_web_svid_response(&run, &cluster.cp, &out);
}

/// The control plane's admin socket (`keyway.v1.Admin`) from plain grpcio:
/// GetBundle returns what `control-plane bundle show` prints, in PEM and
/// as JWKS.
#[test]
fn control_plane_admin_socket_answers_plain_grpcio_as_bundle_show_does() {
    use base64::Engine;
    let client = py_client("grpcio_client.py");
    let cluster = Cluster::start(&workload_for_me("web", "web", "node-a", None), &[]);
    let out = cluster.out_dir("grpcio-admin");
    let run = run(
        "grpcio Admin/GetBundle",
        client,
        &[
            cluster.cp.admin_socket.to_str().unwrap(),
            "cp-bundle",
            out.to_str().unwrap(),
        ],
    )
    .succeeded();
    let b = run.event("bundle");
    assert_eq!(b["trust_domain"], TD, "{}", run.transcript());
    assert!(b["sequence"].as_u64().unwrap() >= 1);
    let certs: Vec<Vec<u8>> = b["x509_authorities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            base64::engine::general_purpose::STANDARD
                .decode(c.as_str().unwrap())
                .unwrap()
        })
        .collect();
    assert_eq!(certs, cli_bundle(&cluster.cp), "bundle show (PEM)");
    let jwks: Value = serde_json::from_str(b["jwks"].as_str().unwrap()).unwrap();
    let shown: Value = serde_json::from_str(&cluster.cp.ok(&["bundle", "show", "--format", "jwks"])).unwrap();
    assert_eq!(jwks, shown, "bundle show --format jwks");
}

/// The node agent's admin socket (`keyway.v1.AgentAdmin`) from plain
/// grpcio: with two agents that pre-authenticated frontend (node-a) and api
/// (node-b), ListAuth returns the pairs `node-agent auth list` shows.
#[test]
fn agent_admin_socket_answers_plain_grpcio_as_auth_list_does() {
    let docs = format!(
        "{}---\n{}---\n{MTLS_BOTH_WAYS}",
        workload_yaml("frontend", "frontend", "node-a", "10.0.1.1"),
        workload_yaml("api", "api", "node-b", "10.0.2.1"),
    );
    let client = py_client("grpcio_client.py");
    let cluster = Cluster::start(&docs, &["node-a", "node-b"]);
    let admin = &cluster.agents[0].admin_socket;
    let auth_list = || -> Vec<Value> {
        let out = Command::new(bin("node-agent"))
            .args(["auth", "list", "-o", "json", "--admin-socket"])
            .arg(admin)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "node-agent auth list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let key = |e: &Value| {
        ["local_spiffe_id", "remote_spiffe_id", "remote_node", "via"]
            .map(|k| e[k].as_str().unwrap_or_default().to_owned())
    };
    let pair = [id("frontend"), id("api"), "node-b".to_owned()];
    let mut shown = Vec::new();
    wait_until(
        Duration::from_secs(30),
        "node-a's agent lists frontend -> api",
        || {
            shown = auth_list();
            shown.iter().any(|e| key(e)[..3] == pair)
        },
    );
    let out = cluster.out_dir("grpcio-agent-admin");
    let run = run(
        "grpcio AgentAdmin/ListAuth",
        client,
        &[admin.to_str().unwrap(), "agent-auth", out.to_str().unwrap()],
    )
    .succeeded();
    let listed = run.event("auth_list");
    assert_eq!(listed["datapath"], false, "{}", run.transcript());
    let got: BTreeSet<_> = listed["entries"].as_array().unwrap().iter().map(key).collect();
    let want: BTreeSet<_> = shown.iter().map(key).collect();
    assert_eq!(got, want, "ListAuth over grpcio is what `auth list` shows");
}
