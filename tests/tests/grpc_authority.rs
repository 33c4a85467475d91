//! The `:authority` values real gRPC clients send on a unix socket reach
//! Keyway's servers: the percent-encoded socket path (gRPC C-core: grpcio,
//! grpc-ruby, C++; grpc-swift), the raw path (grpc-java) and nothing at all.
//! hyperium/h2 alone resets such a stream with PROTOCOL_ERROR; the
//! `keyway_serve::authority` layer on every unix-socket listener is what
//! lets them through. Each request here is written frame by frame, the way
//! C-core encodes it (HPACK with the dynamic table), on the real sockets of
//! the real servers: if a dependency update or a new listener ever loses the
//! layer, these fail.

use std::path::Path;
use std::time::Duration;

use keyway_tests::{Agent, Binary, InProcess, Options, TD, workload_for_me};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What came back for stream 1.
#[derive(Debug, Default)]
struct Outcome {
    headers: Vec<(String, String)>,
    messages: Vec<Vec<u8>>,
    trailers: Vec<(String, String)>,
    /// RST_STREAM or GOAWAY error code.
    reset: Option<u32>,
}

impl Outcome {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .chain(&self.trailers)
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn text(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(String, String)> {
    pairs
        .into_iter()
        .map(|(n, v)| {
            (
                String::from_utf8_lossy(&n).into(),
                String::from_utf8_lossy(&v).into(),
            )
        })
        .collect()
}

/// Two gRPC calls on one connection to `path` with `:authority` set to
/// `authority`, as gRPC C-core sends them (the second one made of dynamic
/// table references), each with `request` as its message; reads until the
/// second call's first message, its trailers or a reset.
async fn call(socket: &Path, authority: &str, path: &str, request: &[u8]) -> Outcome {
    let mut io = UnixStream::connect(socket).await.expect("connect");
    let mut encoder = loona_hpack::Encoder::new();
    let headers: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.as_bytes()),
        (b":authority", authority.as_bytes()),
        (b"te", b"trailers"),
        (b"content-type", b"application/grpc"),
        (b"user-agent", b"grpc-python/1.85.0 grpc-c/51.0.0 (linux; chttp2)"),
        (b"workload.spiffe.io", b"true"),
    ];
    let mut message = vec![0];
    message.extend((request.len() as u32).to_be_bytes());
    message.extend(request);
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    for stream in [1, 3] {
        out.extend(frame(0x1, 0x4, stream, &encoder.encode(headers.iter().copied())));
        out.extend(frame(0x0, 0x1, stream, &message));
    }
    io.write_all(&out).await.unwrap();
    let mut decoder = loona_hpack::Decoder::new();
    let mut got = Outcome::default();
    let read = async {
        loop {
            let mut head = [0u8; 9];
            if io.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes(head[5..9].try_into().unwrap());
            let mut payload = vec![0; len];
            io.read_exact(&mut payload).await.unwrap();
            match kind {
                // HEADERS: every block is decoded, in order (HPACK state).
                0x1 => {
                    assert_ne!(flags & 0x4, 0, "small responses fit one frame");
                    let decoded = text(decoder.decode(&payload).expect("response headers decode"));
                    if stream == 3 {
                        if got.headers.is_empty() {
                            got.headers = decoded;
                        } else {
                            got.trailers = decoded;
                        }
                        if flags & 0x1 != 0 {
                            return;
                        }
                    }
                }
                0x0 if stream == 3 => {
                    got.messages.push(payload[5..].to_vec());
                    return;
                }
                0x3 if stream == 3 => {
                    got.reset = Some(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                    return;
                }
                0x7 => {
                    got.reset = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
                    return;
                }
                // SETTINGS: acknowledged, as a client does.
                0x4 if flags & 0x1 == 0 => io.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap(),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("an answer within 20 s");
    got
}

/// The authorities clients send for `socket`, and who sends them.
fn authorities(socket: &Path) -> Vec<(&'static str, String)> {
    let path = socket.display().to_string();
    let encoded = path.trim_start_matches('/').replace('/', "%2F");
    vec![
        (
            "gRPC C-core (grpcio) and grpc-swift: the percent-encoded path",
            encoded,
        ),
        ("grpc-java: the raw path", path),
        ("no authority", String::new()),
        ("grpc-go and the Rust clients: localhost", "localhost".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workload_api_serves_every_authority_grpc_clients_send_wl_09() {
    let cp = InProcess::start(Options::default()).await;
    cp.apply(&workload_for_me("web", "web", "node-a", None)).await;
    let agent = Agent::start(&cp, "node-a", None).await;
    let id = format!("spiffe://{TD}/ns/default/sa/web");
    agent.wait_for_svid(&id).await;
    for (who, authority) in authorities(&agent.socket) {
        let got = call(
            &agent.socket,
            &authority,
            "/SpiffeWorkloadAPI/FetchX509SVID",
            &proto::workload::X509svidRequest::default().encode_to_vec(),
        )
        .await;
        assert_eq!(got.reset, None, "{who} ({authority:?}): stream reset: {got:?}");
        assert_eq!(got.header(":status"), Some("200"), "{who}: {got:?}");
        let response = proto::workload::X509svidResponse::decode(&got.messages[0][..]).unwrap();
        assert_eq!(response.svids[0].spiffe_id, id, "{who}");
    }
}

#[test]
fn the_control_plane_admin_socket_serves_every_authority_grpc_clients_send() {
    let dir = tempfile::tempdir().unwrap();
    let cp = Binary::spawn(&dir.path().join("cp"), &[]);
    let shown = cp.ok(&["bundle", "show"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (who, authority) in authorities(&cp.admin_socket) {
        let got = rt.block_on(call(
            &cp.admin_socket,
            &authority,
            "/keyway.v1.Admin/GetBundle",
            &proto::keyway::GetBundleRequest::default().encode_to_vec(),
        ));
        assert_eq!(got.reset, None, "{who} ({authority:?}): stream reset: {got:?}");
        assert_eq!(got.header(":status"), Some("200"), "{who}: {got:?}");
        let bundle = proto::keyway::Bundle::decode(&got.messages[0][..]).unwrap();
        assert_eq!(bundle.trust_domain, TD, "{who}");
        let first = keyway_identity::pem::encode_certs([bundle.x509_authorities[0].as_slice()]);
        assert!(shown.contains(first.trim()), "{who}: the bundle the CLI shows");
    }
}
