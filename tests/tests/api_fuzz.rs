//! Schema-driven fuzzing of the backend HTTP API (DESIGN §5, §8) on a single-node gateway.
//!
//! The operations come from the OpenAPI document (`api::openapi::document()`, the one the
//! gateway serves: `openapi.rs` checks that): for each one, request bodies, query strings
//! and path ids are generated from its schemas (objects with their required and optional
//! properties, `oneOf` variants, enums, numbers inside and just outside their bounds,
//! strings around `maxLength`, arrays), then mutated: required fields dropped,
//! wrong types, NaN-like strings and raw tokens, huge numbers, deep nesting, unknown and
//! duplicate fields, invalid UTF-8, bad escapes, truncation, empty and oversized bodies,
//! odd content types, chunked bodies, bad credentials. Where the document only says "an
//! object" (a place, an import row) a local schema of the GeoJSON Feature stands in.
//!
//! Every answer must come within [`REQUEST_TIMEOUT`]; none may be a 5xx; every answer that
//! is not a success is `{"error":{"code","message"}}` as JSON; every success body matches
//! the schema the document gives for it. Each operation must also succeed sometimes (so the
//! generator is not only producing garbage): a schema-valid publish with a valid target
//! gets 202. An NDJSON import's report counts every row. Statuses an operation answers that
//! its documentation does not list are printed (`--nocapture`), not failed.
//!
//! Three tests pin product bugs this found, now fixed: the document's polygon target shape
//! was refused by the server, worst-case polygons cost O(n²) to validate, and a stalled
//! request body was waited for forever.
//!
//! The RNG is seeded ([`DEFAULT_SEED`], or `GEOPUSH_FUZZ_SEED`), one stream per operation, so
//! a failure reproduces: `GEOPUSH_FUZZ_SEED=<seed> cargo test -p geopush-tests --test
//! api_fuzz -- --nocapture`. `GEOPUSH_FUZZ_REQUESTS` changes the requests per operation.

use anyhow::{Context, bail};
use geopush_gateway::api::openapi::document;
use geopush_gateway::config::{Config, DEV_API_KEY};
use geopush_tests::http::HttpResponse;
use geopush_tests::{TestGateway, test_config};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The seed when `GEOPUSH_FUZZ_SEED` is unset.
const DEFAULT_SEED: u64 = 20_261_122;
/// Requests per operation when `GEOPUSH_FUZZ_REQUESTS` is unset.
const REQUESTS_PER_OPERATION: usize = 300;
/// Requests per path with a method the document does not list for it.
const WRONG_METHOD_REQUESTS: usize = 12;
/// The bound on one whole exchange (connect, send, answer to the end): past it, a hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Body limit of the fuzzed gateway: small, so oversized bodies are cheap to send.
const FUZZ_MAX_BODY_BYTES: usize = 64 * 1024;
/// Import row limit of the fuzzed gateway.
const FUZZ_MAX_ROW_BYTES: usize = 16 * 1024;
/// Largest request target generated: far below any HTTP parser's limit, so every request
/// reaches the API.
const MAX_TARGET_LEN: usize = 6_000;

