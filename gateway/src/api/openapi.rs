//! The OpenAPI 3.1 document of the backend API, generated from the code: the schemas come
//! from the request and answer types themselves (`utoipa` derives), the operations from
//! the declarations below, one per route [`super::Api`] answers. `worker/openapi.json` is
//! this document, committed; a test keeps the two equal.

use super::import::{ImportReport, RejectedRow};
use super::{Accepted, ErrorBody, ErrorDetail, NearbyAnswer, NearbyPlace, NearbyQuery};
use crate::status::{NotificationStatus, StatusState};
use geopush_proto::api::{NotificationRequest, PublishTarget};
use geopush_proto::area::{Area, Circle, Polygon};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// `POST /v1/notifications`.
#[utoipa::path(
    post,
    path = "/v1/notifications",
    tag = "notifications",
    request_body = NotificationRequest,
    responses(
        (status = 202, description = "Accepted: sent now, or scheduled for `send_at`. A repeated idempotency key returns the first id and sends nothing.", body = Accepted),
        (status = 400, description = "Malformed JSON, unknown field or target, or an invalid value; nothing was sent", body = ErrorBody),
        (status = 401, description = "Missing or unknown credentials", body = ErrorBody),
        (status = 403, description = "The caller lacks the `publish` scope", body = ErrorBody),
        (status = 408, description = "The body stopped arriving", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 503, description = "The bus is unavailable; retry with the same idempotency key", body = ErrorBody),
    ),
    security(("bearer" = ["publish"]))
)]
#[allow(dead_code)]
fn post_notification() {}

/// `GET /v1/notifications/{id}`.
#[utoipa::path(
    get,
    path = "/v1/notifications/{id}",
    tag = "notifications",
    params(("id" = String, Path, description = "The id a publish returned")),
    responses(
        (status = 200, description = "What the gateways did with it", body = NotificationStatus),
        (status = 404, description = "Unknown, or expired longer ago than the status retention (GEOPUSH_STATUS_RETENTION_SECONDS, default a day)", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    ),
    security(("bearer" = ["publish"]))
)]
#[allow(dead_code)]
fn get_notification() {}

/// `GET /v1/places`.
#[utoipa::path(
    get,
    path = "/v1/places",
    tag = "places",
    params(NearbyQuery),
    responses(
        (status = 200, description = "Places within `radius_m`, nearest first", body = NearbyAnswer),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    ),
    security(("bearer" = ["places"]))
)]
#[allow(dead_code)]
fn nearby_places() {}

/// `GET /v1/places/{id}`.
#[utoipa::path(
    get,
    path = "/v1/places/{id}",
    tag = "places",
    params(("id" = String, Path)),
    responses(
        (status = 200, description = "The place as a GeoJSON Feature", body = Object),
        (status = 400, description = "A bad escape in the id", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    ),
    security(("bearer" = ["places"]))
)]
#[allow(dead_code)]
fn get_place() {}

/// `PUT /v1/places/{id}`.
#[utoipa::path(
    put,
    path = "/v1/places/{id}",
    tag = "places",
    params(("id" = String, Path)),
    request_body(content = Object, description = "A GeoJSON Feature: Point geometry; properties name, tags, fence ({radius_m} or a Polygon), dwell_s"),
    responses(
        (status = 200, description = "Stored; the place as normalized", body = Object),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody),
    ),
    security(("bearer" = ["places"]))
)]
#[allow(dead_code)]
fn put_place() {}

/// `DELETE /v1/places/{id}`.
#[utoipa::path(
    delete,
    path = "/v1/places/{id}",
    tag = "places",
    params(("id" = String, Path)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "A bad escape in the id", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    ),
    security(("bearer" = ["places"]))
)]
#[allow(dead_code)]
fn delete_place() {}

/// `POST /v1/places:import`.
#[utoipa::path(
    post,
    path = "/v1/places:import",
    tag = "places",
    request_body(
        description = "A GeoJSON FeatureCollection or NDJSON of Features (one per line), streamed; any size",
        content(
            (String = "application/x-ndjson"),
            (String = "application/geo+json"),
        )
    ),
    responses(
        (status = 200, description = "What was imported and which rows were refused, with reasons", body = ImportReport),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ),
    security(("bearer" = ["places"]))
)]
#[allow(dead_code)]
fn import_places() {}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (scopes publish, places, admin), or a service JWT with a `scope` claim",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "geopush backend API",
        version = "1",
        description = "Publish notifications to users, areas, places, topics or everyone; read their status; manage places. Errors are {\"error\":{\"code\",\"message\"}}."
    ),
    paths(post_notification, get_notification, nearby_places, get_place, put_place, delete_place, import_places),
    components(schemas(
        NotificationRequest, PublishTarget, Area, Circle, Polygon, Accepted, NotificationStatus,
        StatusState, NearbyAnswer, NearbyPlace, ImportReport, RejectedRow, ErrorBody, ErrorDetail
    )),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// The document, as served at `/v1/openapi.json`.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as pretty JSON with a final newline: the committed file's exact text.
pub fn document_json() -> String {
    let mut text = document()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    text.push('\n');
    text
}
