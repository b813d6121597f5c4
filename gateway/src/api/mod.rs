//! The backend HTTP API v1 (DESIGN §5): publish, status, places, import, OpenAPI.
//!
//! One implementation serves both deployments: the worker serves it with a Redis publisher
//! and the Redis places store, and a single-node gateway serves it beside `/v1/ws` with its
//! in-memory bus and places replica. (It lives in the gateway library because the gateway
//! binary serves it in single-node mode and the worker depends on this library; Cargo allows
//! no cycle between the two crates.)
//!
//! Every answer that is not a success is `{"error":{"code","message"}}` with the status
//! that fits: 400 for a bad request (the code names what was wrong), 401 without valid
//! credentials, 403 without the scope, 404, 405, 413 for a body over the limit, 503 when
//! the bus is away. A refused request sends nothing.

mod import;
pub mod keys;
pub mod openapi;

use crate::bus::places_sync::{PlacesFollower, PlacesStore};
use crate::config::ApiConfig;
use crate::publish::{PublishError, Publisher, target_kind, unix_ms};
use crate::status::NotificationStatus;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use keys::{ApiAuth, Denied, Scope};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tracing::{info, warn};
use utoipa::ToSchema;

pub use import::ImportReport;

type Body = Full<Bytes>;

/// `geopush_publish_requests_total{status}`: publish requests by HTTP status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: u16,
}

/// The API's metrics.
#[derive(Clone, Default)]
pub struct ApiMetrics {
    pub publish_requests: Family<StatusLabel, Counter>,
}

impl ApiMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "geopush_publish_requests",
            "POST /v1/notifications requests by HTTP status",
            self.publish_requests.clone(),
        );
    }
}

/// An error answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

/// The error body.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: `code` is stable and machine-readable, `message` is for people.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }
    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    fn unavailable(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the bus is unavailable: {e}"),
        )
    }

    pub fn into_response(self) -> Response<Body> {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        json_response(self.status, &body)
    }
}

/// A JSON answer.
pub fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A serde error as a 400: bad JSON syntax, or JSON of the wrong shape. `body` tells the two
/// apart (serde reports some shape errors, like a second `target` key, as syntax).
fn json_error(e: &serde_json::Error, body: &[u8]) -> ApiError {
    let message = e.to_string();
    let is_json = serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok();
    let code = match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof if !is_json => {
            "invalid_json"
        }
        _ if message.starts_with("unknown field") => "unknown_field",
        _ if message.starts_with("unknown variant") => "unknown_target",
        _ => "invalid_request",
    };
    ApiError::bad_request(code, message)
}

/// `202` answer of `POST /v1/notifications`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub id: String,
    /// RFC 3339, when scheduled for later.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub send_at: Option<String>,
}

/// One place of a nearby query.
#[derive(Serialize, ToSchema)]
pub struct NearbyPlace {
    pub id: String,
    pub name: String,
    pub lat: f64,
    pub lon: f64,
    pub distance_m: f64,
    #[schema(value_type = Object)]
    pub tags: serde_json::Map<String, serde_json::Value>,
}

/// `GET /v1/places?lat&lon&radius_m&limit`.
#[derive(Serialize, ToSchema)]
pub struct NearbyAnswer {
    /// Nearest first.
    pub places: Vec<NearbyPlace>,
}

/// The query of a nearby search.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NearbyQuery {
    #[param(minimum = -90, maximum = 90)]
    pub lat: f64,
    #[param(minimum = -180, maximum = 180)]
    pub lon: f64,
    /// Metres, > 0 and at most the configured maximum (default 100 km).
    #[param(exclusive_minimum = 0, maximum = 100000)]
    pub radius_m: f64,
    /// At most the configured maximum (default 1,000); default 20.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

/// The backend API of one process.
pub struct Api {
    publisher: Publisher,
    /// Nearby queries and (single-node) the place store itself.
    replica: Arc<dyn PlacesFollower>,
    /// With Redis: where places are written and read by id.
    store: Option<PlacesStore>,
    auth: ApiAuth,
    config: ApiConfig,
    metrics: ApiMetrics,
}

