//! Wire framing: every message travels in a self-describing frame.
//!
//! Layout, little-endian:
//!
//! ```text
//! magic    u32  "RFP1"
//! version  u8   PROTOCOL_VERSION
//! kind     u8   message kind (must match the decoded body)
//! flags    u16  bit 0: body is zstd-compressed
//! len      u32  body bytes on the wire
//! raw_len  u32  body bytes once decompressed (= len when raw)
//! crc      u32  crc32 of the header (crc zeroed) and the wire body
//! body     [u8; len]  postcard-encoded Message
//! ```
//!
//! A frame that is too long, of another version, badly checksummed or that does
//! not decode is an error: the connection that sent it is closed.

use super::message::Message;

pub const MAGIC: u32 = u32::from_le_bytes(*b"RFP1");
pub const PROTOCOL_VERSION: u8 = 2;
pub const HEADER_LEN: usize = 20;
/// Largest body, compressed or not.
pub const MAX_BODY: u32 = 64 << 20;
pub const FLAG_ZSTD: u16 = 1;
/// `Message::Batch`'s kind byte.
const BATCH_KIND: u8 = 3;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:#x}: not a replicafs peer")]
    BadMagic(u32),
    #[error("unsupported protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    Version(u8),
    #[error("frame too large ({0} bytes on the wire, {1} decompressed; at most {MAX_BODY})")]
    Oversized(u32, u32),
    #[error("unknown frame flags {0:#x}")]
    Flags(u16),
    #[error("frame checksum mismatch")]
    Checksum,
    #[error("frame body does not decompress: {0}")]
    Decompress(String),
    #[error("frame body does not decode: {0}")]
    Decode(String),
    #[error("frame kind {0} does not match its body ({1})")]
    Kind(u8, u8),
    #[error("connection ended inside a frame ({0} bytes pending)")]
    Truncated(usize),
}

fn header(version: u8, kind: u8, flags: u16, len: u32, raw_len: u32, crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4] = version;
    h[5] = kind;
    h[6..8].copy_from_slice(&flags.to_le_bytes());
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h[12..16].copy_from_slice(&raw_len.to_le_bytes());
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

fn crc(h: &[u8; HEADER_LEN], body: &[u8]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(h);
    c.update(body);
    c.finalize()
}

/// Encoding result: the frame bytes and the size of the uncompressed body.
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub raw_len: usize,
}

/// Encodes `msg`. With `zstd_level` > 0 the body is compressed when that saves at
/// least 1/16 of it (incompressible payloads go raw).
pub fn encode(msg: &Message, zstd_level: i32) -> Encoded {
    let raw = postcard::to_stdvec(msg).expect("a Message always serialises");
    let kind = msg.kind();
    let mut flags = 0u16;
    let mut body = raw.as_slice();
    let compressed;
    if zstd_level > 0
        && raw.len() >= 256
        && looks_compressible(&raw, zstd_level)
        && let Ok(c) = zstd::bulk::compress(&raw, zstd_level)
        && c.len() < raw.len() - raw.len() / 16
    {
        compressed = c;
        body = &compressed;
        flags |= FLAG_ZSTD;
    }
    let h0 = header(
        PROTOCOL_VERSION,
        kind,
        flags,
        body.len() as u32,
        raw.len() as u32,
        0,
    );
    let c = crc(&h0, body);
    let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
    bytes.extend_from_slice(&header(
        PROTOCOL_VERSION,
        kind,
        flags,
        body.len() as u32,
        raw.len() as u32,
        c,
    ));
    bytes.extend_from_slice(body);
    Encoded {
        bytes,
        raw_len: raw.len(),
    }
}

/// Stops trying to compress a stream whose batches do not compress: after
/// `n` such batches in a row the next `2^n - 1` (at most 63) go raw without
/// a try, then one is tried again. Guest data that is encrypted or already
/// compressed costs a compression attempt per 64 batches, not per batch.
#[derive(Debug, Default, Clone)]
pub struct CompressionBackoff {
    misses: u32,
    skip: u32,
}

impl CompressionBackoff {
    /// The zstd level for the next batch (0: send it raw).
    pub fn level(&mut self, configured: i32) -> i32 {
        if configured == 0 {
            return 0;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return 0;
        }
        configured
    }

