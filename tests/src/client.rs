//! `WsClient`: a real WebSocket client (tokio-tungstenite) for tests.
//!
//! A background task reads the socket continuously and forwards every event to a channel,
//! so the client answers the server's WebSocket pings like a live app does (tungstenite
//! replies while reading) even while the test is busy elsewhere. Reads from the channel
//! carry timeouts. A client that must *not* read is a [`crate::RawWsClient`].

use crate::READ_TIMEOUT;
use anyhow::{Context, anyhow, bail};
use futures_util::SinkExt;
use futures_util::stream::{SplitSink, StreamExt};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Stream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Something that happened on the connection, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum WsEvent {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// A close frame: its code (if any) and reason.
    Close(Option<u16>, String),
    /// The stream ended; `Some` with the error when it did not end cleanly.
    Ended(Option<String>),
}

/// A connected WebSocket client.
pub struct WsClient {
    sink: SplitSink<Stream, Message>,
    events: mpsc::UnboundedReceiver<WsEvent>,
    reader: JoinHandle<()>,
}

impl Drop for WsClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// How the token travels in the upgrade request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenIn {
    Header,
    Query,
}

impl WsClient {
    /// Connect to `/v1/ws` with `Authorization: Bearer <token>`.
    pub async fn connect(addr: SocketAddr, token: &str) -> anyhow::Result<WsClient> {
        WsClient::connect_with(addr, token, TokenIn::Header).await
    }

    /// Connect to `/v1/ws?access_token=<token>`.
    pub async fn connect_query(addr: SocketAddr, token: &str) -> anyhow::Result<WsClient> {
        WsClient::connect_with(addr, token, TokenIn::Query).await
    }

