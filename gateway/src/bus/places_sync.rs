//! Places through Redis: the store that writes them (the places API, tools, tests) and the
//! follower that keeps every node's replica in sync.
//!
//! The store writes the `gp:{places}` hash (id → GeoJSON Feature) and appends each change to
//! the capped `gp:{places}:log` stream (one hash tag: one slot on a cluster). A node loads the hash at start, then follows the log
//! with a blocking `XREAD` on a connection of its own. If the log was trimmed past the last
//! entry the node applied (the stream's counts say so: `entries-added - length` passed the
//! entries the node has seen; `max-deleted-entry-id` is not kept by Redis before 7.2), or Redis went away,
//! the node reloads the whole hash: a node can fall behind but never diverges.

use super::BusError;
use super::redis::Conn;
use crate::geo::PlacesReplica;
use crate::node::Node;
use geopush_proto::bus::{Cursor, Keys};
use geopush_proto::place::Place;
use redis::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Entries the places log keeps (approximately).
pub const PLACES_LOG_LEN: usize = 10_000;
/// How long one `XREAD` blocks, milliseconds.
const FOLLOW_BLOCK_MS: u64 = 1_000;
/// Most log entries applied at once.
const FOLLOW_BATCH: usize = 1_000;

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

/// Writes places to Redis for every node to pick up.
#[derive(Clone)]
pub struct PlacesStore {
    conn: Conn,
    keys: Keys,
}

impl PlacesStore {
    pub fn new(conn: Conn, keys: Keys) -> PlacesStore {
        PlacesStore { conn, keys }
    }

    /// A store on its own connection (the worker, tools, tests).
    pub async fn connect(
        target: &super::redis::RedisTarget,
        prefix: &str,
    ) -> Result<PlacesStore, BusError> {
        Ok(PlacesStore::new(
            super::redis::connect(target, None).await?,
            Keys::new(prefix),
        ))
    }

    /// Insert or replace places (one hash write and one log entry each, pipelined).
    pub async fn upsert(&self, places: &[Place]) -> Result<(), BusError> {
        let mut conn = self.conn.clone();
        for chunk in places.chunks(500) {
            let mut pipe = redis::pipe();
            for place in chunk {
                let feature = place.to_feature().to_string();
                pipe.cmd("HSET")
                    .arg(self.keys.places())
                    .arg(&place.id)
                    .arg(&feature)
                    .ignore();
                pipe.cmd("XADD")
                    .arg(self.keys.places_log())
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(PLACES_LOG_LEN)
                    .arg("*")
                    .arg("op")
                    .arg("upsert")
                    .arg("id")
                    .arg(&place.id)
                    .arg("f")
                    .arg(&feature)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// Add a change-log entry for `id` to the pipeline (more fields may follow).
    fn log<'p>(
        &self,
        pipe: &'p mut redis::Pipeline,
        op: &str,
        id: &str,
    ) -> &'p mut redis::Pipeline {
        pipe.cmd("XADD")
            .arg(self.keys.places_log())
            .arg("MAXLEN")
            .arg("~")
            .arg(PLACES_LOG_LEN)
            .arg("*")
            .arg("op")
            .arg(op)
            .arg("id")
            .arg(id)
    }

    /// One place's Feature JSON, as stored.
    pub async fn get(&self, id: &str) -> Result<Option<String>, BusError> {
        redis::cmd("HGET")
            .arg(self.keys.places())
            .arg(id)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    /// Delete places by id; how many existed.
    pub async fn delete_existing(&self, id: &str) -> Result<bool, BusError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("HDEL").arg(self.keys.places()).arg(id);
        self.log(&mut pipe, "delete", id).ignore();
        let (removed,): (u64,) = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(removed > 0)
    }

    /// Delete places by id.
    pub async fn delete(&self, ids: &[String]) -> Result<(), BusError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HDEL").arg(self.keys.places()).arg(id).ignore();
            self.log(&mut pipe, "delete", id).ignore();
        }
        pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    /// Trim the log to at most `len` entries (exactly), for operators and tests.
    pub async fn trim_log(&self, len: usize) -> Result<(), BusError> {
        let mut conn = self.conn.clone();
        redis::cmd("XTRIM")
            .arg(self.keys.places_log())
            .arg("MAXLEN")
            .arg(len)
            .query_async::<Value>(&mut conn)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }
}

/// Where the log stands, read in one `XINFO STREAM` (so the fields agree).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LogInfo {
    /// The newest entry's id (`0-0` without a log).
    last: Cursor,
    /// Entries ever added.
    added: u64,
    /// Entries kept.
    length: u64,
}

impl LogInfo {
    /// Whether the entry after the `seen`-th ever added was trimmed away: the oldest kept
    /// entry is the `(added - length + 1)`-th. (Redis before 7.2 does not move
    /// `max-deleted-entry-id` when it trims, so the counts are what can be trusted.)
    fn trimmed_after(&self, seen: u64) -> bool {
        self.added.saturating_sub(self.length) > seen
    }
}

