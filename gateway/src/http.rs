//! The HTTP surface of a gateway: `/v1/ws` (authenticated upgrade), `/healthz`, `/readyz`,
//! `/metrics`, and the accept loop that serves them.

use crate::api::{Api, is_api_path};
use crate::auth::AuthError;
use crate::metrics::ReasonLabel;
use crate::node::Node;
use crate::session;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

type Body = Full<Bytes>;

fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// The token of an upgrade request: `Authorization: Bearer …`, else `?access_token=…`.
fn token_of(request: &Request<Incoming>) -> Option<&str> {
    if let Some(value) = request.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim());
    }
    request
        .uri()
        .query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("access_token="))
}

async fn route(
    node: Arc<Node>,
    api: Option<Arc<Api>>,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if let Some(api) = api
        && is_api_path(request.uri().path())
    {
        return Ok(api.handle(request).await);
    }
    let response = match (request.method(), request.uri().path()) {
        (&Method::GET, "/v1/ws") => upgrade(&node, &mut request),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, "/readyz") => {
            if node.is_draining() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "draining\n".into(),
                )
            } else if !node.is_ready() {
                let why = "not ready: waiting for the bus or the places\n";
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why.into())
            } else {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            }
        }
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            node.metrics.encode(),
        ),
        (_, "/v1/ws" | "/healthz" | "/readyz" | "/metrics") => json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        ),
        _ => json_error(StatusCode::NOT_FOUND, "not_found", "no such route"),
    };
    Ok(response)
}

fn refuse(node: &Node, reason: &'static str, status: StatusCode, message: &str) -> Response<Body> {
    node.metrics
        .upgrades_refused
        .get_or_create(&ReasonLabel { reason })
        .inc();
    json_error(status, reason, message)
}

/// Authenticate, take a connection slot, and switch protocols; the session runs in its own
/// tracked task. A refused request never costs a socket task.
fn upgrade(node: &Arc<Node>, request: &mut Request<Incoming>) -> Response<Body> {
    if node.is_draining() {
        return refuse(
            node,
            "draining",
            StatusCode::SERVICE_UNAVAILABLE,
            "node is draining; connect to another",
        );
    }
    let claims = match token_of(request)
        .ok_or(AuthError::Missing)
        .and_then(|t| node.verifier.verify(t))
    {
        Ok(claims) => claims,
        Err(e) => {
            debug!(error = %e, "upgrade refused: bad token");
            return refuse(
                node,
                "unauthorized",
                StatusCode::UNAUTHORIZED,
                &e.to_string(),
            );
        }
    };
    if !fastwebsockets::upgrade::is_upgrade_request(request) {
        return refuse(
            node,
            "not_websocket",
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade",
        );
    }
    let Some(slot) = node.try_acquire_slot() else {
        return refuse(
            node,
            "full",
            StatusCode::SERVICE_UNAVAILABLE,
            "node is at its connection limit",
        );
    };
    match fastwebsockets::upgrade::upgrade(request) {
        Ok((response, upgrade)) => {
            node.tasks.spawn(session::run(upgrade, claims, slot));
            response.map(|_| Full::new(Bytes::new()))
        }
        Err(e) => refuse(node, "bad_upgrade", StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

/// Serve one TCP connection: HTTP/1.1 with upgrades, the request head bounded by the
/// handshake timeout.
async fn serve_connection(
    node: Arc<Node>,
    api: Option<Arc<Api>>,
    stream: TcpStream,
    stop: CancellationToken,
) {
    let service = service_fn({
        let node = node.clone();
        move |request| route(node.clone(), api.clone(), request)
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(node.config.handshake_timeout())
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                debug!(error = %e, "http connection ended with an error");
            }
        }
        () = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(node.config.shutdown_grace(), connection).await;
        }
    }
}

/// Accept connections until `stop` is cancelled.
pub(crate) async fn accept_loop(
    node: Arc<Node>,
    api: Option<Arc<Api>>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                node.tasks.spawn(serve_connection(
                    node.clone(),
                    api.clone(),
                    stream,
                    node.hard_stop.clone(),
                ));
            }
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
    }
}
