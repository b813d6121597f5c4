//! `POST /v1/places:import`: a GeoJSON FeatureCollection or NDJSON of Features, of any
//! size, in bounded memory.
//!
//! The body is split into rows as it streams in — NDJSON by lines, a FeatureCollection by
//! the elements of its `features` array (a small tokenizer tracks strings and nesting, so
//! the document is never held whole) — and each row is validated and written to the store
//! in batches. Memory is one row (at most `import_max_row_bytes`) plus one batch. Rows that
//! fail are reported by position with the reason; the good ones are imported (an import is
//! not atomic: the answer says exactly what was taken).
//!
//! The format is `Content-Type: application/x-ndjson` or `application/geo+json`; with
//! another type the start of the body decides (`"FeatureCollection"` before the first line
//! ends means a collection).

use super::ApiError;
use crate::bus::places_sync::{PlacesFollower, PlacesStore};
use crate::config::ApiConfig;
use bytes::Bytes;
use geopush_proto::Place;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Serialize;
use utoipa::ToSchema;

/// What an import did.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct ImportReport {
    /// Places written.
    pub imported: usize,
    /// Rows refused.
    pub rejected: usize,
    /// The refused rows (at most the configured number), in order.
    pub rejected_rows: Vec<RejectedRow>,
    /// True when more rows were refused than are listed.
    pub rejected_rows_truncated: bool,
}

/// A refused row: a 1-based NDJSON line, or a 0-based index into `features`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RejectedRow {
    pub row: usize,
    pub reason: String,
}

/// How far a FeatureCollection has been read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Looking for the top-level `"features": [`.
    Seek,
    /// Inside the features array.
    Features,
    /// The array ended; the rest is ignored.
    Done,
}

/// Splits a FeatureCollection into its features' bytes, a chunk at a time.
struct CollectionSplitter {
    phase: Phase,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// A key-sized string at depth 1 being read, and the last one read.
    key: Vec<u8>,
    last_key: Vec<u8>,
    /// Saw `:` after the last depth-1 key.
    after_colon: bool,
    /// The element being collected (None between elements).
    element: Option<Vec<u8>>,
    /// The element outgrew the row limit: skip to its end.
    oversized: bool,
    /// Inside an element that is not an object or array.
    scalar: bool,
    index: usize,
}

/// One row out of a splitter.
enum Row {
    Text(usize, Vec<u8>),
    TooLarge(usize),
}

impl CollectionSplitter {
    fn new() -> CollectionSplitter {
        CollectionSplitter {
            phase: Phase::Seek,
            depth: 0,
            in_string: false,
            escaped: false,
            key: Vec::new(),
            last_key: Vec::new(),
            after_colon: false,
            element: None,
            oversized: false,
            scalar: false,
            index: 0,
        }
    }

    fn end_element(&mut self, rows: &mut Vec<Row>) {
        let index = self.index;
        self.index += 1;
        self.scalar = false;
        match self.element.take() {
            Some(bytes) if !self.oversized => rows.push(Row::Text(index, bytes)),
            _ => rows.push(Row::TooLarge(index)),
        }
        self.oversized = false;
    }

