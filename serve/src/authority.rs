//! What gRPC clients send as `:authority` on a unix socket, made acceptable
//! to hyper's HTTP/2 server.
//!
//! gRPC C-core (Python, Ruby, C++, PHP; since 1.57) sends the percent-encoded
//! socket path (`tmp%2Fagent.sock`), grpc-java the raw path, grpc-swift the
//! same as C-core, and some clients nothing at all. hyperium/h2 parses
//! `:authority` as a URI authority and resets the stream with PROTOCOL_ERROR
//! for all of these (hyperium/h2 PR #487, grpc/grpc#38142), so those clients
//! could not reach the Workload API or the admin sockets.
//!
//! On a unix socket the authority carries no meaning: the caller is attested
//! from the socket itself (peer credentials, pidfd). So this layer sits on the
//! read side of every unix-socket connection, before h2 sees a byte. It
//! follows the client's frames, decodes each header block with the client's
//! HPACK state (the `loona-hpack` decoder), replaces an `:authority` that is
//! not a valid URI authority (what h2 would refuse) with `localhost`, and
//! re-encodes the block as literals without indexing, so h2's decoder table
//! stays empty and can never drift from the client's. Every other frame passes
//! through untouched. The layer does not depend on h2's internals: when h2
//! starts to accept these values, nothing here changes, and if a later h2
//! refuses something new, the third-party client tests say so.
//!
//! A header block is collected whole before it is decoded, so its size is
//! capped (encoded and decoded), as is every HEADERS or CONTINUATION frame:
//! a client that sends more is disconnected, as h2 would do.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface (RFC 9113 section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE's initial value, which the server never raises:
/// no client may send a larger frame.
const MAX_FRAME_SIZE: usize = 16_384;
/// SETTINGS_HEADER_TABLE_SIZE's initial value, which the server never
/// changes: the client's encoder table is at most this.
const HEADER_TABLE_SIZE: usize = 4096;
/// What replaces an authority h2 would refuse.
const LOCALHOST: &[u8] = b"localhost";

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why a connection was closed by this layer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum Error {
    #[error("a HEADERS or CONTINUATION frame of {0} bytes (the limit is {MAX_FRAME_SIZE})")]
    FrameTooLarge(usize),
    #[error("a header block over {0} bytes")]
    BlockTooLarge(usize),
    #[error("a CONTINUATION frame was expected for stream {0}")]
    ContinuationExpected(u32),
    #[error("a HEADERS frame with bad padding or priority fields")]
    MalformedHeaders,
    #[error("the header block does not decode: {0}")]
    Hpack(String),
}

/// The client-to-server half of one connection, as a sans-IO state machine:
/// bytes in, bytes for h2 out.
#[allow(
    missing_debug_implementations,
    reason = "holds the HPACK decoder, which has no Debug"
)]
pub(crate) struct Rewriter {
    /// Bytes of the preface or a frame header not yet complete, or of a
    /// HEADERS/CONTINUATION payload being collected.
    pending: Vec<u8>,
    state: State,
    decoder: loona_hpack::Decoder<'static>,
    /// The header block being collected, and the HEADERS frame it came in.
    block: Vec<u8>,
    opened: Option<Opened>,
    /// Cap on a header block, encoded and decoded.
    max_block: usize,
    rewritten: u64,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// The first bytes: the preface is checked, then frames follow.
    Preface,
    /// Not HTTP/2 with prior knowledge: passed on untouched for h2 to refuse.
    Opaque,
    FrameHeader,
    /// Inside the payload of a frame that passes through.
    Passing(usize),
    /// Collecting the payload of a HEADERS (`first`) or CONTINUATION frame.
    Collecting {
        len: usize,
        flags: u8,
        first: bool,
    },
}

/// The HEADERS frame that opened the block being collected.
#[derive(Debug, Clone, Copy)]
struct Opened {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
}