fn seed() -> u64 {
    std::env::var("GEOPUSH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED)
}

fn requests_per_operation() -> usize {
    std::env::var("GEOPUSH_FUZZ_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(REQUESTS_PER_OPERATION)
}

/// A stable hash of an operation id, to give each operation its own RNG stream.
fn stream_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------------------
// HTTP: raw bytes out, one response back, everything under one timeout.

#[derive(Clone, Debug)]
struct Request {
    method: String,
    /// Path and query, exactly as sent.
    target: String,
    /// Extra headers (`Authorization` included when present).
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send the body with `Transfer-Encoding: chunked` in these chunk sizes.
    chunks: Option<Vec<usize>>,
}

impl Request {
    fn new(method: &str, target: &str) -> Request {
        Request {
            method: method.to_owned(),
            target: target.to_owned(),
            headers: vec![("Authorization".into(), format!("Bearer {DEV_API_KEY}"))],
            body: Vec::new(),
            chunks: None,
        }
    }

    fn json(mut self, body: Vec<u8>) -> Request {
        self.headers
            .push(("Content-Type".into(), "application/json".into()));
        self.body = body;
        self
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn set_header(&mut self, name: &str, value: Option<String>) {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        if let Some(value) = value {
            self.headers.push((name.to_owned(), value));
        }
    }

    fn bytes(&self, addr: SocketAddr) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n",
            self.method, self.target
        )
        .into_bytes();
        for (name, value) in &self.headers {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        match &self.chunks {
            None => {
                out.extend_from_slice(
                    format!("Content-Length: {}\r\n\r\n", self.body.len()).as_bytes(),
                );
                out.extend_from_slice(&self.body);
            }
            Some(sizes) => {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                let mut rest = self.body.as_slice();
                let mut sizes = sizes.iter().copied().cycle();
                while !rest.is_empty() {
                    let n = sizes.next().unwrap_or(rest.len()).clamp(1, rest.len());
                    out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                    out.extend_from_slice(&rest[..n]);
                    out.extend_from_slice(b"\r\n");
                    rest = &rest[n..];
                }
                out.extend_from_slice(b"0\r\n\r\n");
            }
        }
        out
    }

    /// The request for a failure report: the head, and the body escaped (long bodies cut).
    fn describe(&self) -> String {
        let mut text = format!("{} {}\n", self.method, self.target);
        for (name, value) in &self.headers {
            text.push_str(&format!("  {name}: {value}\n"));
        }
        if self.chunks.is_some() {
            text.push_str("  Transfer-Encoding: chunked\n");
        }
        text.push_str(&format!(
            "  body ({} bytes): {}",
            self.body.len(),
            escape(&self.body, 600)
        ));
        text
    }
}

/// Bytes as a Rust-like byte string, at most `max` bytes shown.
fn escape(bytes: &[u8], max: usize) -> String {
    let shown: String = bytes
        .iter()
        .take(max)
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect();
    if bytes.len() > max {
        format!("b\"{shown}\"… ({} more bytes)", bytes.len() - max)
    } else {
        format!("b\"{shown}\"")
    }
}

/// Send `request` on a new connection and read the whole answer (the server closes after
/// it: `Connection: close`). The body is written while the answer is read, so an early
/// answer (413) is seen even when the server stops reading.
async fn exchange(addr: SocketAddr, request: &Request) -> anyhow::Result<HttpResponse> {
    let bytes = request.bytes(addr);
    let attempt = async {
        let stream = TcpStream::connect(addr).await.context("connecting")?;
        let (mut reader, mut writer) = stream.into_split();
        let write = async move {
            // A write refused after an early answer is not an error of the server.
            let _ = writer.write_all(&bytes).await;
            writer
        };
        let read = async {
            let mut answer = Vec::new();
            let result = reader.read_to_end(&mut answer).await;
            (answer, result)
        };
        let (_writer, (answer, result)) = tokio::join!(write, read);
        parse_response(&answer, request.method == "HEAD").with_context(|| match result {
            Ok(_) => format!("{} bytes before EOF", answer.len()),
            Err(e) => format!("{} bytes, then the read failed: {e}", answer.len()),
        })
    };
    tokio::time::timeout(REQUEST_TIMEOUT, attempt)
        .await
        .with_context(|| format!("no complete answer within {REQUEST_TIMEOUT:?}"))?
}

/// Parse one complete HTTP/1.1 response (`Content-Length`, chunked, or to EOF; none for a
/// `HEAD`, a 204 or a 304).
fn parse_response(bytes: &[u8], head_request: bool) -> anyhow::Result<HttpResponse> {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no complete response head")?;
    let head = std::str::from_utf8(&bytes[..end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("bad header line {line:?}"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let mut response = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    let rest = &bytes[end + 4..];
    if head_request || status == 204 || status == 304 {
        return Ok(response);
    }
    if response
        .header("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        let mut rest = rest;
        loop {
            let line_end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .context("truncated chunk size")?;
            let size = std::str::from_utf8(&rest[..line_end])
                .ok()
                .and_then(|s| {
                    usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok()
                })
                .context("bad chunk size")?;
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            if rest.len() < size + 2 {
                bail!("truncated chunk");
            }
            response.body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
    } else if let Some(length) = response.header("content-length") {
        let length: usize = length.parse().context("bad content-length")?;
        if rest.len() < length {
            bail!("body truncated: {} of {length} bytes", rest.len());
        }
        response.body = rest[..length].to_vec();
    } else {
        response.body = rest.to_vec();
    }
    Ok(response)
}

// ---------------------------------------------------------------------------------------
// The document: operations, `$ref`s, and a small JSON Schema checker for success bodies.

#[derive(Clone, Debug)]
struct Param {
    name: String,
    /// `path` or `query`.
    location: String,
    required: bool,
    schema: Value,
}

#[derive(Clone, Debug)]
struct Operation {
    id: String,
    method: String,
    /// The path template, e.g. `/v1/places/{id}`.
    path: String,
    params: Vec<Param>,
    /// The request body: its media type and schema.
    body: Option<(String, Value)>,
    /// Documented responses by status.
    responses: Map<String, Value>,
}

impl Operation {
    fn documents(&self, status: u16) -> bool {
        self.responses.contains_key(&status.to_string())
    }

    /// The JSON schema of a documented answer with this status, if it has one.
    fn answer_schema(&self, status: u16) -> Option<&Value> {
        self.responses
            .get(&status.to_string())?
            .pointer("/content/application~1json/schema")
    }
}

/// Every operation of the document, in document order.
fn operations(doc: &Value) -> Vec<Operation> {
    let mut out = Vec::new();
    let Some(paths) = doc["paths"].as_object() else {
        return out;
    };
    for (path, item) in paths {
        let Some(item) = item.as_object() else {
            continue;
        };
        for (method, op) in item {
            if !["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                continue;
            }
            let params = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .map(|p| Param {
                            name: p["name"].as_str().unwrap_or_default().to_owned(),
                            location: p["in"].as_str().unwrap_or_default().to_owned(),
                            required: p["required"].as_bool().unwrap_or(false),
                            schema: p["schema"].clone(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let body = op["requestBody"]["content"]
                .as_object()
                .and_then(|content| {
                    content
                        .iter()
                        .next()
                        .map(|(media, m)| (media.clone(), m["schema"].clone()))
                });
            out.push(Operation {
                id: op["operationId"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("{method} {path}")),
                method: method.to_ascii_uppercase(),
                path: path.clone(),
                params,
                body,
                responses: op["responses"].as_object().cloned().unwrap_or_default(),
            });
        }
    }
    out
}

/// Schemas with their `$ref`s resolved against the document.
#[derive(Clone, Copy)]
struct Schemas<'d> {
    doc: &'d Value,
}

impl<'d> Schemas<'d> {
    fn resolve<'s>(&self, mut schema: &'s Value) -> &'s Value
    where
        'd: 's,
    {
        for _ in 0..32 {
            match schema.get("$ref").and_then(Value::as_str) {
                Some(r) => match r.strip_prefix('#').and_then(|p| self.doc.pointer(p)) {
                    Some(target) => schema = target,
                    None => return &Value::Null,
                },
                None => return schema,
            }
        }
        schema
    }

    /// The schema's types (`type` may be one name or a list).
    fn types(schema: &Value) -> Vec<&str> {
        match &schema["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }

    /// Check `value` against `schema` (the keywords this document uses); the error names
    /// the place.
    fn check(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema);
        if let Some(variants) = schema["oneOf"].as_array() {
            let matching = variants
                .iter()
                .filter(|v| self.check(v, value, at).is_ok())
                .count();
            if matching != 1 {
                return Err(format!("{at}: {matching} oneOf variants match {value}"));
            }
        }
        if let Some(options) = schema["enum"].as_array()
            && !options.contains(value)
        {
            return Err(format!("{at}: {value} is not one of {options:?}"));
        }
        let types = Schemas::types(schema);
        if !types.is_empty() && !types.iter().any(|t| has_type(value, t)) {
            return Err(format!("{at}: {value} is not of type {types:?}"));
        }
        match value {
            Value::Object(object) => {
                for name in schema["required"].as_array().into_iter().flatten() {
                    let name = name.as_str().unwrap_or_default();
                    if !object.contains_key(name) {
                        return Err(format!("{at}: required {name:?} is missing"));
                    }
                }
                let properties = schema["properties"].as_object();
                for (name, v) in object {
                    match properties.and_then(|p| p.get(name)) {
                        Some(s) => self.check(s, v, &format!("{at}.{name}"))?,
                        None if schema["additionalProperties"] == json!(false) => {
                            return Err(format!("{at}: unexpected property {name:?}"));
                        }
                        None => {}
                    }
                }
            }
            Value::Array(items) => {
                if let Some(s) = schema.get("items") {
                    for (i, v) in items.iter().enumerate() {
                        self.check(s, v, &format!("{at}[{i}]"))?;
                    }
                }
                if let Some(min) = schema["minItems"].as_u64()
                    && (items.len() as u64) < min
                {
                    return Err(format!("{at}: fewer than {min} items"));
                }
                if let Some(max) = schema["maxItems"].as_u64()
                    && (items.len() as u64) > max
                {
                    return Err(format!("{at}: more than {max} items"));
                }
            }
            Value::Number(n) => {
                // JSON numbers are finite: no NaN to compare.
                let x = n.as_f64().unwrap_or_default();
                if let Some(min) = schema["minimum"].as_f64()
                    && x < min
                {
                    return Err(format!("{at}: {x} < minimum {min}"));
                }
                if let Some(max) = schema["maximum"].as_f64()
                    && x > max
                {
                    return Err(format!("{at}: {x} > maximum {max}"));
                }
                if let Some(min) = schema["exclusiveMinimum"].as_f64()
                    && x <= min
                {
                    return Err(format!("{at}: {x} <= exclusiveMinimum {min}"));
                }
            }
            Value::String(s) => {
                let chars = s.chars().count() as u64;
                if let Some(max) = schema["maxLength"].as_u64()
                    && chars > max
                {
                    return Err(format!("{at}: longer than {max} characters"));
                }
                if let Some(min) = schema["minLength"].as_u64()
                    && chars < min
                {
                    return Err(format!("{at}: shorter than {min} characters"));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn has_type(value: &Value, name: &str) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "number" => value.is_number(),
        "integer" => {
            value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|x| x.fract() == 0.0)
        }
        _ => true,
    }
}

/// What the document only calls "an object": a place as a GeoJSON Feature (DESIGN §5), for
/// `PUT /v1/places/{id}` and the rows of an import.
fn feature_schema() -> Value {
    let position = json!({
        "type": "array",
        "prefixItems": [
            {"type": "number", "minimum": -180, "maximum": 180},
            {"type": "number", "minimum": -90, "maximum": 90}
        ],
        "minItems": 2, "maxItems": 2
    });
    json!({
        "type": "object",
        "required": ["type", "geometry"],
        "properties": {
            "type": {"enum": ["Feature"]},
            "id": {"type": "string", "minLength": 1, "maxLength": 128},
            "geometry": {
                "type": "object",
                "required": ["type", "coordinates"],
                "properties": {"type": {"enum": ["Point"]}, "coordinates": position}
            },
            "properties": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 80},
                    "tags": {"type": "object"},
                    "fence": {"oneOf": [
                        {
                            "type": "object",
                            "required": ["radius_m"],
                            "properties": {
                                "radius_m": {"type": "number", "exclusiveMinimum": 0, "maximum": 50000}
                            }
                        },
                        {
                            "type": "object",
                            "required": ["type", "coordinates"],
                            "properties": {
                                "type": {"enum": ["Polygon"]},
                                "coordinates": {
                                    "type": "array",
                                    "items": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}
                                }
                            }
                        }
                    ]},
                    "dwell_s": {"type": "integer", "minimum": 1, "maximum": 604800}
                }
            }
        }
    })
}

// ---------------------------------------------------------------------------------------
// Generation: values from schemas, then mutations.

/// A JSON body under construction: a value whose marker strings are replaced by raw bytes
/// when it is rendered (invalid UTF-8, `NaN`, unbalanced nesting: what a `Value` cannot hold).
struct Body {
    value: Value,
    raw: Vec<(String, Vec<u8>, bool)>,
}

impl Body {
    fn new(value: Value) -> Body {
        Body {
            value,
            raw: Vec::new(),
        }
    }

    /// A marker that renders as `bytes`: as a whole JSON value (`quoted`, the marker's
    /// quotes replaced too) or inside a string.
    fn marker(&mut self, bytes: Vec<u8>, quoted: bool) -> String {
        let marker = format!("\u{1}raw{}\u{1}", self.raw.len());
        self.raw.push((marker.clone(), bytes, quoted));
        marker
    }

    fn render(&self, pretty: bool) -> Vec<u8> {
        let mut text = if pretty {
            serde_json::to_vec_pretty(&self.value)
        } else {
            serde_json::to_vec(&self.value)
        }
        .unwrap_or_default();
        for (marker, bytes, quoted) in &self.raw {
            let escaped = serde_json::to_string(marker).unwrap_or_default();
            let needle = if *quoted {
                escaped
            } else {
                escaped[1..escaped.len() - 1].to_owned()
            };
            text = replace_bytes(&text, needle.as_bytes(), bytes);
        }
        text
    }
}

fn replace_bytes(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

/// JSON pointers of every node of `value` (the root is `""`).
fn pointers(value: &Value) -> Vec<String> {
    fn walk(value: &Value, at: String, out: &mut Vec<String>) {
        match value {
            Value::Object(object) => {
                for (k, v) in object {
                    walk(
                        v,
                        format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                        out,
                    );
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(v, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
        out.push(at);
    }
    let mut out = Vec::new();
    walk(value, String::new(), &mut out);
    out
}

/// Strings that look like numbers, or like nothing.
const NUMBER_LIKE: &[&str] = &[
    "NaN",
    "nan",
    "Infinity",
    "-Infinity",
    "inf",
    "1e999",
    "-1e999",
    "0x1F",
    "",
    " 1",
    "1,5",
    "-0",
    "1e-400",
    "12abc",
    "∞",
    "null",
];

/// Raw JSON number tokens, valid and not.
const RAW_NUMBERS: &[&str] = &[
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    "1e-400",
    "18446744073709551616",
    "-9223372036854775809",
    "340282366920938463463374607431768211456",
    "1.7976931348623157e308",
    "5e-324",
    "-0",
    "-0.0",
    "01",
    "1.",
    ".5",
    "+1",
    "-",
    "1e",
    "0x10",
    "1_000",
    "1E2",
    "99999999999999999999999999999999999999999999999999999999999999999999999999",
];

/// Values of other types.
fn other_types() -> Vec<Value> {
    vec![
        Value::Null,
        json!(true),
        json!(false),
        json!(0),
        json!(-1),
        json!(1.5),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(""),
        json!("x"),
        json!([]),
        json!([1, 2]),
        json!({}),
        json!({"a": 1}),
        json!([[[]]]),
    ]
}

/// Bytes that are not UTF-8, or JSON escapes serde must refuse.
const BAD_STRING_BYTES: &[&[u8]] = &[
    b"\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\x80",
    b"\xc0\xaf",
    b"\\ud800",
    b"\\udc00x",
    b"\\u00",
    b"\\uZZZZ",
    b"\\x41",
    b"\x01",
    b"\x00",
    b"\n",
    b"\\",
];

/// Object keys nobody declared.
const UNKNOWN_KEYS: &[&str] = &[
    "zzz",
    "Target",
    "target ",
    "ttl_S",
    "__proto__",
    "",
    "$ref",
    "é",
    "tArget",
    "title\u{0}",
];

/// Place ids for paths: percent-escaped as they go in a URI.
const ODD_IDS: &[&str] = &[
    "%00",
    "%2F",
    "a%2Fb",
    "%FF",
    "%C3%A9",
    "caf%C3%A9-17",
    "%",
    "%G0",
    "%2",
    "..",
    ".",
    "%2E%2E",
    "a%20b",
    "~",
    "*",
    ":import",
    "a;b",
    "a%3Fb",
    "%25",
    "%E2%80%AE",
    "%F0%9F%98%80",
    "a/b",
    "a/",
    "",
    "%ED%A0%80",
    "%C0%AF",
    "0",
    "-1",
    "1e3",
];

struct Generator<'d> {
    schemas: Schemas<'d>,
    rng: StdRng,
    /// Chance that a leaf is generated just outside its schema (bounds, lengths).
    stray: f64,
    now_ms: i64,
    /// Place ids the gateway holds (URI-escaped), for `place` targets and paths.
    places: Vec<String>,
    /// Notification ids the gateway returned.
    notifications: Vec<String>,
    serial: u64,
    /// The `oneOf` variants taken, by their first required property, in order.
    choices: Vec<String>,
}

impl<'d> Generator<'d> {
    fn new(doc: &'d Value, seed: u64) -> Generator<'d> {
        Generator {
            schemas: Schemas { doc },
            rng: StdRng::seed_from_u64(seed),
            stray: 0.1,
            now_ms: now_ms(),
            places: Vec::new(),
            notifications: Vec::new(),
            serial: 0,
            choices: Vec::new(),
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.gen_bool(p.clamp(0.0, 1.0))
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items
            .choose(&mut self.rng)
            .cloned()
            .unwrap_or_else(|| panic!("pick from an empty list"))
    }

    fn text(&mut self, chars: usize) -> String {
        const PLAIN: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for _ in 0..chars {
            let roll = self.rng.gen_range(0..100);
            let c = match roll {
                0..=84 => char::from(PLAIN[self.rng.gen_range(0..PLAIN.len())]),
                85..=89 => ' ',
                90..=94 => self.pick(&['é', '日', '🙂', '"', '\\', '/', '%', '&', '=']),
                _ => self.pick(&['\u{0}', '\n', '\t', '\u{7f}', '\u{2028}', '\u{feff}']),
            };
            out.push(c);
        }
        out
    }

    /// A place id that is valid and URI-safe.
    fn fresh_id(&mut self) -> String {
        self.serial += 1;
        format!("fuzz-{}-{}", self.serial, self.rng.gen_range(0..1_000_000))
    }

    fn number(&mut self, schema: &Value, name: &str) -> f64 {
        let min = schema["minimum"].as_f64();
        let max = schema["maximum"].as_f64();
        let exclusive_min = schema["exclusiveMinimum"].as_f64();
        let low = min.or(exclusive_min);
        if self.chance(self.stray) {
            // Just outside a bound, or absurd.
            let mut options = vec![1e308, -1e308, 5e-324, -0.0];
            if let Some(max) = max {
                options.extend([max + 1.0, max * 1.000_001 + 1e-9, max * 10.0]);
            }
            if let Some(low) = low {
                options.extend([low - 1.0, low - 1e-9]);
            }
            if let Some(min) = exclusive_min {
                options.push(min);
            }
            if name == "radius_m" {
                options.extend([0.0, -1.0, 100_000.5, 1e6 + 1.0]);
            }
            return self.pick(&options);
        }
        let (low, high) = match (low, max) {
            (Some(l), Some(h)) => (l, h),
            (Some(l), None) => (l, l + 1000.0),
            (None, Some(h)) => (h - 1000.0, h),
            (None, None) if name == "radius_m" => (0.0, 120_000.0),
            (None, None) => (-1000.0, 1000.0),
        };
        match self.rng.gen_range(0..10) {
            0 if exclusive_min.is_none() => low,
            1 => high,
            2 => low + (high - low) * 1e-6,
            _ => {
                let x = self.rng.gen_range(low..=high);
                // Short decimals, as people write them.
                (x * 1e6).round() / 1e6
            }
        }
    }

    fn integer(&mut self, schema: &Value) -> Value {
        let min = schema["minimum"].as_i64();
        let max = schema["maximum"].as_i64();
        if self.chance(self.stray) {
            let mut options = vec![json!(-1), json!(0), json!(u64::MAX), json!(i64::MIN)];
            if let Some(max) = max {
                options.push(json!(max + 1));
            }
            if let Some(min) = min {
                options.push(json!(min - 1));
            }
            return self.pick(&options);
        }
        let low = min.unwrap_or(0);
        let high = max.unwrap_or(low + 2000);
        let x = match self.rng.gen_range(0..8) {
            0 => low,
            1 => high,
            _ => self.rng.gen_range(low..=high),
        };
        json!(x)
    }

    fn string(&mut self, schema: &Value) -> String {
        let max = schema["maxLength"].as_u64().map(|m| m as usize);
        let min = schema["minLength"].as_u64().unwrap_or(0) as usize;
        if self.chance(self.stray) {
            let over = max.map_or(5_000, |m| m + 1);
            let len = self.pick(&[over, over + 1, min.saturating_sub(1), 0]);
            return self.text(len);
        }
        let len = match (self.rng.gen_range(0..10), max) {
            (0, Some(m)) => m,
            (1, Some(m)) => m.saturating_sub(1),
            (2, _) => min,
            (3, Some(m)) => self.rng.gen_range(min..=m),
            (3, None) => self.rng.gen_range(min..=200.max(min)),
            _ => self.rng.gen_range(min.max(1)..=16.max(min + 1)),
        };
        self.text(len.max(min))
    }

    /// A valid GeoJSON Polygon's coordinates: a closed square, sometimes with a hole.
    fn polygon(&mut self) -> Value {
        let lon = self.rng.gen_range(-170.0..170.0_f64);
        let lat = self.rng.gen_range(-80.0..80.0_f64);
        let d = self.rng.gen_range(0.001..1.0_f64);
        let ring = |lon: f64, lat: f64, d: f64| {
            json!([
                [lon, lat],
                [lon + d, lat],
                [lon + d, lat + d],
                [lon, lat + d],
                [lon, lat]
            ])
        };
        if self.chance(0.3) {
            json!([
                ring(lon, lat, d),
                ring(lon + d / 4.0, lat + d / 4.0, d / 2.0)
            ])
        } else {
            json!([ring(lon, lat, d)])
        }
    }

    /// Whether `schema` is an array of arrays of arrays of numbers: polygon coordinates.
    fn is_polygon(&self, schema: &Value) -> bool {
        let mut s = self.schemas.resolve(schema);
        for _ in 0..3 {
            if Schemas::types(s) != ["array"] {
                return false;
            }
            s = self.schemas.resolve(&s["items"]);
        }
        Schemas::types(s) == ["number"]
    }

    /// A value of `schema`; `name` is the property it fills (for values a schema cannot
    /// say are meaningful: times, known place ids).
    fn value(&mut self, schema: &Value, name: &str, depth: usize) -> Value {
        let schema = self.schemas.resolve(schema);
        if depth > 12 {
            return Value::Null;
        }
        match name {
            "send_at" if !self.chance(self.stray) => {
                let offset_ms = match self.rng.gen_range(0..10) {
                    0..=5 => self.rng.gen_range(1_000..600_000),
                    6..=7 => -self.rng.gen_range(0..50_000),
                    8 => 31 * 24 * 3600 * 1000,
                    _ => -3600 * 1000,
                };
                return json!(geopush_proto::api::format_rfc3339_ms(
                    self.now_ms + offset_ms
                ));
            }
            "place" if !self.places.is_empty() && self.chance(0.7) => {
                let id = self.pick(&self.places.clone());
                return json!(percent_decode(&id).unwrap_or(id));
            }
            "all" if self.chance(0.8) => return json!(true),
            "id" if Schemas::types(schema) == ["string"] && self.chance(0.8) => {
                return json!(self.fresh_id());
            }
            _ => {}
        }
        if let Some(variants) = schema["oneOf"].as_array() {
            let variant = self.pick(variants);
            let label = variant["required"][0].as_str().unwrap_or("?");
            self.choices.push(label.to_owned());
            return self.value(&variant, name, depth + 1);
        }
        if let Some(options) = schema["enum"].as_array() {
            if self.chance(self.stray / 2.0) {
                return json!("not-in-the-enum");
            }
            return self.pick(options);
        }
        if self.is_polygon(schema) && self.chance(0.8) {
            return self.polygon();
        }
        let types = Schemas::types(schema);
        let ty = match types
            .iter()
            .copied()
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
        {
            t if t.is_empty() && types.contains(&"null") => "null",
            t if t.is_empty() => self.pick(&["object", "string", "number", "boolean"]),
            t => self.pick(&t),
        };
        match ty {
            "object" => {
                let mut object = Map::new();
                let required: Vec<String> = schema["required"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r.as_str().map(str::to_owned))
                    .collect();
                if let Some(properties) = schema["properties"].as_object() {
                    for (key, s) in properties {
                        if required.contains(key) || self.chance(0.5) {
                            let v = self.value(s, key, depth + 1);
                            object.insert(key.clone(), v);
                        }
                    }
                } else if schema["additionalProperties"] != json!(false) {
                    for _ in 0..self.rng.gen_range(0..4) {
                        let key = self.text(6);
                        let v = self.pick(&[json!("v"), json!(1), json!(true), json!({"k": [1]})]);
                        object.insert(key, v);
                    }
                }
                Value::Object(object)
            }
            "array" => {
                let min = schema["minItems"].as_u64().unwrap_or(0) as usize;
                let max = schema["maxItems"].as_u64().map_or(min + 4, |m| m as usize);
                let mut len = self.rng.gen_range(min..=max.max(min));
                if name == "users" && len == 0 && !self.chance(self.stray) {
                    len = 1;
                }
                let prefix = schema["prefixItems"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                (0..len)
                    .map(|i| {
                        let s = prefix.get(i).unwrap_or(&schema["items"]).clone();
                        self.value(&s, "", depth + 1)
                    })
                    .collect()
            }
            "integer" => self.integer(schema),
            "number" => json!(self.number(schema, name)),
            "string" => json!(self.string(schema)),
            "boolean" => json!(self.rng.gen_bool(0.5)),
            _ => Value::Null,
        }
    }

    /// Apply one structural or textual mutation to `body`.
    fn mutate(&mut self, body: &mut Body) {
        let nodes = pointers(&body.value);
        let at = self.pick(&nodes);
        let kind = self.rng.gen_range(0..12);
        let Some(node) = body.value.pointer(&at).cloned() else {
            return;
        };
        let replacement: Option<Value> = match kind {
            // Drop a field (the required ones are most of the fields there are).
            0 => {
                let objects: Vec<String> = nodes
                    .iter()
                    .filter(|p| {
                        body.value
                            .pointer(p)
                            .is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty()))
                    })
                    .cloned()
                    .collect();
                if let Some(p) = objects.choose(&mut self.rng).cloned()
                    && let Some(Value::Object(object)) = body.value.pointer_mut(&p)
                {
                    let keys: Vec<String> = object.keys().cloned().collect();
                    if let Some(key) = keys.choose(&mut self.rng) {
                        object.remove(key);
                    }
                }
                None
            }
            1 => Some(self.pick(&other_types())),
            2 => Some(json!(self.pick(NUMBER_LIKE))),
            3 => {
                let token = self.pick(RAW_NUMBERS);
                Some(json!(body.marker(token.as_bytes().to_vec(), true)))
            }
            4 => {
                let len = self.pick(&[129, 257, 4_097, 8_193, 70_000]);
                Some(json!(self.text(len)))
            }
            5 => {
                let depth = self.pick(&[64, 127, 128, 129, 500, 20_000]);
                let (open, close) = if self.chance(0.5) {
                    ("[".repeat(depth), "]".repeat(depth))
                } else {
                    ("{\"a\":".repeat(depth), "}".repeat(depth))
                };
                let balanced = self.chance(0.8);
                let raw = format!("{open}1{}", if balanced { close } else { String::new() });
                Some(json!(body.marker(raw.into_bytes(), true)))
            }
            6 => {
                if let Some(object) = self.object_at(body, &nodes) {
                    let key = self.pick(UNKNOWN_KEYS);
                    object.insert(key.to_owned(), json!(1));
                }
                None
            }
            7 => {
                // A duplicate key.
                let objects: Vec<String> = nodes
                    .iter()
                    .filter(|p| {
                        body.value
                            .pointer(p)
                            .is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty()))
                    })
                    .cloned()
                    .collect();
                if let Some(p) = objects.choose(&mut self.rng).cloned() {
                    let first = body
                        .value
                        .pointer(&p)
                        .and_then(Value::as_object)
                        .and_then(|o| o.iter().next().map(|(k, v)| (k.clone(), v.clone())));
                    if let Some((key, value)) = first {
                        let quoted = serde_json::to_vec(&key).unwrap_or_default();
                        let marker = body.marker(quoted, true);
                        if let Some(Value::Object(object)) = body.value.pointer_mut(&p) {
                            object.insert(marker, value);
                        }
                    }
                }
                None
            }
            8 => {
                let bad = self.pick(BAD_STRING_BYTES).to_vec();
                let marker = body.marker(bad, false);
                let text = match &node {
                    Value::String(s) => s.clone(),
                    _ => "x".into(),
                };
                let cut = text.char_indices().map(|(i, _)| i).next_back().unwrap_or(0);
                Some(json!(format!("{}{marker}{}", &text[..cut], &text[cut..])))
            }
            9 => match &node {
                Value::Number(_) => Some(json!(self.pick(&[
                    1e308,
                    -1e308,
                    5e-324,
                    9.007_199_254_740_993e15
                ]))),
                Value::String(s) => Some(json!(s.repeat(3))),
                Value::Array(items) if !items.is_empty() => Some(Value::Array(
                    items
                        .iter()
                        .cycle()
                        .take(items.len() * 50)
                        .cloned()
                        .collect(),
                )),
                _ => Some(Value::Null),
            },
            10 => Some(json!([node])),
            _ => Some(json!({"value": node})),
        };
        if let Some(replacement) = replacement {
            if at.is_empty() {
                body.value = replacement;
            } else if let Some(slot) = body.value.pointer_mut(&at) {
                *slot = replacement;
            }
        }
    }

    fn object_at<'b>(
        &mut self,
        body: &'b mut Body,
        nodes: &[String],
    ) -> Option<&'b mut Map<String, Value>> {
        let objects: Vec<&String> = nodes
            .iter()
            .filter(|p| body.value.pointer(p).is_some_and(Value::is_object))
            .collect();
        let p = objects.choose(&mut self.rng)?.to_string();
        body.value.pointer_mut(&p)?.as_object_mut()
    }

    /// A JSON body of `schema`, mutated most of the time; the flag says it was left as
    /// generated and matches the schema (a stray leaf may not).
    fn json_body(&mut self, schema: &Value) -> (Vec<u8>, bool) {
        let roll = self.rng.gen_range(0..100);
        if roll < 6 {
            let whole: &[&[u8]] = &[
                b"",
                b" \r\n\t",
                b"null",
                b"[]",
                b"{}",
                b"0",
                b"\"s\"",
                b"{}{}",
                b"{\"target\":",
                b"\xef\xbb\xbf{}",
                b"\xff\xfe{\x00}\x00",
                b"{\"target\":{\"all\":true}}garbage",
                b"{\"target\":{\"all\":true}}\n{\"target\":{\"all\":true}}",
            ];
            return (self.pick(whole).to_vec(), false);
        }
        let value = self.value(schema, "", 0);
        let mut body = Body::new(value);
        let mutations = match roll {
            6..=29 => 0,
            30..=79 => 1,
            _ => self.rng.gen_range(2..5),
        };
        for _ in 0..mutations {
            self.mutate(&mut body);
        }
        let mut bytes = body.render(self.chance(0.2));
        let mut valid = mutations == 0 && self.schemas.check(schema, &body.value, "body").is_ok();
        if self.chance(0.07) && !bytes.is_empty() {
            let cut = self.rng.gen_range(0..bytes.len());
            bytes.truncate(cut);
            valid = false;
        }
        if self.chance(0.02) {
            // Over the body limit.
            bytes.extend(std::iter::repeat_n(b' ', FUZZ_MAX_BODY_BYTES + 1));
            valid = false;
        }
        (bytes, valid)
    }

    /// A body for `POST /v1/places:import`: NDJSON or a FeatureCollection of Features,
    /// some rows broken, and a content type (that may not match).
    fn import_body(&mut self) -> (Vec<u8>, Option<String>) {
        let feature = feature_schema();
        let rows: Vec<Vec<u8>> = (0..self.rng.gen_range(0..25))
            .map(|_| {
                if self.chance(0.03) {
                    // A row over the row limit.
                    let pad = "x".repeat(FUZZ_MAX_ROW_BYTES + 1);
                    return format!(
                        "{{\"type\":\"Feature\",\"id\":\"{}\",\"geometry\":{{\"type\":\"Point\",\"coordinates\":[1,2]}},\"properties\":{{\"name\":\"{pad}\"}}}}",
                        self.fresh_id()
                    )
                    .into_bytes();
                }
                let mut body = Body::new(self.value(&feature, "", 0));
                if self.chance(0.3) {
                    self.mutate(&mut body);
                }
                body.render(false)
            })
            .collect();
        let ndjson = self.chance(0.55);
        let content_type = {
            let typed: &[Option<&str>] = if ndjson {
                &[
                    Some("application/x-ndjson"),
                    Some("application/ndjson"),
                    Some("application/jsonl"),
                ]
            } else {
                &[
                    Some("application/geo+json"),
                    Some("application/geo+json; charset=utf-8"),
                ]
            };
            let typed = self.pick(typed);
            let other = self.pick(&[
                None,
                Some("text/plain"),
                Some("application/json"),
                Some("application/x-ndjson"),
                Some("application/geo+json"),
            ]);
            if self.chance(0.8) { typed } else { other }
        };
        let mut bytes = if ndjson {
            let newline: &[u8] = self.pick(&[&b"\n"[..], b"\r\n", b"\n\n"]);
            let mut out = rows.join(newline);
            if self.chance(0.5) {
                out.extend_from_slice(newline);
            }
            out
        } else {
            let mut out = Vec::new();
            let prefix: &[u8] = self.pick(&[
                &b"{\"type\":\"FeatureCollection\",\"features\":["[..],
                b"{\"features\":[",
                b"{ \"type\" : \"FeatureCollection\" , \"name\":\"a]}\\\"[{\", \"features\" : [",
                b"{\"type\":\"FeatureCollection\",\"bbox\":[[1,2],[3,4]],\"features\":[",
                b"{\"type\":\"FeatureCollection\",\"features\":{",
                b"{\"type\":\"FeatureCollection\",\"features\":\"[\",\"x\":[",
                b"[",
            ]);
            out.extend_from_slice(prefix);
            out.extend_from_slice(&rows.join(&b","[..]));
            let suffix: &[u8] = self.pick(&[
                &b"]}"[..],
                b"]}",
                b"],\"after\":{\"features\":[1]}}",
                b"]",
                b"",
                b",]}",
                b"]}}}",
            ]);
            out.extend_from_slice(suffix);
            out
        };
        if self.chance(0.08) && !bytes.is_empty() {
            let cut = self.rng.gen_range(0..bytes.len());
            bytes.truncate(cut);
        }
        if self.chance(0.03) {
            bytes = self
                .pick(&[&b""[..], b"\xff\xfe\xfd", b"{", b"[[[[[[[[[[", b"\n\n\n"])
                .to_vec();
        }
        (bytes, content_type.map(str::to_owned))
    }

    /// A path id: a known one, a fresh valid-looking one, or something odd (escaped).
    fn path_id(&mut self, known: &[String]) -> String {
        match self.rng.gen_range(0..100) {
            0..=39 if !known.is_empty() => self.pick(known),
            0..=54 => self.fresh_id(),
            55..=64 => {
                const ULID: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
                (0..26)
                    .map(|_| char::from(ULID[self.rng.gen_range(0..ULID.len())]))
                    .collect()
            }
            65..=69 => "a".repeat(self.pick(&[127, 128, 129, 1_000, 4_000])),
            70..=79 => {
                let len = self.rng.gen_range(1..20);
                percent_encode(&self.text(len))
            }
            _ => self.pick(ODD_IDS).to_owned(),
        }
    }

    /// A query string for `params` (the query ones), generated then mutated.
    fn query(&mut self, params: &[Param]) -> String {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for p in params.iter().filter(|p| p.location == "query") {
            if p.required || self.chance(0.5) {
                let v = self.value(&p.schema, &p.name, 0);
                let text = match v {
                    Value::String(s) => percent_encode(&s),
                    other => other.to_string(),
                };
                pairs.push((p.name.clone(), text));
            }
        }
        let mutations = match self.rng.gen_range(0..10) {
            0..=2 => 0,
            3..=7 => 1,
            _ => 3,
        };
        let mut tail = String::new();
        for _ in 0..mutations {
            match self.rng.gen_range(0..9) {
                0 if !pairs.is_empty() => {
                    let i = self.rng.gen_range(0..pairs.len());
                    pairs.remove(i);
                }
                1 if !pairs.is_empty() => {
                    let i = self.rng.gen_range(0..pairs.len());
                    let value = [
                        "",
                        "abc",
                        "NaN",
                        "nan",
                        "inf",
                        "-inf",
                        "Infinity",
                        "1e309",
                        "-1e309",
                        "1e-400",
                        "0x10",
                        "%201",
                        "1%20",
                        "%31",
                        "1,5",
                        "+5",
                        "-0",
                        "-1",
                        "1.5",
                        "18446744073709551616",
                        "99999999999999999999999",
                        "%FF",
                        "%",
                        "%G1",
                        "%C3%A9",
                        "%F0%9F%98%80",
                        "1e2",
                        ".5",
                        "5.",
                        "true",
                    ];
                    pairs[i].1 = self.pick(&value).to_owned();
                }
                2 if !pairs.is_empty() => {
                    let i = self.rng.gen_range(0..pairs.len());
                    let pair = pairs[i].clone();
                    pairs.push(pair);
                }
                3 => pairs.push((
                    self.pick(&["zzz", "LAT", "lat ", "radius", "", "access_token"])
                        .to_owned(),
                    "1".into(),
                )),
                4 => tail.push_str(self.pick(&["&", "&&", "&=", "&lat", "&=1", "&lat=1&lat=2"])),
                5 if !pairs.is_empty() => {
                    let i = self.rng.gen_range(0..pairs.len());
                    pairs[i].1 = "1".repeat(self.pick(&[400, 3_000]));
                }
                6 if !pairs.is_empty() => {
                    let i = self.rng.gen_range(0..pairs.len());
                    let name = &pairs[i].0;
                    pairs[i].0 = name.bytes().map(|b| format!("%{b:02X}")).collect();
                }
                _ => {
                    if let Some(p) = params
                        .iter()
                        .filter(|p| p.location == "query")
                        .collect::<Vec<_>>()
                        .choose(&mut self.rng)
                    {
                        let saved = self.stray;
                        self.stray = 1.0;
                        let v = self.value(&p.schema, &p.name, 0);
                        self.stray = saved;
                        pairs.retain(|(n, _)| *n != p.name);
                        pairs.push((p.name.clone(), v.to_string()));
                    }
                }
            }
        }
        pairs.shuffle(&mut self.rng);
        let mut query: String = pairs
            .iter()
            .map(|(n, v)| {
                if v.is_empty() && self.rng.gen_bool(0.3) {
                    n.clone()
                } else {
                    format!("{n}={v}")
                }
            })
            .collect::<Vec<_>>()
            .join("&");
        query.push_str(&tail);
        query
    }

    /// Credentials and content type: mostly right, sometimes not.
    fn headers(&mut self, request: &mut Request, json_body: bool) {
        let auth = match self.rng.gen_range(0..100) {
            0..=1 => None,
            2 => Some("Bearer wrong-key".to_owned()),
            3 => Some(format!("Basic {DEV_API_KEY}")),
            4 => Some("Bearer a.b.c".to_owned()),
            5 => Some("Bearer".to_owned()),
            6 => Some(format!("bearer   {DEV_API_KEY}  ")),
            _ => Some(format!("Bearer {DEV_API_KEY}")),
        };
        request.set_header("Authorization", auth);
        if json_body {
            let content_type = match self.rng.gen_range(0..100) {
                0..=5 => None,
                6..=9 => Some("text/plain"),
                10..=12 => Some("application/x-www-form-urlencoded"),
                13..=14 => Some("application/json; charset=utf-16"),
                15..=16 => Some("multipart/form-data; boundary=x"),
                17..=24 => Some("application/json; charset=utf-8"),
                _ => Some("application/json"),
            };
            request.set_header("Content-Type", content_type.map(str::to_owned));
        }
        if !request.body.is_empty() && self.chance(0.1) {
            let sizes = (0..3).map(|_| self.rng.gen_range(1..4096)).collect();
            request.chunks = Some(sizes);
        }
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `target` with every byte a request line may not hold (space, controls, non-ASCII,
/// quotes, braces, `#`) percent-escaped: the generated targets are odd, but they are HTTP,
/// so they reach the API rather than the HTTP parser.
fn uri_safe(target: &str) -> String {
    target
        .bytes()
        .map(|b| {
            if b.is_ascii_graphic() && !b"\"<>\\^`{|}#".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(u8::from_str_radix(text.get(i + 1..i + 3)?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Checking answers.

/// What the fuzzing saw.
#[derive(Default)]
struct Ledger {
    seed: u64,
    /// Broken rules, each with the request that broke it.
    findings: Vec<String>,
    /// Answers by operation and status.
    statuses: BTreeMap<String, BTreeMap<u16, usize>>,
    /// Statuses an operation answered that its documentation does not list (not a failure:
    /// reported).
    undocumented: BTreeMap<(String, u16), String>,
    /// Unmutated publish bodies that match the document's schema, and how many got 202.
    valid_publishes: usize,
    valid_publishes_accepted: usize,
    /// Why the others were refused: error code → count (schema-valid is not always valid:
    /// `all: false`, a place without a fence, a `send_at` in the past, bytes vs characters).
    valid_publishes_refused: BTreeMap<String, usize>,
}

impl Ledger {
    /// Check one answer; return it when there was one.
    fn check(
        &mut self,
        schemas: Schemas<'_>,
        op: &Operation,
        index: usize,
        request: &Request,
        answer: anyhow::Result<HttpResponse>,
    ) -> Option<HttpResponse> {
        let mut finding = |what: String| {
            self.findings.push(format!(
                "{} #{index} (seed {}): {what}\n  request: {}",
                op.id,
                self.seed,
                request.describe()
            ));
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                finding(format!("no answer: {e:#}"));
                return None;
            }
        };
        let status = answer.status;
        let body = answer.text();
        let shown = escape(&answer.body, 400);
        if status >= 500 {
            finding(format!("answered {status}: {shown}"));
        }
        if !(200..300).contains(&status) {
            let content_type = answer.header("content-type").unwrap_or_default();
            if !content_type.starts_with("application/json") {
                finding(format!(
                    "error answer {status} has content type {content_type:?}"
                ));
            }
            if request.method != "HEAD" {
                let shape = serde_json::from_slice::<Value>(&answer.body)
                    .ok()
                    .filter(|v| {
                        v.as_object().is_some_and(|o| o.len() == 1)
                            && v["error"].as_object().is_some_and(|e| e.len() == 2)
                            && v["error"]["code"].as_str().is_some_and(|c| !c.is_empty())
                            && v["error"]["message"].is_string()
                    });
                if shape.is_none() {
                    finding(format!(
                        "error answer {status} is not {{\"error\":{{\"code\",\"message\"}}}}: {shown}"
                    ));
                }
            }
        } else if let Some(schema) = op.answer_schema(status) {
            match serde_json::from_str::<Value>(&body) {
                Ok(value) => {
                    if let Err(e) = schemas.check(schema, &value, "answer") {
                        finding(format!(
                            "{status} answer does not match its documented schema: {e}; {shown}"
                        ));
                    }
                }
                Err(e) => finding(format!("{status} answer is not JSON ({e}): {shown}")),
            }
        }
        *self
            .statuses
            .entry(op.id.clone())
            .or_default()
            .entry(status)
            .or_default() += 1;
        if !op.documents(status) && op.method == request.method {
            self.undocumented
                .entry((op.id.clone(), status))
                .or_insert_with(|| {
                    format!("{} {} → {status} {body}", request.method, request.target)
                });
        }
        Some(answer)
    }
}

/// The gateway the fuzzing runs against: single-node, dev key, small body limits, and some
/// places to target.
async fn fuzz_gateway() -> TestGateway {
    let mut config: Config = test_config();
    config.api.api_max_body_bytes = FUZZ_MAX_BODY_BYTES;
    config.api.import_max_row_bytes = FUZZ_MAX_ROW_BYTES;
    TestGateway::start(config).await.expect("gateway starts")
}

/// Store a place with `PUT`, asserting it is taken.
async fn put_place(addr: SocketAddr, id: &str, feature: Value) {
    let request =
        Request::new("PUT", &format!("/v1/places/{id}")).json(feature.to_string().into_bytes());
    let answer = exchange(addr, &request).await.expect("PUT answered");
    assert_eq!(answer.status, 200, "PUT {id}: {}", answer.text());
}

/// Build the request of operation `op`, number `index`.
/// What a generated request should get, beyond the general rules.
#[derive(Default)]
struct Expect {
    /// An unmutated, schema-valid body.
    valid_body: bool,
    /// NDJSON import rows: a 200 must count each as imported or rejected.
    import_rows: Option<usize>,
}

/// Rows of an NDJSON import as the API defines them: lines that are not blank, and lines
/// over the row limit.
fn ndjson_rows(body: &[u8]) -> usize {
    body.split(|b| *b == b'\n')
        .filter(|line| line.len() > FUZZ_MAX_ROW_BYTES || !line.iter().all(u8::is_ascii_whitespace))
        .count()
}

fn build_request(g: &mut Generator<'_>, op: &Operation) -> (Request, Expect) {
    // The path: its template with generated ids.
    let mut path = op.path.clone();
    for p in op.params.iter().filter(|p| p.location == "path") {
        let known = if op.path.starts_with("/v1/places/") {
            g.places.clone()
        } else {
            g.notifications.clone()
        };
        let id = g.path_id(&known);
        path = path.replace(&format!("{{{}}}", p.name), &id);
    }
    let query = g.query(&op.params);
    let mut target = if query.is_empty() {
        path
    } else {
        format!("{path}?{query}")
    };
    target.truncate(MAX_TARGET_LEN);
    let target = uri_safe(&target);
    let mut request = Request::new(&op.method, &target);
    let mut expect = Expect::default();
    match (&op.body, op.id.as_str()) {
        (Some(_), "import_places") => {
            let (body, content_type) = g.import_body();
            if content_type
                .as_deref()
                .is_some_and(|t| t.contains("ndjson") || t.contains("jsonl"))
            {
                expect.import_rows = Some(ndjson_rows(&body));
            }
            request.body = body;
            request.set_header("Content-Type", content_type);
            g.headers(&mut request, false);
        }
        (Some((_, schema)), id) => {
            let schema = if id == "put_place" {
                feature_schema()
            } else {
                schema.clone()
            };
            let (body, unmutated) = g.json_body(&schema);
            expect.valid_body = unmutated;
            request.body = body;
            g.headers(&mut request, true);
        }
        (None, _) => g.headers(&mut request, false),
    }
    (request, expect)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_requests_never_break_the_api() {
    let started = Instant::now();
    let seed = seed();
    let doc = serde_json::to_value(document()).expect("document");
    let schemas = Schemas { doc: &doc };
    let ops = operations(&doc);
    assert!(
        ops.len() >= 7,
        "the document lists {} operations",
        ops.len()
    );
    let gateway = fuzz_gateway().await;
    let addr = gateway.addr();
    let mut g = Generator::new(&doc, seed);
    let mut ledger = Ledger {
        seed,
        ..Ledger::default()
    };
    // Places to target: one with a circular fence, one with a polygon, one without a fence.
    put_place(addr, "fuzz-cafe", json!({"type":"Feature","geometry":{"type":"Point","coordinates":[13.405,52.52]},"properties":{"name":"Café","fence":{"radius_m":150}}})).await;
    put_place(addr, "fuzz-park", json!({"type":"Feature","geometry":{"type":"Point","coordinates":[2.35,48.85]},"properties":{"fence":{"type":"Polygon","coordinates":[[[2.34,48.84],[2.36,48.84],[2.36,48.86],[2.34,48.86],[2.34,48.84]]]}}})).await;
    put_place(
        addr,
        "fuzz-nofence",
        json!({"type":"Feature","geometry":{"type":"Point","coordinates":[0.5,0.5]}}),
    )
    .await;
    g.places
        .extend(["fuzz-cafe", "fuzz-park", "fuzz-nofence"].map(str::to_owned));

    // Deletes last, so the other operations find the places.
    let mut ordered: Vec<&Operation> = ops.iter().filter(|o| o.method != "DELETE").collect();
    ordered.extend(ops.iter().filter(|o| o.method == "DELETE"));
    let per_operation = requests_per_operation();
    for op in ordered {
        g.rng = StdRng::seed_from_u64(seed ^ stream_of(&op.id));
        for index in 0..per_operation {
            let (request, expect) = build_request(&mut g, op);
            let answer = exchange(addr, &request).await;
            let Some(answer) = ledger.check(schemas, op, index, &request, answer) else {
                continue;
            };
            let success = (200..300).contains(&answer.status);
            match op.id.as_str() {
                "post_notification" => {
                    let authorized =
                        request.header("Authorization") == Some(&format!("Bearer {DEV_API_KEY}"));
                    if expect.valid_body && authorized && request.chunks.is_none() {
                        ledger.valid_publishes += 1;
                        ledger.valid_publishes_accepted += usize::from(answer.status == 202);
                        if answer.status != 202 {
                            let code = answer
                                .json()
                                .ok()
                                .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
                            *ledger
                                .valid_publishes_refused
                                .entry(code.unwrap_or_default())
                                .or_default() += 1;
                        }
                    }
                    if answer.status == 202
                        && let Some(id) = answer
                            .json()
                            .ok()
                            .and_then(|v| v["id"].as_str().map(str::to_owned))
                    {
                        g.notifications.push(percent_encode(&id));
                    }
                }
                "import_places" if answer.status == 200 => {
                    let report = answer.json().unwrap_or_default();
                    let counted = report["imported"]
                        .as_u64()
                        .zip(report["rejected"].as_u64())
                        .map(|(i, r)| i + r);
                    if let Some(rows) = expect.import_rows
                        && counted != Some(rows as u64)
                    {
                        ledger.findings.push(format!(
                            "import_places #{index} (seed {seed}): {rows} NDJSON rows, but the report counts {counted:?}: {}\n  request: {}",
                            answer.text(),
                            request.describe()
                        ));
                    }
                }
                "put_place" if success => {
                    let id = request
                        .target
                        .trim_start_matches("/v1/places/")
                        .split('?')
                        .next()
                        .unwrap_or_default();
                    g.places.push(id.to_owned());
                }
                "delete_place" if success => {
                    let id = request
                        .target
                        .trim_start_matches("/v1/places/")
                        .split('?')
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    g.places.retain(|p| *p != id);
                }
                _ => {}
            }
        }
    }

    // Methods the document does not list for a path.
    let mut by_path: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in &ops {
        by_path.entry(op.path.as_str()).or_default().push(op);
    }
    g.rng = StdRng::seed_from_u64(seed ^ stream_of("wrong methods"));
    for path_ops in by_path.values() {
        let listed: Vec<&str> = path_ops.iter().map(|o| o.method.as_str()).collect();
        let others: Vec<&str> = [
            "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE",
        ]
        .into_iter()
        .filter(|m| !listed.contains(m))
        .collect();
        for index in 0..WRONG_METHOD_REQUESTS {
            let (mut request, _) = build_request(&mut g, path_ops[0]);
            request.method = g.pick(&others).to_owned();
            let answer = exchange(addr, &request).await;
            ledger.check(schemas, path_ops[0], index, &request, answer);
        }
    }

    // The gateway is still whole.
    let ready = exchange(addr, &Request::new("GET", "/readyz")).await;
    assert!(
        matches!(&ready, Ok(r) if r.status == 200),
        "the gateway is not ready after the fuzzing: {ready:?}"
    );

    eprintln!(
        "api_fuzz: seed {seed}, {per_operation} requests per operation, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for (op, statuses) in &ledger.statuses {
        eprintln!("  {op}: {statuses:?}");
    }
    eprintln!(
        "  schema-valid publish bodies: {}, accepted: {}, refused: {:?}",
        ledger.valid_publishes, ledger.valid_publishes_accepted, ledger.valid_publishes_refused
    );
    for ((op, status), example) in &ledger.undocumented {
        let example: String = example.chars().take(300).collect();
        eprintln!(
            "  note: {op} answered {status}, which its documentation does not list, e.g. {example}"
        );
    }

    let shown: Vec<&String> = ledger.findings.iter().take(25).collect();
    assert!(
        ledger.findings.is_empty(),
        "{} answers broke the API's rules (seed {seed}; first {}):\n\n{}",
        ledger.findings.len(),
        shown.len(),
        shown
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n\n")
    );
    for op in &ops {
        let succeeded = ledger
            .statuses
            .get(&op.id)
            .is_some_and(|s| s.keys().any(|st| (200..300).contains(st)));
        assert!(
            succeeded,
            "{} never succeeded: the generator produces only garbage for it ({:?})",
            op.id,
            ledger.statuses.get(&op.id)
        );
    }
    assert!(
        ledger.valid_publishes_accepted > 0
            && ledger.valid_publishes_accepted * 10 >= ledger.valid_publishes,
        "schema-valid publish bodies were accepted too rarely: {} of {}",
        ledger.valid_publishes_accepted,
        ledger.valid_publishes
    );
    gateway.shutdown().await.expect("shutdown");
}

/// The generator's unmutated values satisfy the schemas they come from (the document's,
/// and the Feature stand-in): otherwise "valid" would mean nothing above.
#[test]
fn unmutated_values_match_their_schemas() {
    let doc = serde_json::to_value(document()).expect("document");
    let schemas = Schemas { doc: &doc };
    let mut g = Generator::new(&doc, seed());
    g.stray = 0.0;
    g.places.push("fuzz-cafe".into());
    let publish = doc["components"]["schemas"]["NotificationRequest"].clone();
    assert!(
        publish.is_object(),
        "NotificationRequest is in the document"
    );
    for (name, schema) in [
        ("NotificationRequest", publish),
        ("Feature", feature_schema()),
    ] {
        for i in 0..500 {
            let value = g.value(&schema, "", 0);
            if let Err(e) = schemas.check(&schema, &value, name) {
                panic!("generated {name} #{i} does not match its schema: {e}\n{value}");
            }
        }
    }
}

/// Each target shape the document gives for a publish (each `oneOf` path through
/// `PublishTarget`, `Area` included) is accepted with valid values: a client built from the
/// document can use every kind of target.
///
/// Failed before the fix on `area/polygon`: `Polygon` is `#[serde(transparent)]` (the wire form is
/// the bare GeoJSON coordinates array), but utoipa ignores `transparent` and documents it as
/// `{"rings": [...]}`, which the server refuses (`invalid type: map, expected a sequence`).
#[tokio::test]
async fn every_documented_target_shape_is_accepted() {
    let doc = serde_json::to_value(document()).expect("document");
    let gateway = fuzz_gateway().await;
    let addr = gateway.addr();
    put_place(addr, "fuzz-cafe", json!({"type":"Feature","geometry":{"type":"Point","coordinates":[13.405,52.52]},"properties":{"fence":{"radius_m":150}}})).await;
    let mut g = Generator::new(&doc, seed());
    g.stray = 0.0;
    g.places.push("fuzz-cafe".into());
    let target_schema =
        doc["components"]["schemas"]["NotificationRequest"]["properties"]["target"].clone();
    // Shape (the variants taken) → (accepted, an example of a refusal).
    let mut shapes: BTreeMap<String, (bool, String)> = BTreeMap::new();
    for _ in 0..200 {
        g.choices.clear();
        let target = g.value(&target_schema, "target", 0);
        let shape = g.choices.join("/");
        if shapes.get(&shape).is_some_and(|(accepted, _)| *accepted) {
            continue;
        }
        let body = json!({"target": target, "title": "t", "ttl_s": 60});
        let request = Request::new("POST", "/v1/notifications").json(body.to_string().into_bytes());
        let answer = exchange(addr, &request).await.expect("answered");
        let entry = shapes.entry(shape).or_default();
        if answer.status == 202 {
            entry.0 = true;
        } else {
            entry.1 = format!("{body} → {} {}", answer.status, answer.text());
        }
    }
    let seen: Vec<&String> = shapes.keys().collect();
    for expected in [
        "all",
        "area/circle",
        "area/polygon",
        "place",
        "topic",
        "users",
    ] {
        assert!(
            shapes.contains_key(expected),
            "no {expected} target generated: {seen:?}"
        );
    }
    let refused: Vec<String> = shapes
        .iter()
        .filter(|(_, (accepted, _))| !accepted)
        .map(|(shape, (_, example))| format!("{shape}: e.g. {example}"))
        .collect();
    assert!(
        refused.is_empty(),
        "target shapes the document gives are always refused by the server:\n{}",
        refused.join("\n")
    );
    gateway.shutdown().await.expect("shutdown");
}

/// Polygon coordinates whose every edge overlaps every other in longitude (a sawtooth of
/// `teeth` teeth, 10° wide, `2 × teeth + 4` vertices): the worst case of the edge sweep in
/// `Polygon::validate`, which then compares every pair of edges.
fn sawtooth(teeth: usize) -> Value {
    let lat = |k: usize| (k as f64 * 1e-3 * 1e6).round() / 1e6;
    let mut ring = vec![json!([0.0, 0.0])];
    for i in 0..teeth {
        ring.push(json!([10.0, lat(2 * i + 1)]));
        ring.push(json!([0.0, lat(2 * i + 2)]));
    }
    ring.push(json!([-1.0, lat(2 * teeth)]));
    ring.push(json!([-1.0, 0.0]));
    ring.push(json!([0.0, 0.0]));
    json!([ring])
}

/// A contrived simple polygon of at most `MAX_POLYGON_VERTICES` (10,000) vertices whose every
/// edge spans every other's longitudes (a sawtooth) used to cost O(n²) comparisons — seconds
/// of CPU per request, per import row. The check now stops at a budget
/// (`MAX_EDGE_COMPARISONS`, unit-tested in proto) and refuses it with a clear 400; this
/// shows the defined answer end to end, as a publish target and as import rows' fences.
#[tokio::test]
async fn worst_case_polygons_get_a_defined_answer() {
    let gateway = TestGateway::start(test_config()).await.expect("gateway");
    let addr = gateway.addr();
    let polygon = sawtooth(4_990);
    let body = json!({"target": {"area": {"polygon": polygon}}, "title": "t"});
    let publish = Request::new("POST", "/v1/notifications").json(body.to_string().into_bytes());
    let answer = exchange(addr, &publish).await.expect("answered");
    assert_eq!(answer.status, 400, "{}", answer.text());
    let error = answer.json().expect("json");
    assert_eq!(error["error"]["code"], "invalid_area", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("too complex")),
        "{error}"
    );
    let mut import = Request::new("POST", "/v1/places:import");
    import.set_header("Content-Type", Some("application/x-ndjson".into()));
    for i in 0..3 {
        let row = json!({
            "type": "Feature", "id": format!("sawtooth-{i}"),
            "geometry": {"type": "Point", "coordinates": [5.0, 0.001]},
            "properties": {"fence": {"type": "Polygon", "coordinates": polygon}}
        });
        import.body.extend_from_slice(row.to_string().as_bytes());
        import.body.push(b'\n');
    }
    let answer = exchange(addr, &import).await.expect("answered");
    assert_eq!(answer.status, 200, "{}", answer.text());
    let report = answer.json().expect("json");
    assert_eq!(
        (report["imported"].as_u64(), report["rejected"].as_u64()),
        (Some(0), Some(3)),
        "{report}"
    );
    gateway.shutdown().await.expect("shutdown");
}

/// A client that sends a request head and then only part of the body it announced must not
/// hold a connection (and a handler) forever: the API answers or closes within a bound.
///
/// Failed before the fix (now 408 after `api_body_timeout_seconds`): only the head was bounded (`header_read_timeout`); the body of an API request
/// is read with no time limit, so the connection stays open indefinitely (seen: still open
/// after 40 s), and no connection limit applies to plain HTTP.
#[tokio::test]
async fn a_stalled_body_is_bounded() {
    /// Generous: whatever body timeout is chosen, it should be well under this.
    const BOUND: Duration = Duration::from_secs(35);
    let gateway = TestGateway::start_with(|c| {
        c.handshake_timeout_seconds = 1.0;
        c.api.api_body_timeout_seconds = 1.0;
    })
    .await
    .expect("gateway");
    let addr = gateway.addr();
    for (path, content_type) in [
        ("/v1/notifications", "application/json"),
        ("/v1/places:import", "application/x-ndjson"),
    ] {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {DEV_API_KEY}\r\n\
             Content-Type: {content_type}\r\nContent-Length: 1000\r\n\r\n{{\"target\""
        );
        stream.write_all(head.as_bytes()).await.expect("write");
        let started = Instant::now();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(BOUND, stream.read_to_end(&mut answer)).await;
        assert!(
            read.is_ok(),
            "POST {path} with 10 of 1000 body bytes: the connection is still open after {:?} \
             ({} bytes answered)",
            started.elapsed(),
            answer.len()
        );
        if let Ok(response) = parse_response(&answer, false) {
            assert!(response.status < 500, "{}", response.text());
        }
    }
    gateway.shutdown().await.expect("shutdown");
}