async fn log_info(conn: &mut Conn, keys: &Keys) -> Result<LogInfo, BusError> {
    let exists: bool = redis::cmd("EXISTS")
        .arg(keys.places_log())
        .query_async(conn)
        .await
        .map_err(unavailable)?;
    if !exists {
        // No log yet (no place was ever written).
        return Ok(LogInfo {
            last: Cursor { ms: 0, seq: 0 },
            added: 0,
            length: 0,
        });
    }
    let info: Value = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(keys.places_log())
        .query_async(conn)
        .await
        .map_err(unavailable)?;
    let pairs: Vec<(String, Value)> = match info {
        Value::Map(pairs) => pairs
            .into_iter()
            .filter_map(|(k, v)| redis::from_redis_value::<String>(k).ok().map(|k| (k, v)))
            .collect(),
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|kv| {
                Some((
                    redis::from_redis_value::<String>(kv.first()?.clone()).ok()?,
                    kv.get(1)?.clone(),
                ))
            })
            .collect(),
        other => {
            return Err(BusError::Protocol(format!(
                "XINFO STREAM answered {other:?}"
            )));
        }
    };
    let field = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let number = |name: &str| {
        field(name)
            .and_then(|v| redis::from_redis_value::<u64>(v).ok())
            .ok_or_else(|| BusError::Protocol(format!("XINFO STREAM without {name}")))
    };
    let last = field("last-generated-id")
        .and_then(|v| redis::from_redis_value::<String>(v).ok())
        .and_then(|id| Cursor::parse(&id))
        .unwrap_or(Cursor { ms: 0, seq: 0 });
    Ok(LogInfo {
        last,
        added: number("entries-added")?,
        length: number("length")?,
    })
}

/// Every place in the hash; rows that no longer parse are skipped with a warning.
async fn load_snapshot(conn: &mut Conn, keys: &Keys) -> Result<Vec<Place>, BusError> {
    let all: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.places())
        .query_async(conn)
        .await
        .map_err(unavailable)?;
    let mut places = Vec::with_capacity(all.len());
    for (id, feature) in all {
        match Place::from_feature_json(&feature) {
            Ok(place) => places.push(place),
            Err(e) => warn!(id, error = %e, "stored place does not parse; skipped"),
        }
    }
    Ok(places)
}

/// Whoever keeps a places replica in sync with the store: a gateway node, the worker.
pub trait PlacesFollower: Send + Sync + 'static {
    fn replica(&self) -> &PlacesReplica;
    /// The replica was loaded or changed.
    fn changed(&self);
}

impl PlacesFollower for Node {
    fn replica(&self) -> &PlacesReplica {
        &self.places
    }
    fn changed(&self) {
        self.metrics.places.set(self.places.snapshot().len() as i64);
        self.places_loaded.store(true, Ordering::Release);
    }
}

/// Load the snapshot, then follow the log until `stop`; reload after trims and outages.
pub async fn run_places_sync<F: PlacesFollower>(
    node: Arc<F>,
    mut conn: Conn,
    keys: Keys,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    'reload: loop {
        // Read the log head before the hash: changes after it are replayed from the log.
        let snapshot = async {
            let head = log_info(&mut conn, &keys).await?;
            let places = load_snapshot(&mut conn, &keys).await?;
            Ok::<_, BusError>((head, places))
        };
        let (head, places) = tokio::select! {
            result = snapshot => match result {
                Ok(loaded) => loaded,
                Err(e) => {
                    warn!(error = %e, "places snapshot failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue 'reload;
                }
            },
            () = stop.cancelled() => return,
        };
        backoff = Duration::from_millis(100);
        info!(places = places.len(), "places snapshot loaded");
        node.replica().replace(places);
        node.changed();
        // The last entry applied, and how many entries were ever added up to it.
        let mut applied = head.last;
        let mut seen = head.added;
        loop {
            let mut command = redis::cmd("XREAD");
            command
                .arg("COUNT")
                .arg(FOLLOW_BATCH)
                .arg("BLOCK")
                .arg(FOLLOW_BLOCK_MS)
                .arg("STREAMS")
                .arg(keys.places_log())
                .arg(applied.to_string());
            let read = command
                .query_async::<Option<Vec<(String, Vec<(String, HashMap<String, String>)>)>>>(
                    &mut conn,
                );
            let streams = tokio::select! {
                result = read => match result {
                    Ok(streams) => streams.unwrap_or_default(),
                    Err(e) => {
                        warn!(error = %e, "following the places log failed; reloading");
                        continue 'reload;
                    }
                },
                () = stop.cancelled() => return,
            };
            let mut upserts = Vec::new();
            let mut deletes = Vec::new();
            let mut last = applied;
            let mut read = 0;
            for (_, entries) in streams {
                for (id, fields) in entries {
                    read += 1;
                    if let Some(cursor) = Cursor::parse(&id) {
                        last = last.max(cursor);
                    }
                    match (fields.get("op").map(String::as_str), fields.get("id")) {
                        (Some("upsert"), Some(_)) => {
                            match fields.get("f").map(|f| Place::from_feature_json(f)) {
                                Some(Ok(place)) => {
                                    deletes.retain(|d: &String| *d != place.id);
                                    upserts.retain(|p: &Place| p.id != place.id);
                                    upserts.push(place);
                                }
                                _ => warn!(entry = id, "places log entry does not parse; skipped"),
                            }
                        }
                        (Some("delete"), Some(place)) => {
                            upserts.retain(|p: &Place| p.id != *place);
                            deletes.push(place.clone());
                        }
                        _ => warn!(entry = id, "unknown places log entry; skipped"),
                    }
                }
            }
            // Was the entry after `applied` trimmed before we read it? (Checked after the
            // read: a trim since then is a harmless false alarm, a reload.)
            match log_info(&mut conn, &keys)
                .await
                .map(|info| info.trimmed_after(seen))
            {
                Ok(true) => {
                    warn!("places log trimmed past this node's position; reloading the snapshot");
                    continue 'reload;
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, "checking the places log failed; reloading");
                    continue 'reload;
                }
            }
            if !upserts.is_empty() || !deletes.is_empty() {
                // Upserted places replace older versions of themselves.
                let mut replaced: Vec<String> = upserts.iter().map(|p| p.id.clone()).collect();
                replaced.extend(deletes);
                node.replica().apply(upserts, &replaced);
                node.changed();
            }
            applied = last;
            seen += read;
        }
    }
}
