//! Plain HTTP/1.1 over a raw loopback `TcpStream`: probes (`/healthz`, `/readyz`,
//! `/metrics`) and WebSocket upgrade attempts whose refusal (401, 503) the tests inspect.
//!
//! Raw TCP keeps the bytes under the test's control: the response is parsed exactly as it
//! arrived, and an upgrade that should have been refused is visible as a `101`.

use crate::READ_TIMEOUT;
use anyhow::{Context, bail};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// A key for `Sec-WebSocket-Key` (any 16 bytes, base64; this is RFC 6455's example).
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A response as received.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header of that (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("body is not JSON: {:?}", self.text()))
    }
}

/// Find the end of the head (`\r\n\r\n`) in `buf`.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parse a status line and headers.
fn parse_head(head: &[u8]) -> anyhow::Result<(u16, Vec<(String, String)>)> {
    let head = std::str::from_utf8(head).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().context("empty response")?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1 status line: {status_line:?}");
    }
    let status = parts
        .next()
        .context("status line without a code")?
        .parse::<u16>()
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("bad header line {line:?}"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    Ok((status, headers))
}

/// Read one response from `stream`. A `101` returns after the head (the rest of the stream
/// is WebSocket); other responses read `content-length` bytes of body, or up to EOF.
/// Bytes read past the response are returned as well.
pub async fn read_response(stream: &mut TcpStream) -> anyhow::Result<(HttpResponse, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let end = loop {
        if let Some(end) = head_end(&buf) {
            break end;
        }
        let mut chunk = [0u8; 4096];
        let n = timeout(READ_TIMEOUT, stream.read(&mut chunk))
            .await
            .context("timed out reading the response head")?
            .context("reading the response head")?;
        if n == 0 {
            bail!(
                "connection closed before a complete response head ({} bytes: {:?})",
                buf.len(),
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let (status, headers) = parse_head(&buf[..end])?;
    let mut response = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    let mut rest = buf.split_off(end);
    if status == 101 {
        return Ok((response, rest));
    }
    match response.header("content-length") {
        Some(length) => {
            let length: usize = length.parse().context("bad content-length")?;
            while rest.len() < length {
                let mut chunk = [0u8; 4096];
                let n = timeout(READ_TIMEOUT, stream.read(&mut chunk))
                    .await
                    .context("timed out reading the body")?
                    .context("reading the body")?;
                if n == 0 {
                    bail!(
                        "connection closed after {} of {length} body bytes",
                        rest.len()
                    );
                }
                rest.extend_from_slice(&chunk[..n]);
            }
            let after = rest.split_off(length);
            response.body = rest;
            Ok((response, after))
        }
        None => {
            timeout(READ_TIMEOUT, stream.read_to_end(&mut rest))
                .await
                .context("timed out reading the body to EOF")?
                .context("reading the body")?;
            response.body = rest;
            Ok((response, Vec::new()))
        }
    }
}

/// Send `request` (a complete HTTP/1.1 request) on a new connection and read the response.
pub async fn send(addr: SocketAddr, request: &str) -> anyhow::Result<HttpResponse> {
    let mut stream = timeout(READ_TIMEOUT, TcpStream::connect(addr))
        .await
        .context("timed out connecting")?
        .with_context(|| format!("connecting to {addr}"))?;
    stream
        .write_all(request.as_bytes())
        .await
        .context("writing the request")?;
    Ok(read_response(&mut stream).await?.0)
}

/// `GET path` with `Connection: close`.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<HttpResponse> {
    send(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// A request with any method, no body, `Connection: close`.
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<HttpResponse> {
    send(
        addr,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    )
    .await
}

/// The request head of a WebSocket upgrade to `path_and_query` with an optional bearer
/// token.
pub fn upgrade_head(addr: SocketAddr, path_and_query: &str, bearer: Option<&str>) -> String {
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\
         {auth}\r\n"
    )
}

/// Attempt a WebSocket upgrade and return the response (the head only, for a `101`).
pub async fn upgrade_request(
    addr: SocketAddr,
    path_and_query: &str,
    bearer: Option<&str>,
) -> anyhow::Result<HttpResponse> {
    send(addr, &upgrade_head(addr, path_and_query, bearer)).await
}

/// A request with any method, extra headers and a body (`Content-Length` is set, and
/// `Connection: close`): the backend API's JSON calls and streamed imports.
///
/// The body is written while the socket is watched for an answer, so a server that answers
/// before reading everything (a 413) is heard rather than failing the write. The answer may
/// take up to `within` to begin (an import answers once the whole file is stored); after
/// that, each read has the usual [`READ_TIMEOUT`].
pub async fn request_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    within: std::time::Duration,
) -> anyhow::Result<HttpResponse> {
    let mut stream = timeout(READ_TIMEOUT, TcpStream::connect(addr))
        .await
        .context("timed out connecting")?
        .with_context(|| format!("connecting to {addr}"))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut message = head.into_bytes();
    message.extend_from_slice(body);
    let write = async {
        let mut written = 0;
        while written < message.len() {
            tokio::select! {
                ready = stream.writable() => {
                    ready.context("waiting to write the request")?;
                    match stream.try_write(&message[written..]) {
                        Ok(n) => written += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        // The server closed its side: read what it answered.
                        Err(_) => break,
                    }
                }
                ready = stream.readable() => {
                    ready.context("waiting for the answer")?;
                    // It answered before the whole body was sent.
                    break;
                }
            }
        }
        anyhow::Ok(())
    };
    timeout(within, write)
        .await
        .with_context(|| format!("timed out after {within:?} writing {method} {path}"))??;
    timeout(within, stream.readable())
        .await
        .with_context(|| format!("no answer to {method} {path} within {within:?}"))?
        .context("waiting for the answer")?;
    Ok(read_response(&mut stream).await?.0)
}