    fn push(&mut self, chunk: &[u8], max_row: usize, rows: &mut Vec<Row>) {
        for &byte in chunk {
            if self.phase == Phase::Done {
                return;
            }
            let collecting =
                self.phase == Phase::Features && (self.element.is_some() || self.oversized);
            if collecting
                && !self.oversized
                && let Some(element) = self.element.as_mut()
            {
                element.push(byte);
                if element.len() > max_row {
                    self.oversized = true;
                    self.element = None;
                }
            }
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if byte == b'\\' {
                    self.escaped = true;
                } else if byte == b'"' {
                    self.in_string = false;
                    if self.phase == Phase::Seek && self.depth == 1 {
                        self.last_key = std::mem::take(&mut self.key);
                        self.after_colon = false;
                    }
                } else if self.phase == Phase::Seek && self.depth == 1 && self.key.len() < 16 {
                    self.key.push(byte);
                }
                continue;
            }
            match self.phase {
                Phase::Seek => match byte {
                    b'"' => {
                        self.in_string = true;
                        self.key.clear();
                    }
                    b':' if self.depth == 1 => self.after_colon = true,
                    b'{' | b'[' => {
                        if byte == b'['
                            && self.depth == 1
                            && self.after_colon
                            && self.last_key == b"features"
                        {
                            self.phase = Phase::Features;
                        }
                        self.depth += 1;
                    }
                    b'}' | b']' => {
                        self.depth = self.depth.saturating_sub(1);
                        if byte == b'}' && self.depth == 1 {
                            self.after_colon = false;
                        }
                    }
                    b',' if self.depth == 1 => {
                        self.after_colon = false;
                        self.last_key.clear();
                    }
                    _ => {}
                },
                Phase::Features => {
                    let in_element = self.element.is_some() || self.oversized;
                    if !in_element {
                        match byte {
                            b' ' | b'\t' | b'\r' | b'\n' | b',' => {}
                            b']' => {
                                self.phase = Phase::Done;
                            }
                            _ => {
                                self.element = Some(vec![byte]);
                                match byte {
                                    b'{' | b'[' => self.depth += 1,
                                    b'"' => {
                                        self.in_string = true;
                                        self.scalar = true;
                                    }
                                    _ => self.scalar = true,
                                }
                            }
                        }
                        continue;
                    }
                    match byte {
                        b'"' => self.in_string = true,
                        b'{' | b'[' => self.depth += 1,
                        b'}' | b']' => {
                            if self.scalar && self.depth == 2 {
                                // `]` ends the array right after a scalar element.
                                if let Some(element) = self.element.as_mut() {
                                    element.pop();
                                }
                                self.end_element(rows);
                                self.phase = Phase::Done;
                                continue;
                            }
                            self.depth = self.depth.saturating_sub(1);
                            if self.depth == 2 {
                                self.end_element(rows);
                            }
                        }
                        b',' | b' ' | b'\t' | b'\r' | b'\n' if self.scalar && self.depth == 2 => {
                            if let Some(element) = self.element.as_mut() {
                                element.pop();
                            }
                            self.end_element(rows);
                        }
                        _ => {}
                    }
                }
                Phase::Done => return,
            }
        }
    }
}

/// Splits NDJSON into lines, a chunk at a time.
struct LineSplitter {
    line: Vec<u8>,
    number: usize,
    oversized: bool,
}

impl LineSplitter {
    fn push(&mut self, chunk: &[u8], max_row: usize, rows: &mut Vec<Row>) {
        for &byte in chunk {
            if byte == b'\n' {
                self.end_line(rows);
            } else if !self.oversized {
                self.line.push(byte);
                if self.line.len() > max_row {
                    self.oversized = true;
                    self.line = Vec::new();
                }
            }
        }
    }

    fn end_line(&mut self, rows: &mut Vec<Row>) {
        self.number += 1;
        let line = std::mem::take(&mut self.line);
        if self.oversized {
            rows.push(Row::TooLarge(self.number));
        } else if !line.iter().all(u8::is_ascii_whitespace) {
            rows.push(Row::Text(self.number, line));
        }
        self.oversized = false;
    }
}

enum Splitter {
    /// Not decided yet: the start of the body.
    Sniffing(Vec<u8>),
    Lines(LineSplitter),
    Collection(CollectionSplitter),
}

/// How much of the body's start decides its format when the content type does not.
const SNIFF_BYTES: usize = 4096;

fn sniff(start: &[u8]) -> Option<bool> {
    let first_line_end = start.iter().position(|b| *b == b'\n');
    let window = &start[..first_line_end.unwrap_or(start.len())];
    let collection = window.windows(19).any(|w| w == b"\"FeatureCollection\"");
    if collection {
        Some(true)
    } else if first_line_end.is_some() || start.len() >= SNIFF_BYTES {
        Some(false)
    } else {
        None
    }
}

struct Importer<'a> {
    config: &'a ApiConfig,
    store: Option<&'a PlacesStore>,
    batch: Vec<Place>,
    /// Single-node mode: everything, applied to the replica once at the end (one rebuild).
    local: Vec<Place>,
    report: ImportReport,
}

