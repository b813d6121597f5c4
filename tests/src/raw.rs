//! `RawWsClient`: a tiny WebSocket client over a raw `TcpStream`, for what a conforming
//! library will not do: invalid UTF-8 text, oversize or fragmented frames, unmasked frames,
//! never answering pings, never reading at all.
//!
//! It does the upgrade handshake itself, writes frames byte by byte as told (masked or not),
//! and parses the server's frames without interpreting them.

use crate::http::{read_response, upgrade_head};
use anyhow::{Context, bail};
use bytes::{Buf, BytesMut};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A frame from the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == OP_CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// What a reader saw up to a close frame or the end of the stream.
#[derive(Clone, Debug, Default)]
pub struct Transcript {
    /// Text frames, in order.
    pub texts: Vec<String>,
    /// Ping frames seen (never answered).
    pub pings: usize,
    /// The close frame's code, if one came (`Some(None)` for a close without a code).
    pub close: Option<Option<u16>>,
    /// The stream ended (EOF or reset) before or after the close.
    pub ended: bool,
}

impl Transcript {
    /// Text frames parsed as JSON.
    pub fn json(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        self.texts
            .iter()
            .map(|t| serde_json::from_str(t).with_context(|| format!("not JSON: {t:?}")))
            .collect()
    }
}

/// Mask key used for every masked frame (any value works; a fixed one keeps traces readable).
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Encode one frame. Clients must mask; `masked: false` is for testing that servers refuse.
pub fn encode_frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0f));
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => out.push(mask_bit | len as u8),
        len @ 126..=65_535 => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A WebSocket connection driven by hand.
pub struct RawWsClient {
    stream: TcpStream,
    /// Bytes read and not yet parsed.
    buf: BytesMut,
}

impl RawWsClient {
    /// Upgrade `GET /v1/ws` with a bearer token; fails unless the answer is `101`.
    pub async fn connect(addr: SocketAddr, token: &str) -> anyhow::Result<RawWsClient> {
        let mut stream = timeout(crate::READ_TIMEOUT, TcpStream::connect(addr))
            .await
            .context("timed out connecting")?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true).context("nodelay")?;
        stream
            .write_all(upgrade_head(addr, "/v1/ws", Some(token)).as_bytes())
            .await
            .context("writing the upgrade request")?;
        let (response, rest) = read_response(&mut stream).await?;
        if response.status != 101 {
            bail!(
                "upgrade refused: {} {}",
                response.status,
                String::from_utf8_lossy(&response.body)
            );
        }
        Ok(RawWsClient {
            stream,
            buf: BytesMut::from(&rest[..]),
        })
    }

    /// Write bytes as they are.
    pub async fn write_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream
            .write_all(bytes)
            .await
            .context("writing to the socket")
    }

    /// Write one frame.
    pub async fn send_frame(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: &[u8],
        masked: bool,
    ) -> anyhow::Result<()> {
        self.write_raw(&encode_frame(fin, opcode, payload, masked))
            .await
    }

    /// Write one masked, final text frame.
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.send_frame(true, OP_TEXT, text.as_bytes(), true).await
    }

    /// Parse one frame from the buffer, if a whole one is there.
    fn parse_buffered(&mut self) -> anyhow::Result<Option<RawFrame>> {
        let buf = &self.buf[..];
        if buf.len() < 2 {
            return Ok(None);
        }
        let fin = buf[0] & 0x80 != 0;
        let opcode = buf[0] & 0x0f;
        let masked = buf[1] & 0x80 != 0;
        if masked {
            bail!("server sent a masked frame");
        }
        let (len, header) = match buf[1] & 0x7f {
            126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
            127 if buf.len() >= 10 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[2..10]);
                (
                    usize::try_from(u64::from_be_bytes(b)).context("frame length")?,
                    10,
                )
            }
            126 | 127 => return Ok(None),
            n => (n as usize, 2),
        };
        if buf.len() < header + len {
            return Ok(None);
        }
        self.buf.advance(header);
        let payload = self.buf.split_to(len).to_vec();
        Ok(Some(RawFrame {
            fin,
            opcode,
            payload,
        }))
    }

    /// Read the next frame; `None` when the stream ended (EOF or reset) first.
    pub async fn read_frame(&mut self, within: Duration) -> anyhow::Result<Option<RawFrame>> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(frame) = self.parse_buffered()? {
                return Ok(Some(frame));
            }
            self.buf.reserve(64 * 1024);
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf))
                .await
                .with_context(|| format!("no complete frame within {within:?}"))?;
            match read {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(e).context("reading the socket"),
            }
        }
    }

    /// Read (never answering pings) until a close frame or the end of the stream, all
    /// within `within`. After a close frame, also waits for the end of the stream.
    pub async fn read_until_close(&mut self, within: Duration) -> anyhow::Result<Transcript> {
        let deadline = Instant::now() + within;
        let mut transcript = Transcript::default();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self.read_frame(left).await.with_context(|| {
                format!(
                    "waiting for a close or EOF; saw {} texts, {} pings",
                    transcript.texts.len(),
                    transcript.pings
                )
            })?;
            let Some(frame) = frame else {
                transcript.ended = true;
                return Ok(transcript);
            };
            match frame.opcode {
                OP_TEXT => transcript
                    .texts
                    .push(String::from_utf8(frame.payload).context("server sent invalid UTF-8")?),
                OP_PING => transcript.pings += 1,
                OP_CLOSE => {
                    transcript.close = Some(frame.close_code());
                    let left = deadline.saturating_duration_since(Instant::now());
                    // The server should end the TCP connection after its close frame.
                    if let Ok(None) = self.read_frame(left).await {
                        transcript.ended = true;
                    }
                    return Ok(transcript);
                }
                other => bail!("unexpected opcode {other:#x} from the server"),
            }
        }
    }

    /// The next text frame (pings are skipped, never answered).
    pub async fn recv_text(&mut self, within: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_frame(left).await? {
                None => bail!("stream ended while waiting for a text frame"),
                Some(f) if f.opcode == OP_PING => continue,
                Some(f) if f.opcode == OP_TEXT => {
                    return String::from_utf8(f.payload).context("server sent invalid UTF-8");
                }
                Some(f) => bail!(
                    "expected a text frame, got opcode {:#x} (close code {:?})",
                    f.opcode,
                    f.close_code()
                ),
            }
        }
    }

    /// The next text frame as JSON, checked to be of `type`.
    pub async fn expect_type(
        &mut self,
        kind: &str,
        within: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let text = self.recv_text(within).await?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("not JSON: {text:?}"))?;
        if value["type"] != kind {
            bail!("expected a {kind:?} frame, got {value}");
        }
        Ok(value)
    }
}