    pub async fn connect_with(
        addr: SocketAddr,
        token: &str,
        token_in: TokenIn,
    ) -> anyhow::Result<WsClient> {
        let url = match token_in {
            TokenIn::Header => format!("ws://{addr}/v1/ws"),
            TokenIn::Query => format!("ws://{addr}/v1/ws?access_token={token}"),
        };
        let mut request = url.into_client_request().context("building the request")?;
        if token_in == TokenIn::Header {
            request.headers_mut().insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {token}")).context("token header")?,
            );
        }
        let (stream, _response) =
            tokio::time::timeout(READ_TIMEOUT, tokio_tungstenite::connect_async(request))
                .await
                .context("timed out connecting")?
                .map_err(|e| match e {
                    tokio_tungstenite::tungstenite::Error::Http(response) => anyhow!(
                        "upgrade refused: {} {}",
                        response.status(),
                        response
                            .body()
                            .as_deref()
                            .map(String::from_utf8_lossy)
                            .unwrap_or_default()
                    ),
                    other => anyhow!(other).context("WebSocket connect"),
                })?;
        let (sink, mut stream) = stream.split();
        let (tx, events) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                let event = match stream.next().await {
                    Some(Ok(Message::Text(text))) => WsEvent::Text(text.as_str().to_owned()),
                    Some(Ok(Message::Binary(bytes))) => WsEvent::Binary(bytes.to_vec()),
                    Some(Ok(Message::Ping(bytes))) => WsEvent::Ping(bytes.to_vec()),
                    Some(Ok(Message::Pong(bytes))) => WsEvent::Pong(bytes.to_vec()),
                    Some(Ok(Message::Close(frame))) => match frame {
                        Some(f) => WsEvent::Close(Some(u16::from(f.code)), f.reason.to_string()),
                        None => WsEvent::Close(None, String::new()),
                    },
                    Some(Ok(Message::Frame(_))) => continue,
                    Some(Err(e)) => {
                        let _ = tx.send(WsEvent::Ended(Some(e.to_string())));
                        return;
                    }
                    None => {
                        let _ = tx.send(WsEvent::Ended(None));
                        return;
                    }
                };
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        Ok(WsClient {
            sink,
            events,
            reader,
        })
    }

    /// Connect and read the `welcome` frame, which must come first.
    pub async fn connect_welcomed(
        addr: SocketAddr,
        token: &str,
    ) -> anyhow::Result<(WsClient, Value)> {
        let mut client = WsClient::connect(addr, token).await?;
        let welcome = client.expect_type("welcome", READ_TIMEOUT).await?;
        Ok((client, welcome))
    }

    /// The next event, whatever it is.
    pub async fn next_event(&mut self, within: Duration) -> anyhow::Result<WsEvent> {
        match tokio::time::timeout(within, self.events.recv()).await {
            Ok(Some(event)) => Ok(event),
            Ok(None) => bail!("the connection's reader is gone (stream already ended)"),
            Err(_) => bail!("no event within {within:?}"),
        }
    }

    /// The next text frame; WebSocket pings and pongs are skipped, anything else is an error.
    pub async fn recv_text(&mut self, within: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let event = timeout_at(deadline, self.events.recv())
                .await
                .map_err(|_| anyhow!("no text frame within {within:?}"))?
                .context("the connection's reader is gone")?;
            match event {
                WsEvent::Text(text) => return Ok(text),
                WsEvent::Ping(_) | WsEvent::Pong(_) => continue,
                other => bail!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next text frame as JSON.
    pub async fn recv_json(&mut self, within: Duration) -> anyhow::Result<Value> {
        let text = self.recv_text(within).await?;
        serde_json::from_str(&text).with_context(|| format!("not JSON: {text:?}"))
    }

    /// The next text frame, which must be JSON of type `kind`.
    pub async fn expect_type(&mut self, kind: &str, within: Duration) -> anyhow::Result<Value> {
        let value = self.recv_json(within).await?;
        if value["type"] != kind {
            bail!("expected a {kind:?} frame, got {value}");
        }
        Ok(value)
    }

    /// The next text frame, which must be an `error` with `code`.
    pub async fn expect_error(&mut self, code: &str) -> anyhow::Result<Value> {
        let value = self.expect_type("error", READ_TIMEOUT).await?;
        if value["code"] != code {
            bail!("expected error code {code:?}, got {value}");
        }
        if !value["message"].is_string() {
            bail!("error frame without a message: {value}");
        }
        Ok(value)
    }

    /// The next event other than a ping/pong must be a close frame with `code`.
    pub async fn expect_close(&mut self, code: u16, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await? {
                WsEvent::Ping(_) | WsEvent::Pong(_) => continue,
                WsEvent::Close(Some(got), _) if got == code => return Ok(()),
                other => bail!("expected close {code}, got {other:?}"),
            }
        }
    }

    /// Collect the text frames until a close frame (returned with its code) or the end of
    /// the stream (`None`).
    pub async fn recv_until_close(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<(Vec<Value>, Option<u16>)> {
        let deadline = Instant::now() + within;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .next_event(left)
                .await
                .with_context(|| format!("waiting for a close after {} frames", frames.len()))?
            {
                WsEvent::Text(text) => frames.push(
                    serde_json::from_str(&text).with_context(|| format!("not JSON: {text:?}"))?,
                ),
                WsEvent::Ping(_) | WsEvent::Pong(_) => {}
                WsEvent::Close(code, _) => return Ok((frames, code)),
                WsEvent::Ended(_) => return Ok((frames, None)),
                WsEvent::Binary(_) => bail!("unexpected binary frame"),
            }
        }
    }

    /// Read notifications until the one with id `sentinel`; return the frames before it.
    /// Publishing a sentinel to everyone after a delivery tells each client when it has seen
    /// all it will get.
    pub async fn frames_before(
        &mut self,
        sentinel: &str,
        within: Duration,
    ) -> anyhow::Result<Vec<Value>> {
        let deadline = Instant::now() + within;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self
                .recv_json(left)
                .await
                .with_context(|| format!("waiting for sentinel {sentinel:?}"))?;
            if frame["type"] == "notification" && frame["id"] == sentinel {
                return Ok(before);
            }
            before.push(frame);
        }
    }

    /// Send a text frame.
    pub async fn send_text(&mut self, text: impl Into<String>) -> anyhow::Result<()> {
        self.sink
            .send(Message::text(text.into()))
            .await
            .context("sending a text frame")
    }

    /// Send a JSON value as a text frame.
    pub async fn send_json(&mut self, value: &Value) -> anyhow::Result<()> {
        self.send_text(value.to_string()).await
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.sink
            .send(Message::Binary(Bytes::from(bytes)))
            .await
            .context("sending a binary frame")
    }

    /// Send a WebSocket-level ping.
    pub async fn send_ping(&mut self, payload: Vec<u8>) -> anyhow::Result<()> {
        self.sink
            .send(Message::Ping(Bytes::from(payload)))
            .await
            .context("sending a ping")
    }

    /// Send a `location` fix.
    pub async fn send_fix(&mut self, lat: f64, lon: f64) -> anyhow::Result<()> {
        self.send_json(&serde_json::json!({
            "type": "location",
            "lat": lat,
            "lon": lon,
            "accuracy_m": 5,
            "ts": crate::tokens::now_unix_ms(),
        }))
        .await
    }

    /// App-level `ping` with `id`; the very next text frame must be the `pong` with that id.
    /// Frames are handled in order, so this also proves everything sent before was handled.
    pub async fn roundtrip(&mut self, id: u64) -> anyhow::Result<()> {
        self.send_json(&serde_json::json!({"type": "ping", "id": id}))
            .await?;
        let pong = self.expect_type("pong", READ_TIMEOUT).await?;
        if pong["id"] != id {
            bail!("pong for id {id} carried {pong}");
        }
        Ok(())
    }

    /// Start a normal close (1000).
    pub async fn close(&mut self) -> anyhow::Result<()> {
        self.sink
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            })))
            .await
            .context("sending close")
    }
}