impl Importer<'_> {
    fn reject(&mut self, row: usize, reason: String) {
        self.report.rejected += 1;
        if self.report.rejected_rows.len() < self.config.import_max_rejected_listed {
            self.report.rejected_rows.push(RejectedRow { row, reason });
        } else {
            self.report.rejected_rows_truncated = true;
        }
    }

    async fn take(&mut self, rows: &mut Vec<Row>) -> Result<(), ApiError> {
        for row in rows.drain(..) {
            match row {
                Row::TooLarge(n) => self.reject(
                    n,
                    format!(
                        "row is larger than {} bytes",
                        self.config.import_max_row_bytes
                    ),
                ),
                Row::Text(n, bytes) => {
                    let parsed = std::str::from_utf8(&bytes)
                        .map_err(|_| "row is not UTF-8".to_owned())
                        .and_then(|text| Place::from_feature_json(text).map_err(|e| e.to_string()));
                    match parsed {
                        Ok(place) => self.batch.push(place),
                        Err(reason) => self.reject(n, reason),
                    }
                }
            }
            if self.batch.len() >= self.config.import_batch {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ApiError> {
        let batch = std::mem::take(&mut self.batch);
        let count = batch.len();
        match self.store {
            Some(store) => store.upsert(&batch).await.map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    format!(
                        "the store failed after {} places were imported: {e}",
                        self.report.imported
                    ),
                )
            })?,
            None => self.local.extend(batch),
        }
        self.report.imported += count;
        Ok(())
    }
}

