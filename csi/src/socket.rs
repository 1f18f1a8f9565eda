//! The CSI Unix socket, open to gRPC clients of every language.
//!
//! gRPC's C core (the Python, Ruby and C++ clients) and grpc-java send the
//! socket's path as the HTTP/2 `:authority` of a `unix:` target. The HTTP/2
//! server under tonic checks the authority as a URI authority, where `/` is
//! not allowed, and resets every such stream with PROTOCOL_ERROR; Go's gRPC
//! (kubelet, the CSI sidecars) sends `localhost` and never meets it.
//!
//! So each connection accepted on the CSI socket passes through a small
//! filter of HTTP/2 frames on its way to the server ([`AuthorityFilter`]):
//! every request header block (HEADERS and its CONTINUATION frames) is
//! decoded with HPACK, an `:authority` that is not a valid URI authority is
//! replaced by `localhost`, and the block is encoded again as literals that
//! never touch the dynamic table, so the server's HPACK state stays empty
//! and cannot drift from the client's. Every other frame, and everything the
//! server sends back, passes unchanged. A connection that does not speak
//! HTTP/2 (or sends a header block that cannot be decoded) is closed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::{wrappers::UnixListenerStream, Stream, StreamExt};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame types (RFC 9113 section 6).
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
/// Frame flags.
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame every HTTP/2 peer accepts (SETTINGS_MAX_FRAME_SIZE's
/// initial value); re-encoded blocks are split to fit it.
const MAX_FRAME: usize = 16_384;
/// The HPACK dynamic table size the client's encoder may grow to. The
/// server never raises it above the 4096 default; more is allowed here so
/// the filter is never the part that refuses.
const MAX_TABLE: usize = 65_536;
/// The authority used when the client's is not a URI authority.
const LOCALHOST: &[u8] = b"localhost";
/// Bytes buffered between the filter and the server.
const PIPE: usize = 64 * 1024;

/// The connections of a CSI socket, each behind an [`AuthorityFilter`]:
/// what tonic's `serve_with_incoming` takes.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<Conn>> {
    UnixListenerStream::new(listener).map(|accepted| accepted.map(Conn::spawn))
}

/// One client connection as the gRPC server sees it: the server's end of a
/// pipe whose other end a filter task serves.
#[derive(Debug)]
pub struct Conn(DuplexStream);