impl Rewriter {
    /// `max_header_list_size` is what the server enforces; blocks of up to
    /// four times that are passed on for h2 to refuse in its own way.
    pub fn new(max_header_list_size: usize) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            pending: Vec::new(),
            state: State::Preface,
            decoder,
            block: Vec::new(),
            opened: None,
            max_block: max_header_list_size.saturating_mul(4).max(MAX_FRAME_SIZE),
            rewritten: 0,
        }
    }

    /// How many `:authority` values were replaced so far.
    pub(crate) fn rewritten(&self) -> u64 {
        self.rewritten
    }

    /// Takes bytes the client sent and appends to `out` what h2 should read.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        // An empty HEADERS or CONTINUATION payload completes with no bytes.
        while !input.is_empty() || matches!(self.state, State::Collecting { len: 0, .. }) {
            match self.state {
                State::Opaque => {
                    out.extend_from_slice(input);
                    return Ok(());
                }
                State::Passing(left) => {
                    let n = left.min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.state = if n == left {
                        State::FrameHeader
                    } else {
                        State::Passing(left - n)
                    };
                }
                State::Preface => {
                    let Some(preface) = self.take(&mut input, PREFACE.len()) else {
                        continue;
                    };
                    self.state = if preface == PREFACE {
                        State::FrameHeader
                    } else {
                        State::Opaque
                    };
                    out.extend_from_slice(&preface);
                }
                State::FrameHeader => {
                    let Some(header) = self.take(&mut input, FRAME_HEADER_LEN) else {
                        continue;
                    };
                    let len =
                        usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
                    let (kind, flags) = (header[3], header[4]);
                    let stream =
                        u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
                    if let Some(opened) = self.opened {
                        if kind != CONTINUATION || stream != opened.stream {
                            return Err(Error::ContinuationExpected(opened.stream));
                        }
                        self.state = self.collect(len, flags, false)?;
                    } else if kind == HEADERS {
                        self.opened = Some(Opened {
                            stream,
                            flags,
                            priority: None,
                        });
                        self.state = self.collect(len, flags, true)?;
                    } else {
                        // Everything else, a stray CONTINUATION included (h2
                        // refuses that itself).
                        out.extend_from_slice(&header);
                        self.state = if len == 0 {
                            State::FrameHeader
                        } else {
                            State::Passing(len)
                        };
                    }
                }
                State::Collecting { len, flags, first } => {
                    let Some(payload) = self.take(&mut input, len) else {
                        continue;
                    };
                    self.fragment(&payload, flags, first)?;
                    self.state = State::FrameHeader;
                    if flags & END_HEADERS != 0 {
                        self.finish_block(out)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Accumulates up to `n` bytes from `input`; the whole `n` once there.
    fn take(&mut self, input: &mut &[u8], n: usize) -> Option<Vec<u8>> {
        let want = n - self.pending.len();
        let got = want.min(input.len());
        self.pending.extend_from_slice(&input[..got]);
        *input = &input[got..];
        (self.pending.len() == n).then(|| std::mem::take(&mut self.pending))
    }

    fn collect(&mut self, len: usize, flags: u8, first: bool) -> Result<State, Error> {
        if len > MAX_FRAME_SIZE {
            return Err(Error::FrameTooLarge(len));
        }
        if self.block.len() + len > self.max_block {
            return Err(Error::BlockTooLarge(self.max_block));
        }
        Ok(State::Collecting { len, flags, first })
    }

    /// Adds one frame's header block fragment, without padding or priority.
    fn fragment(&mut self, payload: &[u8], flags: u8, first: bool) -> Result<(), Error> {
        let mut body = payload;
        if first {
            let pad = if flags & PADDED != 0 {
                let (&pad, rest) = body.split_first().ok_or(Error::MalformedHeaders)?;
                body = rest;
                usize::from(pad)
            } else {
                0
            };
            if flags & PRIORITY != 0 {
                let (fields, rest) = body.split_first_chunk::<5>().ok_or(Error::MalformedHeaders)?;
                body = rest;
                if let Some(opened) = self.opened.as_mut() {
                    opened.priority = Some(*fields);
                }
            }
            body = body
                .get(..body.len().checked_sub(pad).ok_or(Error::MalformedHeaders)?)
                .ok_or(Error::MalformedHeaders)?;
        }
        self.block.extend_from_slice(body);
        Ok(())
    }

    /// Decodes the collected block, replaces a refused authority, and writes
    /// the block again as HEADERS and CONTINUATION frames.
    fn finish_block(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        let opened = self.opened.take().ok_or(Error::MalformedHeaders)?;
        let block = std::mem::take(&mut self.block);
        let mut encoded = Vec::with_capacity(block.len() + 64);
        let mut decoded_size = 0usize;
        let mut rewritten = 0;
        let max_block = self.max_block;
        self.decoder
            .decode_with_cb(&block, |name, value| {
                // RFC 7541 section 4.1's size: an HPACK bomb (one table entry
                // referenced thousands of times) stops here, not in memory.
                decoded_size += name.len() + value.len() + 32;
                if decoded_size > max_block {
                    return;
                }
                let value: &[u8] =
                    if &name[..] == b":authority" && http::uri::Authority::try_from(&value[..]).is_err() {
                        rewritten += 1;
                        LOCALHOST
                    } else {
                        &value
                    };
                literal(&name, value, &mut encoded);
            })
            .map_err(|e| Error::Hpack(format!("{e:?}")))?;
        if decoded_size > max_block {
            return Err(Error::BlockTooLarge(max_block));
        }
        self.rewritten += rewritten;
        write_block(opened, &encoded, out);
        Ok(())
    }
}

/// A literal header field without indexing, new name, no Huffman coding
/// (RFC 7541 section 6.2.2): it leaves the decoder's table as it is.
fn literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    for s in [name, value] {
        integer(s.len(), 7, out);
        out.extend_from_slice(s);
    }
}

/// An HPACK integer with a `prefix`-bit prefix and the bits above it clear
/// (RFC 7541 section 5.1): a string length without Huffman coding.
fn integer(mut n: usize, prefix: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix) - 1;
    if n < max {
        out.push(n as u8);
        return;
    }
    out.push(max as u8);
    n -= max;
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Writes `block` as a HEADERS frame (with the opener's END_STREAM and
/// priority) and as many CONTINUATION frames as it needs.
fn write_block(opened: Opened, block: &[u8], out: &mut Vec<u8>) {
    let priority = opened.priority.as_ref().map_or(&[][..], |p| &p[..]);
    let mut rest = block;
    let mut first = true;
    loop {
        let room = MAX_FRAME_SIZE - if first { priority.len() } else { 0 };
        let (chunk, after) = rest.split_at(room.min(rest.len()));
        rest = after;
        let end = if rest.is_empty() { END_HEADERS } else { 0 };
        let (kind, flags, prefix) = if first {
            let flags = (opened.flags & END_STREAM) | if opened.priority.is_some() { PRIORITY } else { 0 };
            (HEADERS, flags | end, priority)
        } else {
            (CONTINUATION, end, &[][..])
        };
        let len = prefix.len() + chunk.len();
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        out.extend_from_slice(&opened.stream.to_be_bytes());
        out.extend_from_slice(prefix);
        out.extend_from_slice(chunk);
        first = false;
        if rest.is_empty() {
            return;
        }
    }
}

/// A unix-socket connection whose client bytes go through a [`Rewriter`];
/// writes pass straight through.
#[allow(missing_debug_implementations, reason = "wraps a Rewriter")]
pub struct Rewriting<S> {
    inner: S,
    rewriter: Rewriter,
    scratch: Box<[u8]>,
    out: Vec<u8>,
    at: usize,
}

impl<S> Rewriting<S> {
    pub fn new(inner: S, max_header_list_size: usize) -> Self {
        Self {
            inner,
            rewriter: Rewriter::new(max_header_list_size),
            scratch: vec![0; 16 * 1024].into_boxed_slice(),
            out: Vec::new(),
            at: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewriting<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.at < this.out.len() {
                let n = (this.out.len() - this.at).min(buf.remaining());
                buf.put_slice(&this.out[this.at..this.at + n]);
                this.at += n;
                if this.at == this.out.len() {
                    this.out.clear();
                    this.at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut raw = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut raw))?;
            if raw.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            let before = this.rewriter.rewritten();
            this.rewriter
                .feed(raw.filled(), &mut this.out)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if before == 0 && this.rewriter.rewritten() > 0 {
                tracing::debug!("replaced a client's :authority that h2 would refuse with localhost");
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewriting<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Headers = Vec<(Vec<u8>, Vec<u8>)>;

    fn grpc_request(authority: &str, path: &str) -> Headers {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", authority),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            ("user-agent", "grpc-python/1.85.0 grpc-c/51.0.0 (linux; chttp2)"),
            ("workload.spiffe.io", "true"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A client's encoder: with the dynamic table, as gRPC C-core's is.
    fn encode(encoder: &mut loona_hpack::Encoder<'_>, headers: &Headers) -> Vec<u8> {
        encoder.encode(headers.iter().map(|(n, v)| (&n[..], &v[..])))
    }

    /// What h2 reads: frames, with the header blocks decoded by a decoder
    /// that lives as long as the connection (h2's).
    #[derive(Debug, PartialEq)]
    enum Frame {
        Headers {
            stream: u32,
            flags: u8,
            priority: Option<[u8; 5]>,
            headers: Headers,
        },
        Other(Vec<u8>),
    }

    #[allow(clippy::type_complexity, reason = "a test's parser state")]
    fn read_frames(mut bytes: &[u8], decoder: &mut loona_hpack::Decoder<'_>) -> Vec<Frame> {
        assert_eq!(&bytes[..PREFACE.len()], PREFACE);
        bytes = &bytes[PREFACE.len()..];
        let mut frames = Vec::new();
        let mut open: Option<(u32, u8, Option<[u8; 5]>, Vec<u8>)> = None; // stream, flags, priority, block
        while !bytes.is_empty() {
            let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let (kind, flags) = (bytes[3], bytes[4]);
            let stream = u32::from_be_bytes(bytes[5..9].try_into().unwrap());
            let payload = &bytes[9..9 + len];
            assert!(len <= MAX_FRAME_SIZE, "a frame h2 would refuse");
            match kind {
                HEADERS => {
                    assert_eq!(flags & PADDED, 0);
                    let (priority, block) = if flags & PRIORITY != 0 {
                        (Some(payload[..5].try_into().unwrap()), &payload[5..])
                    } else {
                        (None, payload)
                    };
                    open = Some((stream, flags, priority, block.to_vec()));
                }
                CONTINUATION => open
                    .as_mut()
                    .expect("continuation of a block")
                    .3
                    .extend_from_slice(payload),
                _ => frames.push(Frame::Other(bytes[..9 + len].to_vec())),
            }
            if matches!(kind, HEADERS | CONTINUATION) && flags & END_HEADERS != 0 {
                let (stream, flags, priority, block) = open.take().unwrap();
                frames.push(Frame::Headers {
                    stream,
                    flags: flags & END_STREAM,
                    priority,
                    headers: decoder.decode(&block).expect("h2 decodes what it is given"),
                });
            }
            bytes = &bytes[9 + len..];
        }
        frames
    }

    fn with_authority(headers: &Headers, authority: &str) -> Headers {
        let mut h = headers.clone();
        for (n, v) in &mut h {
            if n == b":authority" {
                *v = authority.as_bytes().to_vec();
            }
        }
        h
    }

    const SETTINGS: &[u8] = &[0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 0x2, 0, 0, 0, 0];

    #[test]
    fn authorities_h2_refuses_become_localhost_and_the_rest_is_untouched() {
        let cases = [
            // gRPC C-core (grpcio, grpc-ruby, C++) and grpc-swift.
            ("tmp%2Fkeyway%2Fagent.sock", "localhost"),
            // grpc-java.
            ("/run/spire/sockets/agent.sock", "localhost"),
            ("", "localhost"),
            // Valid authorities are what the client sent.
            ("localhost", "localhost"),
            ("keyway-admin", "keyway-admin"),
            ("[::1]:8081", "[::1]:8081"),
        ];
        for (sent, seen) in cases {
            let mut encoder = loona_hpack::Encoder::new();
            let request = grpc_request(sent, "/SpiffeWorkloadAPI/FetchX509SVID");
            let mut input = PREFACE.to_vec();
            input.extend(SETTINGS);
            input.extend(frame(HEADERS, END_HEADERS, 1, &encode(&mut encoder, &request)));
            let data = frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]);
            input.extend(&data);
            let mut rewriter = Rewriter::new(16 << 10);
            let mut out = Vec::new();
            rewriter.feed(&input, &mut out).unwrap();
            let frames = read_frames(&out, &mut loona_hpack::Decoder::new());
            assert_eq!(
                frames,
                vec![
                    Frame::Other(SETTINGS.to_vec()),
                    Frame::Headers {
                        stream: 1,
                        flags: 0,
                        priority: None,
                        headers: with_authority(&request, seen),
                    },
                    Frame::Other(data),
                ],
                "{sent:?}"
            );
            assert_eq!(rewriter.rewritten(), u64::from(sent != seen), "{sent:?}");
        }
    }

    #[test]
    fn the_clients_dynamic_table_is_followed_across_requests_and_chunkings() {
        // Three requests on one connection: the second and third refer to
        // the first one's table entries (the authority among them), the
        // third also resizes the table. Fed whole, and one byte at a time.
        let mut encoder = loona_hpack::Encoder::new();
        let authority = "tmp%2Fkeyway%2Fagent.sock";
        let mut input = PREFACE.to_vec();
        let mut sent = Vec::new();
        for (stream, path) in [
            (1, "/SpiffeWorkloadAPI/FetchX509SVID"),
            (3, "/SpiffeWorkloadAPI/FetchJWTSVID"),
        ] {
            let request = grpc_request(authority, path);
            input.extend(frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                stream,
                &encode(&mut encoder, &request),
            ));
            sent.push(with_authority(&request, "localhost"));
        }
        let first_two = input.len();
        // A table size update to 0 (evicting everything), then literals.
        let mut block = vec![0x20];
        encoder.set_max_table_size(0);
        let request = grpc_request(authority, "/SpiffeWorkloadAPI/FetchX509Bundles");
        block.extend(encode(&mut encoder, &request));
        input.extend(frame(HEADERS, END_HEADERS, 5, &block));
        sent.push(with_authority(&request, "localhost"));
        assert!(
            input.len() - PREFACE.len() < first_two * 2,
            "the later requests are smaller: they are indexed"
        );
        let whole = {
            let mut out = Vec::new();
            Rewriter::new(16 << 10).feed(&input, &mut out).unwrap();
            out
        };
        let mut rewriter = Rewriter::new(16 << 10);
        let mut bytewise = Vec::new();
        for b in &input {
            rewriter.feed(std::slice::from_ref(b), &mut bytewise).unwrap();
        }
        assert_eq!(whole, bytewise);
        let got: Vec<Headers> = read_frames(&whole, &mut loona_hpack::Decoder::new())
            .into_iter()
            .map(|f| match f {
                Frame::Headers { headers, .. } => headers,
                Frame::Other(f) => panic!("unexpected frame {f:?}"),
            })
            .collect();
        assert_eq!(got, sent);
        assert_eq!(rewriter.rewritten(), 3);
    }

    #[test]
    fn padding_priority_and_continuations_are_understood_and_priority_kept() {
        let mut encoder = loona_hpack::Encoder::new();
        let mut request = grpc_request("tmp%2Fagent.sock", "/SpiffeWorkloadAPI/FetchX509SVID");
        // Large enough that the block needs CONTINUATION frames both ways.
        request.push((b"x-large".to_vec(), vec![b'a'; 20_000]));
        let block = encode(&mut encoder, &request);
        let priority = [0x80, 0, 0, 0x3, 15];
        let mut first = vec![4];
        first.extend(priority);
        first.extend(&block[..1000]);
        first.extend([0; 4]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 7, &first));
        input.extend(frame(CONTINUATION, 0, 7, &block[1000..15_000]));
        input.extend(frame(CONTINUATION, END_HEADERS, 7, &block[15_000..]));
        let mut out = Vec::new();
        Rewriter::new(16 << 10).feed(&input, &mut out).unwrap();
        assert_eq!(
            read_frames(&out, &mut loona_hpack::Decoder::new()),
            vec![Frame::Headers {
                stream: 7,
                flags: END_STREAM,
                priority: Some(priority),
                headers: with_authority(&request, "localhost"),
            }]
        );
    }

    #[test]
    fn a_block_ended_by_an_empty_continuation_is_finished_at_once() {
        let mut encoder = loona_hpack::Encoder::new();
        let request = grpc_request("tmp%2Fagent.sock", "/SpiffeWorkloadAPI/FetchX509SVID");
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_STREAM, 1, &encode(&mut encoder, &request)));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &[]));
        let mut out = Vec::new();
        Rewriter::new(16 << 10).feed(&input, &mut out).unwrap();
        assert_eq!(
            read_frames(&out, &mut loona_hpack::Decoder::new()),
            vec![Frame::Headers {
                stream: 1,
                flags: END_STREAM,
                priority: None,
                headers: with_authority(&request, "localhost"),
            }]
        );
    }

    #[test]
    fn frames_other_than_headers_pass_through_byte_for_byte_however_they_arrive() {
        let mut input = PREFACE.to_vec();
        input.extend(SETTINGS);
        input.extend(frame(0x0, 0, 1, &vec![7; 40_000]));
        input.extend(frame(0x6, 0, 0, &[1; 8]));
        input.extend(frame(CONTINUATION, END_HEADERS, 9, &[0x82]));
        for chunk in [1, 9, 4096, input.len()] {
            let mut r = Rewriter::new(16 << 10);
            let mut out = Vec::new();
            for piece in input.chunks(chunk) {
                r.feed(piece, &mut out).unwrap();
            }
            assert_eq!(out, input, "chunks of {chunk}");
        }
        // Not HTTP/2 at all: passed on for h2 to refuse.
        let mut out = Vec::new();
        Rewriter::new(16 << 10)
            .feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &mut out)
            .unwrap();
        assert_eq!(out, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    #[test]
    fn oversized_frames_blocks_and_hpack_bombs_close_the_connection() {
        let feed = |frames: &[Vec<u8>]| {
            let mut input = PREFACE.to_vec();
            for f in frames {
                input.extend(f);
            }
            Rewriter::new(16 << 10).feed(&input, &mut Vec::new())
        };
        assert_eq!(
            feed(&[frame(HEADERS, END_HEADERS, 1, &vec![0; MAX_FRAME_SIZE + 1])]),
            Err(Error::FrameTooLarge(MAX_FRAME_SIZE + 1))
        );
        // CONTINUATION frames without end (the 2024 "CONTINUATION flood").
        let mut flood = vec![frame(HEADERS, 0, 1, &[0x82])];
        flood.extend((0..8).map(|_| frame(CONTINUATION, 0, 1, &vec![0x82; MAX_FRAME_SIZE])));
        assert_eq!(feed(&flood), Err(Error::BlockTooLarge(64 << 10)));
        // One 4 KB table entry referenced thousands of times.
        let mut bomb = vec![0x40, 0x01, b'x'];
        integer(4000, 7, &mut bomb);
        bomb.extend(vec![b'a'; 4000]);
        bomb.extend(vec![0xbe; 5000]);
        assert_eq!(
            feed(&[
                frame(HEADERS, 0, 1, &bomb[..MAX_FRAME_SIZE / 2]),
                frame(CONTINUATION, END_HEADERS, 1, &bomb[MAX_FRAME_SIZE / 2..]),
            ]),
            Err(Error::BlockTooLarge(64 << 10))
        );
        // Another frame in the middle of a header block.
        assert_eq!(
            feed(&[frame(HEADERS, 0, 1, &[0x82]), frame(0x0, 0, 1, &[])]),
            Err(Error::ContinuationExpected(1))
        );
        assert!(matches!(
            feed(&[frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff])]),
            Err(Error::Hpack(_))
        ));
        assert_eq!(
            feed(&[frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82])]),
            Err(Error::MalformedHeaders)
        );
    }

    #[test]
    fn long_strings_have_multi_byte_lengths() {
        let mut out = Vec::new();
        literal(b"x-a", &[b'v'; 300], &mut out);
        let got = loona_hpack::Decoder::new().decode(&out).unwrap();
        assert_eq!(got, vec![(b"x-a".to_vec(), vec![b'v'; 300])]);
    }
}