    /// What the batch encoded at `level` came out as.
    pub fn record(&mut self, level: i32, e: &Encoded) {
        if level == 0 {
            return;
        }
        let flags = u16::from_le_bytes([e.bytes[6], e.bytes[7]]);
        if flags & FLAG_ZSTD != 0 {
            self.misses = 0;
        } else {
            self.misses = (self.misses + 1).min(6);
            self.skip = (1 << self.misses) - 1;
        }
    }
}

/// For bodies of 32 KiB or more, a 16 KiB sample from the middle decides whether
/// compressing the whole is worth the CPU (it rarely is for encrypted or
/// already-compressed guest data).
pub(crate) fn looks_compressible(raw: &[u8], level: i32) -> bool {
    // Small enough that the sample costs little next to the batch (batches
    // of incompressible 4 KiB writes were 15-22 % of the primary's CPU with
    // the whole batch compressed and thrown away).
    const SAMPLE: usize = 16 << 10;
    if raw.len() < 2 * SAMPLE {
        return true;
    }
    let mid = raw.len() / 2 - SAMPLE / 2;
    match zstd::bulk::compress(&raw[mid..mid + SAMPLE], level) {
        Ok(c) => c.len() < SAMPLE - SAMPLE / 10,
        Err(_) => false,
    }
}

/// The fixed part of a frame, validated.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub version: u8,
    pub kind: u8,
    pub flags: u16,
    pub len: u32,
    pub raw_len: u32,
    pub crc: u32,
}

pub fn parse_header(b: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let magic = u32_at(0);
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    // A batch's body is the same in version 1: receive logs written by
    // version 1 stay readable. Every other kind (a version 1 peer's hello
    // first of all) is refused.
    if b[4] != PROTOCOL_VERSION && !(b[4] == 1 && b[5] == BATCH_KIND) {
        return Err(FrameError::Version(b[4]));
    }
    let flags = u16::from_le_bytes([b[6], b[7]]);
    if flags & !FLAG_ZSTD != 0 {
        return Err(FrameError::Flags(flags));
    }
    let len = u32_at(8);
    let raw_len = u32_at(12);
    if len > MAX_BODY || raw_len > MAX_BODY || (flags & FLAG_ZSTD == 0 && len != raw_len) {
        return Err(FrameError::Oversized(len, raw_len));
    }
    Ok(Header {
        version: b[4],
        kind: b[5],
        flags,
        len,
        raw_len,
        crc: u32_at(16),
    })
}

/// Checks and decodes the body of a frame whose header is `h`.
pub fn decode_body(h: &Header, body: &[u8]) -> Result<Message, FrameError> {
    let h0 = header(h.version, h.kind, h.flags, h.len, h.raw_len, 0);
    if crc(&h0, body) != h.crc {
        return Err(FrameError::Checksum);
    }
    let raw;
    let plain = if h.flags & FLAG_ZSTD != 0 {
        raw = zstd::bulk::decompress(body, h.raw_len as usize)
            .map_err(|e| FrameError::Decompress(e.to_string()))?;
        if raw.len() != h.raw_len as usize {
            return Err(FrameError::Decompress(format!(
                "{} bytes, header says {}",
                raw.len(),
                h.raw_len
            )));
        }
        raw.as_slice()
    } else {
        body
    };
    let msg: Message =
        postcard::from_bytes(plain).map_err(|e| FrameError::Decode(e.to_string()))?;
    if msg.kind() != h.kind {
        return Err(FrameError::Kind(h.kind, msg.kind()));
    }
    Ok(msg)
}

/// Incremental decoder: push bytes as they arrive, take whole messages out.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    start: usize,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next whole message, None if more bytes are needed. The byte count is
    /// the frame's size on the wire.
    pub fn next_message(&mut self) -> Result<Option<(Message, usize)>, FrameError> {
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(&avail[..HEADER_LEN]);
        let h = parse_header(&hb)?;
        let total = HEADER_LEN + h.len as usize;
        if avail.len() < total {
            return Ok(None);
        }
        let msg = decode_body(&h, &avail[HEADER_LEN..total])?;
        self.start += total;
        if self.start > (1 << 20) && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(Some((msg, total)))
    }

    /// At end of stream: an error if a frame was cut short.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.pending() {
            0 => Ok(()),
            n => Err(FrameError::Truncated(n)),
        }
    }
}
