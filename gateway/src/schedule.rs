//! Scheduled sends: notifications with a `send_at` wait here until they are due.
//!
//! With Redis they wait in a sorted set (`gp:{sched}`, id by due time in Unix ms) beside a
//! hash of their requests (`gp:{sched}:req`), so they survive a restart of every worker.
//! Workers poll; one Lua script claims what is due by pushing its score a lease into the
//! future, so two replicas never both take the same notification. The claimer publishes it
//! and then removes it; if it dies in between, the lease runs out and another worker
//! publishes it again under the same id (clients dedupe by id: at-least-once).
//!
//! In single-node mode they wait in memory and are lost with the process.

use crate::bus::BusError;
use crate::bus::redis::Conn;
use crate::publish::Publisher;
use geopush_proto::bus::Keys;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Most due notifications claimed per poll.
const CLAIM_BATCH: usize = 100;

/// Claims due ids: `KEYS[1]` the sorted set, `KEYS[2]` the requests hash; `ARGV[1]` now,
/// `ARGV[2]` the batch, `ARGV[3]` the lease's end. Returns id, request, id, request, ….
const CLAIM_SCRIPT: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(due) do
  local request = redis.call('HGET', KEYS[2], id)
  if request then
    redis.call('ZADD', KEYS[1], ARGV[3], id)
    table.insert(out, id)
    table.insert(out, request)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
";

#[derive(Default)]
struct MemorySchedule {
    /// (due Unix ms, id) → request JSON.
    due: Mutex<BTreeMap<(i64, String), String>>,
}

/// Where scheduled notifications wait. Cheap to clone.
#[derive(Clone)]
pub enum Scheduler {
    Memory(Arc<MemoryScheduleHandle>),
    Redis {
        conn: Conn,
        keys: Keys,
        claim: Arc<redis::Script>,
    },
}

/// The in-memory schedule of a single-node gateway.
#[derive(Default)]
pub struct MemoryScheduleHandle(MemorySchedule);

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl Scheduler {
    pub fn memory() -> Scheduler {
        Scheduler::Memory(Arc::default())
    }

    pub fn redis(conn: Conn, keys: Keys) -> Scheduler {
        Scheduler::Redis {
            conn,
            keys,
            claim: Arc::new(redis::Script::new(CLAIM_SCRIPT)),
        }
    }

    /// Keep `request` (its JSON) until `at_ms`.
    pub async fn enqueue(&self, id: &str, at_ms: i64, request: &str) -> Result<(), BusError> {
        match self {
            Scheduler::Memory(memory) => {
                memory
                    .0
                    .due
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert((at_ms, id.to_owned()), request.to_owned());
                Ok(())
            }
            Scheduler::Redis { conn, keys, .. } => {
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .cmd("HSET")
                    .arg(keys.schedule_requests())
                    .arg(id)
                    .arg(request)
                    .ignore()
                    .cmd("ZADD")
                    .arg(keys.schedule())
                    .arg(at_ms)
                    .arg(id)
                    .ignore();
                pipe.query_async::<()>(&mut conn.clone())
                    .await
                    .map_err(unavailable)
            }
        }
    }

    /// Take what is due at `now_ms`: (id, request JSON) pairs, held for `lease`.
    pub async fn claim_due(
        &self,
        now_ms: i64,
        lease: Duration,
    ) -> Result<Vec<(String, String)>, BusError> {
        match self {
            Scheduler::Memory(memory) => {
                let mut due = memory.0.due.lock().unwrap_or_else(|p| p.into_inner());
                let later = due.split_off(&(now_ms + 1, String::new()));
                let taken = std::mem::replace(&mut *due, later);
                Ok(taken.into_iter().map(|((_, id), r)| (id, r)).collect())
            }
            Scheduler::Redis { conn, keys, claim } => {
                let lease_end = now_ms.saturating_add(lease.as_millis() as i64);
                let flat: Vec<String> = claim
                    .key(keys.schedule())
                    .key(keys.schedule_requests())
                    .arg(now_ms)
                    .arg(CLAIM_BATCH)
                    .arg(lease_end)
                    .invoke_async(&mut conn.clone())
                    .await
                    .map_err(unavailable)?;
                let mut pairs = Vec::with_capacity(flat.len() / 2);
                let mut items = flat.into_iter();
                while let (Some(id), Some(request)) = (items.next(), items.next()) {
                    pairs.push((id, request));
                }
                Ok(pairs)
            }
        }
    }

    /// Forget a claimed notification: it was published (or cannot ever be).
    pub async fn finish(&self, id: &str) -> Result<(), BusError> {
        match self {
            Scheduler::Memory(_) => Ok(()),
            Scheduler::Redis { conn, keys, .. } => {
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .cmd("ZREM")
                    .arg(keys.schedule())
                    .arg(id)
                    .ignore()
                    .cmd("HDEL")
                    .arg(keys.schedule_requests())
                    .arg(id)
                    .ignore();
                pipe.query_async::<()>(&mut conn.clone())
                    .await
                    .map_err(unavailable)
            }
        }
    }

    /// Whether nothing is scheduled.
    pub async fn is_empty(&self) -> Result<bool, BusError> {
        Ok(self.len().await? == 0)
    }

    /// Scheduled notifications waiting (for tests and metrics).
    pub async fn len(&self) -> Result<usize, BusError> {
        match self {
            Scheduler::Memory(memory) => {
                Ok(memory.0.due.lock().unwrap_or_else(|p| p.into_inner()).len())
            }
            Scheduler::Redis { conn, keys, .. } => redis::cmd("ZCARD")
                .arg(keys.schedule())
                .query_async(&mut conn.clone())
                .await
                .map_err(unavailable),
        }
    }
}

/// Publish scheduled notifications as they come due, until `stop`.
pub async fn run_scheduler(
    publisher: Publisher,
    poll: Duration,
    lease: Duration,
    stop: CancellationToken,
) {
    let scheduler = publisher.scheduler().clone();
    let mut failing = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(poll) => {}
            () = stop.cancelled() => return,
        }
        let due = match scheduler.claim_due(crate::publish::unix_ms(), lease).await {
            Ok(due) => {
                failing = false;
                due
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "cannot read the schedule; retrying");
                }
                failing = true;
                continue;
            }
        };
        for (id, request) in due {
            match publisher.publish_scheduled(&id, &request).await {
                Ok(published) => {
                    info!(id = %published.id, queued = published.queued, "scheduled notification sent");
                }
                Err(crate::publish::PublishError::Bus(e)) => {
                    // Left claimed: another poll (here or elsewhere) retries after the lease.
                    warn!(id, error = %e, "scheduled notification not sent yet; retrying after the lease");
                    continue;
                }
                Err(e) => {
                    warn!(id, error = %e, "scheduled notification cannot be sent; dropped");
                }
            }
            if let Err(e) = scheduler.finish(&id).await {
                warn!(id, error = %e, "scheduled notification sent but not removed; it may be sent again");
            }
        }
    }
}
