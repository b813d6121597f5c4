//! Reaching a gateway: its URL resolved once, a TCP connection from a chosen loopback
//! source address, and a WebSocket session up to its `welcome`.

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde::Deserialize;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

/// A client's WebSocket.
pub type Ws = WebSocketStream<TcpStream>;

/// Read buffer of each client socket. Server frames are a few hundred bytes; tungstenite's
/// default (128 KiB, allocated up front) would make the client, not the gateway, the memory
/// hog.
const CLIENT_READ_BUFFER: usize = 4 * 1024;
/// Largest frame a client accepts from the gateway.
const CLIENT_MAX_MESSAGE: usize = 1 << 20;
/// Bound on the reachability check of a gateway or worker.
const REACH_TIMEOUT: Duration = Duration::from_secs(3);

/// The small-buffer WebSocket settings every simulated client uses.
pub fn client_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(CLIENT_READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(CLIENT_MAX_MESSAGE))
        .max_frame_size(Some(CLIENT_MAX_MESSAGE))
}

/// One gateway, resolved once so no connection waits on DNS.
#[derive(Clone, Debug)]
pub struct Target {
    /// The full WebSocket URL, path included.
    pub url: String,
    /// `host:port`.
    pub authority: String,
    pub addr: SocketAddr,
}

impl Target {
    /// Parse and resolve a `ws://` URL; the path defaults to `/v1/ws`.
    pub async fn resolve(url: &str) -> anyhow::Result<Target> {
        let uri: http::Uri = url
            .parse()
            .with_context(|| format!("--url {url:?} is not a URL"))?;
        match uri.scheme_str() {
            Some("ws") => {}
            Some("wss") => bail!("--url: wss:// is not supported; point the fleet at ws://"),
            _ => bail!("--url {url:?} must start with ws://"),
        }
        let authority = uri
            .authority()
            .with_context(|| format!("--url {url:?} has no host"))?;
        let host_port = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("") | Some("/") => "/v1/ws",
            Some(p) => p,
        };
        let addr = tokio::net::lookup_host(&host_port)
            .await
            .with_context(|| format!("cannot resolve {host_port}"))?
            .next()
            .with_context(|| format!("{host_port} resolves to no address"))?;
        Ok(Target {
            url: format!("ws://{host_port}{path}"),
            authority: host_port,
            addr,
        })
    }

    /// Fail now, with the address, when nothing accepts TCP there.
    pub async fn check_reachable(&self) -> anyhow::Result<()> {
        match timeout(REACH_TIMEOUT, TcpStream::connect(self.addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => bail!(
                "cannot reach the gateway at {} ({}): {e}",
                self.addr,
                self.url
            ),
            Err(_) => bail!(
                "cannot reach the gateway at {} ({}): no answer in {} s",
                self.addr,
                self.url,
                REACH_TIMEOUT.as_secs()
            ),
        }
    }
}

/// GET `{base}/healthz` of a worker (or any geopush HTTP server); fail fast if it is not up.
pub async fn check_http_healthy(base: &str) -> anyhow::Result<()> {
    let health = format!("{}/healthz", base.trim_end_matches('/'));
    let answer = reqwest::Client::new()
        .get(&health)
        .timeout(REACH_TIMEOUT)
        .send()
        .await
        .with_context(|| format!("cannot reach the worker at {health}"))?;
    if !answer.status().is_success() {
        bail!("the worker at {health} answered {}", answer.status());
    }
    Ok(())
}

/// The `source`-th loopback source address: 127.0.0.1, .2, … Past ~14,000 connections from
/// one address the kernel's source-port search dominates the client's CPU, and one address
/// holds at most ~28,000 connections to one port.
pub fn source_address(source: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 1 + (source % 250) as u8)
}

/// A TCP connection to `addr`, from `source` when given.
pub async fn connect_tcp(addr: SocketAddr, source: Option<Ipv4Addr>) -> std::io::Result<TcpStream> {
    let tcp = match source {
        None => TcpStream::connect(addr).await?,
        Some(source) => {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source.into(), 0))?;
            socket.connect(addr).await?
        }
    };
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// The part of a server frame the clients read.
#[derive(Deserialize)]
struct Kind<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
}

/// TCP, upgrade with `token`, wait for `welcome`. Errors are short human reasons (they are
/// counted by text in the report).
pub async fn open_session(
    target: &Target,
    token: &str,
    source: Option<Ipv4Addr>,
    config: WebSocketConfig,
) -> Result<Ws, String> {
    let mut request = target
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad request: {e}"))?;
    let bearer = http::HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|e| format!("bad token header: {e}"))?;
    request
        .headers_mut()
        .insert(http::header::AUTHORIZATION, bearer);
    let tcp = connect_tcp(target.addr, source)
        .await
        .map_err(|e| format!("tcp connect: {e}"))?;
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(request, tcp, Some(config))
        .await
        .map_err(|e| match e {
            tungstenite::Error::Http(response) => {
                let body = response
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                let body: String = body.chars().take(160).collect();
                format!("upgrade refused: HTTP {} {body}", response.status())
                    .trim_end()
                    .to_owned()
            }
            other => format!("upgrade: {other}"),
        })?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                if serde_json::from_str::<Kind>(text.as_str()).is_ok_and(|f| f.kind == "welcome") {
                    return Ok(ws);
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                return Err(format!("closed before welcome (code {code})"));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("before welcome: {e}")),
            None => return Err("connection ended before welcome".into()),
        }
    }
}

/// A close frame with code 1000 (never an empty one: older gateways mishandled it).
pub fn normal_close() -> tungstenite::protocol::CloseFrame {
    tungstenite::protocol::CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "".into(),
    }
}

/// Hint for a refused first connection.
pub fn first_failure_hint(reason: &str) -> &'static str {
    if reason.contains("401") {
        " (is --secret the gateway's --jwt-secret?)"
    } else if reason.contains("404") {
        " (the WebSocket path is /v1/ws)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls_get_the_default_path_and_refuse_wss() {
        let t = Target::resolve("ws://127.0.0.1:9").await.expect("resolve");
        assert_eq!(t.url, "ws://127.0.0.1:9/v1/ws");
        let t = Target::resolve("ws://127.0.0.1:9/x?y=1")
            .await
            .expect("resolve");
        assert_eq!(t.url, "ws://127.0.0.1:9/x?y=1");
        assert!(Target::resolve("wss://127.0.0.1:9").await.is_err());
        assert!(Target::resolve("http://127.0.0.1:9").await.is_err());
    }

    #[test]
    fn source_addresses_stay_in_loopback() {
        assert_eq!(source_address(0), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(source_address(3), Ipv4Addr::new(127, 0, 0, 4));
        assert!(source_address(1_000).is_loopback());
    }
}