/// Import the places of a streaming body.
pub(super) async fn import(
    mut body: Incoming,
    content_type: Option<&str>,
    config: &ApiConfig,
    replica: &dyn PlacesFollower,
    store: Option<&PlacesStore>,
) -> Result<ImportReport, ApiError> {
    let max_row = config.import_max_row_bytes;
    let mut splitter = match content_type.map(|t| t.split(';').next().unwrap_or("").trim()) {
        Some("application/x-ndjson" | "application/ndjson" | "application/jsonl") => {
            Splitter::Lines(LineSplitter {
                line: Vec::new(),
                number: 0,
                oversized: false,
            })
        }
        Some("application/geo+json") => Splitter::Collection(CollectionSplitter::new()),
        _ => Splitter::Sniffing(Vec::new()),
    };
    let mut importer = Importer {
        config,
        store,
        batch: Vec::new(),
        local: Vec::new(),
        report: ImportReport::default(),
    };
    let mut rows = Vec::new();
    let feed = |splitter: &mut Splitter, chunk: &[u8], rows: &mut Vec<Row>, last: bool| {
        if let Splitter::Sniffing(start) = splitter {
            start.extend_from_slice(chunk);
            let decided = sniff(start).or(last.then_some(false));
            let Some(collection) = decided else {
                return;
            };
            let start = std::mem::take(start);
            *splitter = if collection {
                Splitter::Collection(CollectionSplitter::new())
            } else {
                Splitter::Lines(LineSplitter {
                    line: Vec::new(),
                    number: 0,
                    oversized: false,
                })
            };
            match splitter {
                Splitter::Lines(s) => s.push(&start, max_row, rows),
                Splitter::Collection(s) => s.push(&start, max_row, rows),
                Splitter::Sniffing(_) => {}
            }
            return;
        }
        match splitter {
            Splitter::Lines(s) => s.push(chunk, max_row, rows),
            Splitter::Collection(s) => s.push(chunk, max_row, rows),
            Splitter::Sniffing(_) => {}
        }
    };
    let idle = config.body_timeout();
    while let Some(frame) = tokio::time::timeout(idle, body.frame())
        .await
        .map_err(|_| super::body_timeout(idle))?
    {
        let frame = frame.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!(
                    "reading the body failed after {} places: {e}",
                    importer.report.imported
                ),
            )
        })?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        let chunk: Bytes = chunk;
        feed(&mut splitter, &chunk, &mut rows, false);
        importer.take(&mut rows).await?;
    }
    feed(&mut splitter, &[], &mut rows, true);
    match &mut splitter {
        Splitter::Lines(lines) => lines.end_line(&mut rows),
        Splitter::Collection(collection) => match collection.phase {
            Phase::Done => {}
            Phase::Seek => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_collection",
                    "no \"features\" array found in the FeatureCollection",
                ));
            }
            Phase::Features => {
                if collection.element.is_some() || collection.oversized {
                    let index = collection.index;
                    importer.reject(index, "the body ended inside this feature".into());
                }
            }
        },
        Splitter::Sniffing(_) => {}
    }
    importer.take(&mut rows).await?;
    importer.flush().await?;
    if store.is_none() && !importer.local.is_empty() {
        let ids: Vec<String> = importer.local.iter().map(|p| p.id.clone()).collect();
        replica
            .replica()
            .apply(std::mem::take(&mut importer.local), &ids);
        replica.changed();
    }
    Ok(importer.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_collection(text: &str, chunk: usize, max_row: usize) -> Vec<Result<String, usize>> {
        let mut splitter = CollectionSplitter::new();
        let mut rows = Vec::new();
        for part in text.as_bytes().chunks(chunk) {
            splitter.push(part, max_row, &mut rows);
        }
        rows.into_iter()
            .map(|r| match r {
                Row::Text(_, bytes) => Ok(String::from_utf8(bytes).expect("utf-8")),
                Row::TooLarge(i) => Err(i),
            })
            .collect()
    }

    #[test]
    fn a_collection_splits_into_its_features_at_any_chunking() {
        let text = r#"{"type":"FeatureCollection","bbox":[0,1,2,3],"name":"x\"features\"[",
            "features":[ {"type":"Feature","id":"a","properties":{"s":"}]{"}} ,
            {"type":"Feature","id":"b","geometry":{"type":"Point","coordinates":[1,2]}}, 7, "s" ],
            "after":[{"ignored":true}]}"#;
        for chunk in [1, 2, 7, 1000] {
            let rows = split_collection(text, chunk, 10_000);
            assert_eq!(rows.len(), 4, "chunk {chunk}: {rows:?}");
            assert_eq!(
                rows[0].as_deref(),
                Ok(r#"{"type":"Feature","id":"a","properties":{"s":"}]{"}}"#)
            );
            assert!(rows[1].as_deref().is_ok_and(|r| r.ends_with("[1,2]}}")));
            assert_eq!(rows[2].as_deref(), Ok("7"));
            assert_eq!(rows[3].as_deref(), Ok("\"s\""));
        }
    }

    #[test]
    fn an_oversized_feature_is_skipped_not_buffered() {
        let big = "x".repeat(500);
        let text = format!(
            r#"{{"type":"FeatureCollection","features":[{{"id":"big","p":"{big}"}},{{"id":"small"}}]}}"#
        );
        let rows = split_collection(&text, 64, 100);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], Err(0));
        assert_eq!(rows[1].as_deref(), Ok(r#"{"id":"small"}"#));
    }

    #[test]
    fn lines_split_and_long_lines_are_refused() {
        let mut splitter = LineSplitter {
            line: Vec::new(),
            number: 0,
            oversized: false,
        };
        let mut rows = Vec::new();
        let long = "y".repeat(50);
        splitter.push(
            format!("{{\"a\":1}}\n\n{long}\n{{\"b\"").as_bytes(),
            20,
            &mut rows,
        );
        splitter.push(b":2}", 20, &mut rows);
        splitter.end_line(&mut rows);
        let got: Vec<(usize, Option<String>)> = rows
            .into_iter()
            .map(|r| match r {
                Row::Text(n, b) => (n, Some(String::from_utf8(b).expect("utf-8"))),
                Row::TooLarge(n) => (n, None),
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (1, Some("{\"a\":1}".to_owned())),
                (3, None),
                (4, Some("{\"b\":2}".to_owned()))
            ]
        );
    }

    #[test]
    fn sniffing_tells_collections_from_lines() {
        assert_eq!(
            sniff(br#"{"type":"FeatureCollection","features":["#),
            Some(true)
        );
        assert_eq!(sniff(b"{\"type\":\"Feature\"}\n{"), Some(false));
        assert_eq!(sniff(b"{\"type\":\"Feat"), None);
    }
}