/// Paths this API answers (the single-node gateway routes these here).
pub fn is_api_path(path: &str) -> bool {
    path == "/v1/notifications"
        || path.starts_with("/v1/notifications/")
        || path == "/v1/places"
        || path.starts_with("/v1/places/")
        || path == "/v1/places:import"
        || path == "/v1/openapi.json"
}

const DEFAULT_NEARBY_LIMIT: usize = 20;

impl Api {
    pub fn new(
        publisher: Publisher,
        replica: Arc<dyn PlacesFollower>,
        store: Option<PlacesStore>,
        auth: ApiAuth,
        config: ApiConfig,
        metrics: ApiMetrics,
    ) -> Api {
        if config.api_keys.is_none() {
            warn!(
                key = crate::config::DEV_API_KEY,
                "INSECURE: no API keys configured; the development API key (every scope) is \
                 accepted. Set GEOPUSH_API_KEYS in production."
            );
        }
        Api {
            publisher,
            replica,
            store,
            auth,
            config,
            metrics,
        }
    }

    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// Answer one request on an API path.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        match self.route(request).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        }
    }

    fn authorize(&self, request: &Request<Incoming>, scope: Scope) -> Result<(), ApiError> {
        let header = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match self.auth.authorize(header, scope) {
            Ok(_) => Ok(()),
            Err(Denied::Unauthenticated(why)) => {
                Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", why))
            }
            Err(Denied::MissingScope { caller, scope }) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("{caller:?} lacks the {:?} scope", scope.as_str()),
            )),
        }
    }

    async fn route(&self, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        let path = request.uri().path().to_owned();
        let method = request.method().clone();
        match (&method, path.as_str()) {
            (&Method::GET, "/v1/openapi.json") => {
                Ok(json_response(StatusCode::OK, &openapi::document()))
            }
            (&Method::POST, "/v1/notifications") => {
                let response = self.post_notification(request).await;
                let status = match &response {
                    Ok(r) => r.status(),
                    Err(e) => e.status,
                };
                self.metrics
                    .publish_requests
                    .get_or_create(&StatusLabel {
                        status: status.as_u16(),
                    })
                    .inc();
                response
            }
            (&Method::GET, "/v1/places") => {
                self.authorize(&request, Scope::Places)?;
                self.nearby(request.uri().query().unwrap_or_default())
            }
            (&Method::POST, "/v1/places:import") => {
                self.authorize(&request, Scope::Places)?;
                let content_type = request
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let report = import::import(
                    request.into_body(),
                    content_type.as_deref(),
                    &self.config,
                    self.replica.as_ref(),
                    self.store.as_ref(),
                )
                .await?;
                info!(
                    imported = report.imported,
                    rejected = report.rejected,
                    "places imported"
                );
                Ok(json_response(StatusCode::OK, &report))
            }
            (method, path) => {
                if let Some(id) = path.strip_prefix("/v1/notifications/") {
                    if method != Method::GET {
                        return Err(method_not_allowed("GET"));
                    }
                    self.authorize(&request, Scope::Publish)?;
                    return self.get_status(id).await;
                }
                if let Some(id) = path.strip_prefix("/v1/places/") {
                    let id = percent_decode(id)
                        .ok_or_else(|| ApiError::bad_request("invalid_id", "bad escape in id"))?;
                    return match *method {
                        Method::GET => {
                            self.authorize(&request, Scope::Places)?;
                            self.get_place(&id).await
                        }
                        Method::PUT => {
                            self.authorize(&request, Scope::Places)?;
                            self.put_place(&id, request).await
                        }
                        Method::DELETE => {
                            self.authorize(&request, Scope::Places)?;
                            self.delete_place(&id).await
                        }
                        _ => Err(method_not_allowed("GET, PUT, DELETE")),
                    };
                }
                Err(match path {
                    "/v1/notifications" | "/v1/places:import" => method_not_allowed("POST"),
                    "/v1/places" | "/v1/openapi.json" => method_not_allowed("GET"),
                    _ => ApiError::not_found("no such route"),
                })
            }
        }
    }

    /// The whole body, at most `api_max_body_bytes`.
    async fn body(&self, request: Request<Incoming>) -> Result<Bytes, ApiError> {
        let limit = self.config.api_max_body_bytes;
        let timeout = self.config.body_timeout();
        let collected =
            tokio::time::timeout(timeout, Limited::new(request.into_body(), limit).collect())
                .await
                .map_err(|_| body_timeout(timeout))?;
        collected.map(|b| b.to_bytes()).map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the body exceeds {limit} bytes"),
                )
            } else {
                ApiError::bad_request("bad_body", format!("reading the body failed: {e}"))
            }
        })
    }

    async fn post_notification(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        self.authorize(&request, Scope::Publish)?;
        let body = self.body(request).await?;
        let notification: geopush_proto::api::NotificationRequest =
            serde_json::from_slice(&body).map_err(|e| json_error(&e, &body))?;
        let kind = target_kind(&notification.target);
        let published = self
            .publisher
            .publish(&notification)
            .await
            .map_err(|e| match e {
                PublishError::Invalid(e) => ApiError::bad_request(e.code(), e.to_string()),
                PublishError::UnknownPlace(_) => {
                    ApiError::bad_request("unknown_place", e.to_string())
                }
                PublishError::PlaceWithoutFence(_) => {
                    ApiError::bad_request("place_without_fence", e.to_string())
                }
                PublishError::StoredRequest(_) => {
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                }
                PublishError::Bus(e) => ApiError::unavailable(e),
            })?;
        info!(id = %published.id, kind, queued = published.queued, "notification accepted");
        Ok(json_response(
            StatusCode::ACCEPTED,
            &Accepted {
                id: published.id,
                send_at: published
                    .scheduled_ms
                    .map(geopush_proto::api::format_rfc3339_ms),
            },
        ))
    }

    async fn get_status(&self, id: &str) -> Result<Response<Body>, ApiError> {
        let status: Option<NotificationStatus> = self
            .publisher
            .status()
            .get(id, unix_ms())
            .await
            .map_err(ApiError::unavailable)?;
        match status {
            Some(status) => Ok(json_response(StatusCode::OK, &status)),
            None => Err(ApiError::not_found(format!(
                "no notification {id:?} (or it expired long ago)"
            ))),
        }
    }

    fn nearby(&self, query: &str) -> Result<Response<Body>, ApiError> {
        let mut lat = None;
        let mut lon = None;
        let mut radius_m = None;
        let mut limit = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = || {
                value.parse::<f64>().map_err(|_| {
                    ApiError::bad_request("invalid_query", format!("{name} must be a number"))
                })
            };
            match name {
                "lat" => lat = Some(number()?),
                "lon" => lon = Some(number()?),
                "radius_m" => radius_m = Some(number()?),
                "limit" => {
                    limit = Some(value.parse::<usize>().map_err(|_| {
                        ApiError::bad_request("invalid_query", "limit must be a positive integer")
                    })?)
                }
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_query",
                        format!("unknown parameter {name:?}"),
                    ));
                }
            }
        }
        let (Some(lat), Some(lon), Some(radius_m)) = (lat, lon, radius_m) else {
            return Err(ApiError::bad_request(
                "invalid_query",
                "lat, lon and radius_m are required",
            ));
        };
        let in_range = lat.is_finite()
            && (-90.0..=90.0).contains(&lat)
            && lon.is_finite()
            && (-180.0..=180.0).contains(&lon);
        if !in_range {
            return Err(ApiError::bad_request(
                "invalid_coordinates",
                "lat must be in [-90, 90] and lon in [-180, 180]",
            ));
        }
        let max_radius = self.config.api_max_nearby_radius_m;
        if !(radius_m.is_finite() && radius_m > 0.0 && radius_m <= max_radius) {
            return Err(ApiError::bad_request(
                "invalid_radius",
                format!("radius_m must be > 0 and <= {max_radius}"),
            ));
        }
        let limit = limit.unwrap_or(DEFAULT_NEARBY_LIMIT);
        if limit == 0 || limit > self.config.api_max_nearby_limit {
            return Err(ApiError::bad_request(
                "invalid_limit",
                format!("limit must be in 1..={}", self.config.api_max_nearby_limit),
            ));
        }
        let snapshot = self.replica.replica().snapshot();
        let mut hits = Vec::new();
        snapshot.nearby(
            &crate::geo::unit_vector(lat, lon),
            radius_m,
            limit,
            &mut hits,
        );
        let places = hits
            .iter()
            .map(|hit| {
                let place = &snapshot.entry(hit.index).place;
                NearbyPlace {
                    id: place.id.clone(),
                    name: place.name.clone(),
                    lat: place.lat,
                    lon: place.lon,
                    distance_m: (hit.distance_m * 10.0).round() / 10.0,
                    tags: place.tags.clone(),
                }
            })
            .collect();
        Ok(json_response(StatusCode::OK, &NearbyAnswer { places }))
    }

    async fn get_place(&self, id: &str) -> Result<Response<Body>, ApiError> {
        let feature = match &self.store {
            Some(store) => store
                .get(id)
                .await
                .map_err(ApiError::unavailable)?
                .and_then(|f| serde_json::from_str::<serde_json::Value>(&f).ok()),
            None => self
                .replica
                .replica()
                .snapshot()
                .get(id)
                .map(|(_, e)| e.place.to_feature()),
        };
        match feature {
            Some(feature) => Ok(json_response(StatusCode::OK, &feature)),
            None => Err(ApiError::not_found(format!("no place {id:?}"))),
        }
    }

    async fn put_place(
        &self,
        id: &str,
        request: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        let body = self.body(request).await?;
        let mut value: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| json_error(&e, &body))?;
        let Some(object) = value.as_object_mut() else {
            return Err(ApiError::bad_request(
                "invalid_place",
                "a place is a GeoJSON Feature object",
            ));
        };
        match object.get("id") {
            None => {
                object.insert("id".into(), serde_json::Value::String(id.to_owned()));
            }
            Some(given) => {
                let same = given.as_str() == Some(id)
                    || given.as_i64().map(|n| n.to_string()).as_deref() == Some(id);
                if !same {
                    return Err(ApiError::bad_request(
                        "id_mismatch",
                        "the Feature's id differs from the id in the path",
                    ));
                }
            }
        }
        let place = geopush_proto::Place::from_feature(&value)
            .map_err(|e| ApiError::bad_request("invalid_place", e.to_string()))?;
        let feature = place.to_feature();
        match &self.store {
            Some(store) => store
                .upsert(std::slice::from_ref(&place))
                .await
                .map_err(ApiError::unavailable)?,
            None => {
                self.replica.replica().apply(vec![place], &[id.to_owned()]);
                self.replica.changed();
            }
        }
        Ok(json_response(StatusCode::OK, &feature))
    }

    async fn delete_place(&self, id: &str) -> Result<Response<Body>, ApiError> {
        let existed = match &self.store {
            Some(store) => store
                .delete_existing(id)
                .await
                .map_err(ApiError::unavailable)?,
            None => {
                let existed = self.replica.replica().snapshot().get(id).is_some();
                if existed {
                    self.replica.replica().apply(Vec::new(), &[id.to_owned()]);
                    self.replica.changed();
                }
                existed
            }
        };
        if !existed {
            return Err(ApiError::not_found(format!("no place {id:?}")));
        }
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::NO_CONTENT;
        Ok(response)
    }
}

/// 408: the client stopped sending the body it announced.
pub(super) fn body_timeout(timeout: std::time::Duration) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "body_timeout",
        format!("no body bytes for {:.0} s", timeout.as_secs_f64()),
    )
}

fn method_not_allowed(allowed: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("use {allowed}"),
    )
}

/// Decode `%XX` escapes of a path segment; `None` for a broken escape or bad UTF-8.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_decoded() {
        assert_eq!(percent_decode("caf%C3%A9-17").as_deref(), Some("café-17"));
        assert_eq!(percent_decode("a%2"), None);
        assert_eq!(percent_decode("%FF"), None);
        assert_eq!(percent_decode(""), None);
    }
}
