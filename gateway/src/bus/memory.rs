//! The in-memory bus of single-node mode: inboxes and ack cursors in this process.
//!
//! Bounded like the Redis inbox: at most `inbox_len` entries per user, expired entries
//! skipped on read and dropped on append.

use super::StoredNotification;
use geopush_proto::bus::Cursor;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

#[derive(Default)]
struct State {
    inboxes: HashMap<String, VecDeque<StoredNotification>>,
    acks: HashMap<(String, String), Cursor>,
    last_cursor: Option<Cursor>,
}

/// Inboxes and ack cursors in memory.
pub struct MemoryBus {
    state: Mutex<State>,
    inbox_len: usize,
}

impl MemoryBus {
    pub fn new(inbox_len: usize) -> MemoryBus {
        MemoryBus {
            state: Mutex::new(State::default()),
            inbox_len,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Append to a user's inbox; the entry's cursor is assigned here (`ms-seq`, increasing).
    pub fn append(&self, user: &str, mut entry: StoredNotification, now_ms: i64) -> Cursor {
        let mut state = self.lock();
        let ms = now_ms.max(0) as u64;
        let cursor = match state.last_cursor {
            Some(last) if last.ms >= ms => Cursor {
                ms: last.ms,
                seq: last.seq + 1,
            },
            _ => Cursor { ms, seq: 0 },
        };
        state.last_cursor = Some(cursor);
        entry.cursor = cursor;
        let inbox = state.inboxes.entry(user.to_owned()).or_default();
        inbox.retain(|e| e.expires_ms > now_ms);
        while inbox.len() >= self.inbox_len {
            inbox.pop_front();
        }
        inbox.push_back(entry);
        cursor
    }

    pub fn inbox_after(
        &self,
        user: &str,
        after: Option<Cursor>,
        count: usize,
        now_ms: i64,
    ) -> Vec<StoredNotification> {
        let state = self.lock();
        let Some(inbox) = state.inboxes.get(user) else {
            return Vec::new();
        };
        inbox
            .iter()
            .filter(|e| after.is_none_or(|a| e.cursor > a) && e.expires_ms > now_ms)
            .take(count)
            .cloned()
            .collect()
    }

    pub fn load_ack(&self, user: &str, device: &str) -> Option<Cursor> {
        self.lock()
            .acks
            .get(&(user.to_owned(), device.to_owned()))
            .copied()
    }

    pub fn store_ack(&self, user: &str, device: &str, cursor: Cursor) {
        let mut state = self.lock();
        let stored = state
            .acks
            .entry((user.to_owned(), device.to_owned()))
            .or_insert(cursor);
        *stored = (*stored).max(cursor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, expires_ms: i64) -> StoredNotification {
        StoredNotification {
            cursor: Cursor { ms: 0, seq: 0 },
            id: id.into(),
            title: "t".into(),
            body: "b".into(),
            data: None,
            ts: 0,
            expires_ms,
        }
    }

    #[test]
    fn inbox_is_ordered_bounded_and_expires() {
        let bus = MemoryBus::new(3);
        let a = bus.append("u", entry("a", 1_000), 10);
        let b = bus.append("u", entry("b", 50), 10);
        assert!(b > a);
        bus.append("u", entry("c", 1_000), 11);
        bus.append("u", entry("d", 1_000), 12);
        let ids = |after, now| {
            bus.inbox_after("u", after, 10, now)
                .into_iter()
                .map(|e| e.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(None, 20), ["b", "c", "d"], "a fell off the end");
        assert_eq!(ids(None, 60), ["c", "d"], "b expired");
        assert_eq!(ids(Some(b), 20), ["c", "d"]);
        bus.store_ack("u", "phone", b);
        bus.store_ack("u", "phone", a);
        assert_eq!(bus.load_ack("u", "phone"), Some(b), "acks never move back");
    }
}