impl Conn {
    /// Starts the filter between `client` and a new pipe; returns the
    /// pipe's server end.
    fn spawn(client: UnixStream) -> Conn {
        let (server_end, filter_end) = tokio::io::duplex(PIPE);
        tokio::spawn(async move {
            let (client_rx, mut client_tx) = client.into_split();
            let (server_rx, mut server_tx) = tokio::io::split(filter_end);
            let requests = async {
                let mut filter = AuthorityFilter::new(client_rx);
                let r = filter.run(&mut server_tx).await;
                let _ = server_tx.shutdown().await;
                r
            };
            let responses = async {
                let mut server_rx = server_rx;
                let r = tokio::io::copy(&mut server_rx, &mut client_tx).await;
                let _ = client_tx.shutdown().await;
                r.map(drop)
            };
            let (req, resp) = tokio::join!(requests, responses);
            if let Err(e) = req.and(resp) {
                tracing::debug!(error = %e, "CSI connection closed");
            }
        });
        Conn(server_end)
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// The client-to-server half of a connection: copies HTTP/2 frames,
/// rewriting request header blocks as the module explains.
pub struct AuthorityFilter<R> {
    rx: R,
    hpack: fluke_hpack::Decoder<'static>,
}

/// One frame's 9-byte header.
struct FrameHeader {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    fn parse(b: &[u8; 9]) -> Self {
        FrameHeader {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        let len = self.len.to_be_bytes();
        out.extend_from_slice(&len[len.len() - 3..]);
        out.push(self.kind);
        out.push(self.flags);
        out.extend_from_slice(&self.stream.to_be_bytes());
    }
}

fn malformed(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

impl<R: AsyncRead + Unpin> AuthorityFilter<R> {
    /// A filter reading the client's bytes from `rx`.
    pub fn new(rx: R) -> Self {
        let mut hpack = fluke_hpack::Decoder::new();
        hpack.set_max_allowed_table_size(MAX_TABLE);
        AuthorityFilter { rx, hpack }
    }

    /// Copies frames to `tx` until the client closes its side.
    pub async fn run<W: AsyncWrite + Unpin>(&mut self, tx: &mut W) -> io::Result<()> {
        let mut preface = [0u8; 24];
        self.rx.read_exact(&mut preface).await?;
        if &preface != PREFACE {
            return Err(malformed("not an HTTP/2 connection preface"));
        }
        tx.write_all(PREFACE).await?;
        let mut out = Vec::new();
        while let Some(header) = self.frame_header().await? {
            let mut payload = vec![0u8; header.len];
            self.rx.read_exact(&mut payload).await?;
            out.clear();
            if header.kind == HEADERS {
                self.headers(header, payload, &mut out).await?;
            } else {
                header.write(&mut out);
                out.extend_from_slice(&payload);
            }
            tx.write_all(&out).await?;
        }
        Ok(())
    }

    /// The next frame's header, or `None` at a clean end of stream.
    async fn frame_header(&mut self) -> io::Result<Option<FrameHeader>> {
        let mut b = [0u8; 9];
        match self.rx.read_exact(&mut b).await {
            Ok(_) => Ok(Some(FrameHeader::parse(&b))),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A HEADERS frame (and the CONTINUATION frames that finish its block),
    /// re-encoded into `out`.
    async fn headers(
        &mut self,
        header: FrameHeader,
        payload: Vec<u8>,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        let mut rest = payload.as_slice();
        let mut pad = 0;
        if header.flags & PADDED != 0 {
            let (&n, tail) = rest
                .split_first()
                .ok_or_else(|| malformed("HEADERS: no pad length"))?;
            pad = usize::from(n);
            rest = tail;
        }
        let mut priority: &[u8] = &[];
        if header.flags & PRIORITY != 0 {
            if rest.len() < 5 {
                return Err(malformed("HEADERS: short priority"));
            }
            (priority, rest) = rest.split_at(5);
        }
        if pad > rest.len() {
            return Err(malformed("HEADERS: padding longer than the frame"));
        }
        let mut block = rest[..rest.len() - pad].to_vec();
        let mut end = header.flags & END_HEADERS != 0;
        while !end {
            let next = self
                .frame_header()
                .await?
                .ok_or_else(|| malformed("header block cut short"))?;
            if next.kind != CONTINUATION || next.stream != header.stream {
                return Err(malformed("header block interrupted by another frame"));
            }
            let start = block.len();
            block.resize(start + next.len, 0);
            self.rx.read_exact(&mut block[start..]).await?;
            end = next.flags & END_HEADERS != 0;
        }
        let fields = self
            .hpack
            .decode(&block)
            .map_err(|e| malformed(format!("header block: {e:?}")))?;
        let mut encoded = Vec::with_capacity(block.len() + 16);
        for (name, value) in &fields {
            let value = if name.as_slice() == b":authority" && !is_authority(value) {
                LOCALHOST
            } else {
                value.as_slice()
            };
            encode_literal(name, value, &mut encoded);
        }
        write_block(&header, priority, &encoded, out);
        Ok(())
    }
}

/// `value` is what an HTTP/2 server accepts as `:authority`.
fn is_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// An HPACK integer with an `n`-bit prefix whose high bits are `first`
/// (RFC 7541 section 5.1).
fn encode_int(mut v: usize, n: u32, first: u8, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if v < max {
        // Lossless: v < 2^n <= 255.
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A "literal header field without indexing, new name" (RFC 7541 section
/// 6.2.2), with plain (not Huffman) strings: it leaves the decoder's
/// dynamic table as it is.
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    encode_int(name.len(), 7, 0, out);
    out.extend_from_slice(name);
    encode_int(value.len(), 7, 0, out);
    out.extend_from_slice(value);
}

/// A header block as HEADERS (with the original END_STREAM and priority)
/// plus as many CONTINUATION frames as it needs.
fn write_block(original: &FrameHeader, priority: &[u8], block: &[u8], out: &mut Vec<u8>) {
    let first_room = MAX_FRAME - priority.len();
    let (first, mut rest) = block.split_at(block.len().min(first_room));
    let mut flags = original.flags & (END_STREAM | PRIORITY);
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    FrameHeader {
        len: priority.len() + first.len(),
        kind: HEADERS,
        flags,
        stream: original.stream,
    }
    .write(out);
    out.extend_from_slice(priority);
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        rest = tail;
        FrameHeader {
            len: chunk.len(),
            kind: CONTINUATION,
            flags: if rest.is_empty() { END_HEADERS } else { 0 },
            stream: original.stream,
        }
        .write(out);
        out.extend_from_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frames in `bytes` (after the preface): header and payload.
    fn frames(mut bytes: &[u8]) -> Vec<(FrameHeader, Vec<u8>)> {
        let mut v = Vec::new();
        while !bytes.is_empty() {
            let h: [u8; 9] = bytes[..9].try_into().unwrap();
            let h = FrameHeader::parse(&h);
            let p = bytes[9..9 + h.len].to_vec();
            bytes = &bytes[9 + h.len..];
            v.push((h, p));
        }
        v
    }

    async fn filter(input: Vec<u8>) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        AuthorityFilter::new(input.as_slice())
            .run(&mut out)
            .await
            .map(|_| out)
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        FrameHeader {
            len: payload.len(),
            kind,
            flags,
            stream,
        }
        .write(&mut v);
        v.extend_from_slice(payload);
        v
    }

    fn block(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut enc = fluke_hpack::Encoder::new();
        enc.encode(fields.iter().copied())
    }

    #[tokio::test]
    async fn a_socket_path_authority_becomes_localhost() {
        let req = block(&[
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/csi.v1.Identity/Probe"),
            (b":authority", b"/var/lib/kubelet/plugins/csi.sock"),
            (b"content-type", b"application/grpc"),
        ]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(frame(HEADERS, END_HEADERS | PADDED, 1, &{
            let mut p = vec![3u8];
            p.extend(&req);
            p.extend([0, 0, 0]);
            p
        }));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
        let out = filter(input).await.unwrap();
        assert_eq!(&out[..24], PREFACE);
        let f = frames(&out[24..]);
        assert_eq!(f.len(), 3);
        assert_eq!((f[0].0.kind, f[0].1.len()), (0x4, 0), "SETTINGS unchanged");
        let (h, payload) = &f[1];
        assert_eq!((h.kind, h.stream, h.flags), (HEADERS, 1, END_HEADERS));
        let got = fluke_hpack::Decoder::new().decode(payload).unwrap();
        let authority: Vec<_> = got.iter().filter(|(n, _)| n == b":authority").collect();
        assert_eq!(
            authority,
            [&(b":authority".to_vec(), b"localhost".to_vec())]
        );
        assert_eq!(got.len(), 5, "every other field kept: {got:?}");
        assert_eq!(f[2].0.kind, 0x0);
        assert_eq!(f[2].1, b"\0\0\0\0\0", "DATA unchanged");
    }

    #[tokio::test]
    async fn a_valid_authority_and_the_dynamic_table_carry_over() {
        // One encoder for two requests: the second refers to the first's
        // entries in the client's dynamic table.
        let mut enc = fluke_hpack::Encoder::new();
        let fields: [(&[u8], &[u8]); 4] = [
            (b":method", b"POST"),
            (b":path", b"/csi.v1.Node/NodeGetInfo"),
            (b":authority", b"localhost"),
            (b"x-custom", b"value"),
        ];
        let first = enc.encode(fields.iter().copied());
        let second = enc.encode(fields.iter().copied());
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &first));
        // The second block split over HEADERS + CONTINUATION.
        let (a, b) = second.split_at(second.len() / 2);
        input.extend(frame(HEADERS, END_STREAM, 3, a));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, b));
        let out = filter(input).await.unwrap();
        let f = frames(&out[24..]);
        assert_eq!(f.len(), 2, "the continued block is one frame again");
        let mut dec = fluke_hpack::Decoder::new();
        for (h, payload) in &f {
            assert_eq!(h.flags, END_HEADERS | END_STREAM);
            let got = dec.decode(payload).unwrap();
            let want: Vec<_> = fields
                .iter()
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect();
            assert_eq!(got, want);
        }
    }

    #[tokio::test]
    async fn a_large_block_is_split_to_fit_frames() {
        let big = vec![b'a'; 3 * MAX_FRAME];
        let req = block(&[(b":authority", b"/tmp/csi.sock"), (b"x-big", &big)]);
        let mut input = PREFACE.to_vec();
        // Sent as one oversized HEADERS frame (the filter must not care).
        input.extend(frame(HEADERS, END_HEADERS | PRIORITY, 5, &{
            let mut p = vec![0, 0, 0, 0, 16];
            p.extend(&req);
            p
        }));
        let out = filter(input).await.unwrap();
        let f = frames(&out[24..]);
        assert!(f.len() >= 4, "{} frames", f.len());
        assert!(f.iter().all(|(h, _)| h.len <= MAX_FRAME && h.stream == 5));
        assert_eq!(f[0].0.flags, PRIORITY);
        assert_eq!(&f[0].1[..5], &[0, 0, 0, 0, 16]);
        assert!(f[1..].iter().all(|(h, _)| h.kind == CONTINUATION));
        assert_eq!(f.last().unwrap().0.flags, END_HEADERS);
        let mut joined = f[0].1[5..].to_vec();
        for (_, p) in &f[1..] {
            joined.extend(p);
        }
        let got = fluke_hpack::Decoder::new().decode(&joined).unwrap();
        assert_eq!(got[0], (b":authority".to_vec(), b"localhost".to_vec()));
        assert_eq!(got[1].1, big);
    }

    #[tokio::test]
    async fn what_is_not_http2_is_refused() {
        let e = filter(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]));
        let e = filter(input).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &block(&[(b":path", b"/")])));
        input.extend(frame(0x0, 0, 1, b"x"));
        let e = filter(input).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn hpack_integers() {
        let enc = |v, n| {
            let mut o = Vec::new();
            encode_int(v, n, 0, &mut o);
            o
        };
        // RFC 7541 C.1.1-C.1.3.
        assert_eq!(enc(10, 5), [10]);
        assert_eq!(enc(1337, 5), [31, 154, 10]);
        assert_eq!(enc(42, 8), [42]);
        assert_eq!(enc(127, 7), [127, 0]);
    }
}
