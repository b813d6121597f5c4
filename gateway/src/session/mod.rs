//! One WebSocket session, from the upgraded socket to its close.
//!
//! A session is two tasks: this reader, which parses client frames and runs the session's
//! timers, and a writer ([`outbound::run_writer`]) that drains the session's queue. (Polling
//! the writer inside this task saved ~270 bytes per connection, but then a burst larger than
//! the queue could fill it before the task was scheduled to drain it — a 4009 for a client
//! that reads fine; `tests/tests/user_order.rs` failed one run in ten. docs/benchmarks.md §1.)
//! The per-fix path reads top to bottom here: decode → validate → rate limit → index.
//!
//! The reader keeps `read_frame` (not cancel safe) in one pinned future that lives across
//! `select!` iterations and is replaced only when it completes, so no frame is ever torn.
//! When the parser's buffer is provably empty after a frame, the parser is dropped and the
//! next read waits on socket readiness alone: an idle session holds no read buffer.

pub mod outbound;
pub mod socket;

use crate::auth::{Claims, TokenVerifier};
use crate::bus::REPLAY_PAGE;
use crate::geo::clients::SessionId;
use crate::geo::fences::{FenceEvent, FenceTracker, GeofenceRecord};
use crate::geo::nearby::NearbyTracker;
use crate::geo::places::PlacesSnapshot;
use crate::hub::SubscribeError;
use crate::node::{ConnectionSlot, Node};
use crate::status::Counts;
use bytes::{Bytes, BytesMut};
use fastwebsockets::{OpCode, Payload, Role, WebSocketError, WebSocketRead, after_handshake_split};
use geopush_proto::bus::Cursor;
use geopush_proto::frames::{ClientFrame, LocationFrame, ServerFrame, decode_client_frame};
use geopush_proto::{CloseCode, ErrorCode, Fix};
use hyper_util::rt::TokioIo;
use outbound::{AckMatch, Outbound, Outgoing, ReplayFrom, ReplayStep, run_writer};
use socket::{SessionSocket, SocketReader, SocketWriter};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info, warn};

/// The close label used in metrics when a peer vanished without a close frame.
const ABNORMAL_CLOSE: u16 = 1006;

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A frame as read, owning its payload.
struct InFrame {
    fin: bool,
    opcode: OpCode,
    /// Clients must mask every frame (RFC 6455 §5.1).
    masked: bool,
    /// Bytes the frame occupied on the wire (head + payload).
    wire_len: u64,
    payload: BytesMut,
}

/// Close codes a peer may send (RFC 6455 §7.4.1–2): 1000–1003, 1007–1014, 3000–4999.
fn is_valid_peer_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Bytes read at once while the parser is parked; a frame that fits is parsed in place.
const SMALL_READ: usize = 512;

/// `bytes` as exactly one complete, final, masked frame with a short payload, unmasked —
/// or `None` for anything else (fragments, several frames, partial frames, reserved bits,
/// unknown opcodes, unmasked or oversized frames), which fastwebsockets then parses and,
/// where it must, refuses.
fn single_small_frame(bytes: &[u8], max_frame_bytes: usize) -> Option<InFrame> {
    let (&first, &second) = (bytes.first()?, bytes.get(1)?);
    let fin = first & 0x80 != 0;
    let reserved = first & 0x70;
    let opcode = match first & 0x0F {
        0x1 => OpCode::Text,
        0x2 => OpCode::Binary,
        0x8 => OpCode::Close,
        0x9 => OpCode::Ping,
        0xA => OpCode::Pong,
        _ => return None,
    };
    let masked = second & 0x80 != 0;
    if !fin || reserved != 0 || !masked {
        return None;
    }
    let (head_len, payload_len) = match second & 0x7F {
        126 => (
            4,
            usize::from(u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?])),
        ),
        127 => return None,
        short => (2, usize::from(short)),
    };
    let is_control = matches!(opcode, OpCode::Close | OpCode::Ping | OpCode::Pong);
    if payload_len > max_frame_bytes || (is_control && payload_len > 125) {
        return None;
    }
    let mask_end = head_len + 4;
    if bytes.len() != mask_end + payload_len {
        return None;
    }
    let mask = &bytes[head_len..mask_end];
    let payload: BytesMut = bytes[mask_end..]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    Some(InFrame {
        fin,
        opcode,
        masked,
        wire_len: bytes.len() as u64,
        payload,
    })
}

/// The frame parser, or nothing while the session is idle.
enum FrameReader {
    Parked,
    Active(WebSocketRead<SocketReader>),
}

fn new_parser(
    socket: &Arc<SessionSocket>,
    prefix: Option<Bytes>,
    max_frame_bytes: usize,
) -> WebSocketRead<SocketReader> {
    let writer = SocketWriter::new(socket.clone());
    let (mut read, _) = after_handshake_split(
        SocketReader::new(socket.clone(), prefix),
        writer,
        Role::Server,
    );
    configure_reader(&mut read, max_frame_bytes);
    read
}

fn configure_reader(read: &mut WebSocketRead<SocketReader>, max_frame_bytes: usize) {
    // Pings and closes are answered by the session through its writer.
    read.set_auto_pong(false);
    read.set_auto_close(false);
    // fastwebsockets refuses payloads >= the limit; ours is inclusive.
    read.set_max_message_size(max_frame_bytes + 1);
}

/// Read one frame, building a parser first if the session was idle.
///
/// # Cancel safety
/// Not cancel safe (neither is `read_frame`): the caller keeps the future pinned until it
/// completes, and drops it only when the session ends.
async fn read_next(
    reader: FrameReader,
    socket: Arc<SessionSocket>,
    max_frame_bytes: usize,
) -> (FrameReader, Result<InFrame, WebSocketError>) {
    let mut parser = match reader {
        FrameReader::Active(parser) => parser,
        FrameReader::Parked => loop {
            if let Err(e) = socket.readable().await {
                return (FrameReader::Parked, Err(e.into()));
            }
            // The common case, one small complete frame, is parsed from the stack; anything
            // else goes to fastwebsockets with these bytes in front.
            let mut buf = [0u8; SMALL_READ];
            match socket.try_read(&mut buf) {
                Ok(0) => return (FrameReader::Parked, Err(WebSocketError::UnexpectedEOF)),
                Ok(n) => match single_small_frame(&buf[..n], max_frame_bytes) {
                    Some(frame) => {
                        socket.count_read(n);
                        return (FrameReader::Parked, Ok(frame));
                    }
                    None => {
                        break new_parser(
                            &socket,
                            Some(Bytes::copy_from_slice(&buf[..n])),
                            max_frame_bytes,
                        );
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return (FrameReader::Parked, Err(e.into())),
            }
        },
    };
    let result = parser
        .read_frame(&mut |_| std::future::ready(Ok::<(), Infallible>(())))
        .await
        .map(|mut frame| {
            // fastwebsockets keeps the mask private; its head encoder shows it.
            let mut head = [0u8; 14];
            let head_len = frame.fmt_head(&mut head);
            InFrame {
                fin: frame.fin,
                opcode: frame.opcode,
                masked: head[1] & 0x80 != 0,
                wire_len: (head_len + frame.payload.len()) as u64,
                payload: match frame.payload {
                    Payload::Bytes(bytes) => bytes,
                    other => BytesMut::from(&other[..]),
                },
            }
        });
    (FrameReader::Active(parser), result)
}

/// What the reader does after handling something.
enum Flow {
    Continue,
    /// Stop reading; the close (if any) is already requested from the writer.
    Stop,
}

/// Per-connection fix rate limiting: a token bucket; fixes beyond it are coalesced into
/// one pending fix (latest wins), and a persistent flood is reported.
struct FixRate {
    per_second: f64,
    tokens: f64,
    refilled_at: Instant,
    /// Fixes received in the current one-second window, and the window's start.
    window_start: Instant,
    window_count: u32,
    /// Consecutive windows over the flood threshold.
    flooding_windows: u32,
    /// When the last `rate_limited` error was sent (one per second at most).
    warned_at: Option<Instant>,
}

impl FixRate {
    fn new(per_second: u32, now: Instant) -> FixRate {
        FixRate {
            per_second: f64::from(per_second),
            tokens: f64::from(per_second),
            refilled_at: now,
            window_start: now,
            window_count: 0,
            flooding_windows: 0,
            warned_at: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second);
        self.refilled_at = now;
    }

    /// Count an arriving fix; true when the flood has lasted `flood_seconds` windows.
    fn count_arrival(&mut self, now: Instant, flood_factor: u32, flood_seconds: u32) -> bool {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= Duration::from_secs(1) {
            let threshold = self.per_second * f64::from(flood_factor);
            let flooded =
                f64::from(self.window_count) > threshold && elapsed < Duration::from_secs(2);
            self.flooding_windows = if flooded {
                self.flooding_windows + 1
            } else {
                0
            };
            self.window_start = now;
            self.window_count = 0;
        }
        self.window_count += 1;
        self.flooding_windows >= flood_seconds
    }

    /// Take a token if one is there.
    fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// When the next token will be there.
    fn next_token_at(&self) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.refilled_at + Duration::from_secs_f64(missing / self.per_second)
    }
}

/// The token state of a session.
enum Auth {
    /// Valid until `expires_at`.
    Valid { expires_at: Instant },
    /// Expired; closed with 4001 at `close_at` unless refreshed.
    Grace { close_at: Instant },
}

/// The `geofence` frame for an event.
fn geofence_frame(places: &PlacesSnapshot, event: &FenceEvent) -> Bytes {
    let kind = match event.kind {
        geopush_proto::frames::GeofenceEvent::Enter => "enter",
        geopush_proto::frames::GeofenceEvent::Exit => "exit",
        geopush_proto::frames::GeofenceEvent::Dwell => "dwell",
    };
    let summary = &places.entry(event.place).summary_json;
    Bytes::from(format!(
        r#"{{"type":"geofence","event":"{kind}","place":{summary},"ts":{}}}"#,
        event.ts_ms
    ))
}

/// One connected client.
struct Session {
    node: Arc<Node>,
    id: SessionId,
    user: Arc<str>,
    device: Arc<str>,
    fences: FenceTracker,
    /// Made at the first fix: a client that never sends one does not pay for it.
    nearby: Option<Box<NearbyTracker>>,
    /// Where the last processed fix was, for geofence event records.
    last_position: Option<(f64, f64)>,
    outbound: Outbound,
    auth: Auth,
    last_seen: Instant,
    next_ping_at: Instant,
    rate: FixRate,
    /// A fix waiting for the rate limiter; replaced by newer fixes. Boxed, like `partial`:
    /// rare, and every byte of `Session` is paid by every connection.
    pending_fix: Option<Box<Fix>>,
    /// `ts` of the last fix processed; older fixes are ignored.
    last_fix_ts: i64,
    bad_window_start: Instant,
    bad_in_window: u32,
    /// A fragmented message being reassembled.
    partial: Option<Box<(OpCode, BytesMut)>>,
    /// Ids whose acks were counted lately, so a repeated ack is not counted twice. Boxed:
    /// 8 bytes per session until its first ack rather than a `VecDeque`'s 32.
    #[allow(clippy::box_collection)]
    counted_acks: Option<Box<VecDeque<Box<str>>>>,
}

/// How many recently counted ack ids a session remembers.
const COUNTED_ACKS_REMEMBERED: usize = 32;

/// Longest token lifetime the session timer honours; a later `exp` is treated as this.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);

fn expiry_instant(claims: &Claims) -> Instant {
    let left = Duration::from_secs(TokenVerifier::seconds_left(claims).max(0) as u64);
    Instant::now() + left.min(MAX_TOKEN_LIFETIME)
}

/// Queue a user's inbox to a session from where `from` says (an explicit `resume`, a
/// recovery rewind, or after what the session already has), else after the device's
/// stored ack cursor. Live notifications
/// are held meanwhile, so the client sees its inbox in order; pages wait for room in the
/// queue instead of overflowing it. A newer replay or the session's close stops this one.
pub(crate) async fn replay(
    node: Arc<Node>,
    user: Arc<str>,
    device: Arc<str>,
    outbound: Outbound,
    from: ReplayFrom,
) {
    let (generation, delivered) = outbound.begin_replay(from);
    // Read the inbox only once live messages reach this node: a notification published
    // in between is then either in what we read or delivered live (and held meanwhile).
    if !node.bus.user_channel_ready(&user, SUBSCRIBE_WAIT).await {
        warn!(user = %user, "user channel not confirmed in time; replaying anyway");
    }
    let mut after = match delivered {
        Some(cursor) => Some(cursor),
        None => match node.bus.load_ack(&user, &device).await {
            Ok(stored) => stored,
            Err(e) => {
                warn!(user = %user, error = %e, "cannot load the ack cursor; replaying the whole inbox");
                None
            }
        },
    };
    let half = outbound.capacity().div_ceil(2);
    'pages: loop {
        let page = match node
            .bus
            .inbox_after(&user, after, REPLAY_PAGE.min(half), unix_ms())
            .await
        {
            Ok(page) => page,
            Err(e) => {
                warn!(user = %user, error = %e, "inbox replay interrupted");
                if !node.bus.is_up() {
                    // The recovery replays this session and ends the hold then.
                    outbound.mark_bus_gap();
                    return;
                }
                break;
            }
        };
        if page.is_empty() {
            break;
        }
        for entry in &page {
            match outbound.push_replayed(
                generation,
                entry.cursor,
                &entry.id,
                entry.frame(),
                &node.metrics,
            ) {
                ReplayStep::Superseded => return,
                ReplayStep::Queued => node.status.count(
                    &entry.id,
                    Counts {
                        delivered: 1,
                        ..Counts::default()
                    },
                ),
                ReplayStep::Skipped => {}
            }
            after = Some(entry.cursor);
        }
        while outbound.room() < half {
            if outbound.close_requested().is_some() {
                break 'pages;
            }
            tokio::select! {
                () = tokio::time::sleep(REPLAY_ROOM_POLL) => {}
                () = node.hard_stop.cancelled() => break 'pages,
            }
        }
    }
    // Live notifications held meanwhile were not counted when they arrived: count those
    // the replay had not already delivered.
    let delivered = Counts {
        delivered: 1,
        ..Counts::default()
    };
    let queued = outbound.end_replay(generation, &node.metrics);
    if !queued.is_empty() {
        node.metrics
            .deliveries
            .get_or_create(&crate::metrics::KindLabel {
                kind: "notification",
            })
            .inc_by(queued.len() as u64);
    }
    for id in queued {
        node.status.count(&id, delivered);
    }
}

/// Longest a replay waits for its user's channel subscription before reading the inbox.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);

/// How often a replay waiting for room in the queue looks again.
const REPLAY_ROOM_POLL: Duration = Duration::from_millis(10);

/// Complete the upgrade; the session's TCP socket and the bytes read past the request.
async fn upgraded_socket(
    upgrade: fastwebsockets::upgrade::UpgradeFut,
) -> Option<(Arc<SessionSocket>, Option<Bytes>)> {
    let ws = match upgrade.await {
        Ok(ws) => ws,
        Err(e) => {
            debug!(error = %e, "upgrade did not complete");
            return None;
        }
    };
    match ws
        .into_inner()
        .into_inner()
        .downcast::<TokioIo<TcpStream>>()
    {
        Ok(parts) => {
            let prefix = (!parts.read_buf.is_empty()).then_some(parts.read_buf);
            Some((SessionSocket::new(parts.io.into_inner()), prefix))
        }
        Err(_) => {
            warn!("upgraded connection is not a TCP stream; dropping it");
            None
        }
    }
}

/// The frame reader (parked when no bytes came with the upgrade) and the frame writer.
fn socket_halves(
    socket: &Arc<SessionSocket>,
    prefix: Option<Bytes>,
    max_frame_bytes: usize,
) -> (FrameReader, fastwebsockets::WebSocketWrite<SocketWriter>) {
    let has_prefix = prefix.is_some();
    let (first_parser, mut ws_write) = after_handshake_split(
        SocketReader::new(socket.clone(), prefix),
        SocketWriter::new(socket.clone()),
        Role::Server,
    );
    // Vectored writes for every frame: no per-session copy buffer grows.
    ws_write.set_writev_threshold(0);
    let reader = if has_prefix {
        let mut parser = first_parser;
        configure_reader(&mut parser, max_frame_bytes);
        FrameReader::Active(parser)
    } else {
        // Not needed until bytes arrive: do not keep its 8 KiB buffer alive meanwhile.
        drop(first_parser);
        FrameReader::Parked
    };
    (reader, ws_write)
}

/// Who a session is for, taken from its token before the upgrade completes.
struct Identity {
    user: Arc<str>,
    device: Arc<str>,
    expires_at: Instant,
}

/// Run a session on an upgraded connection until it ends. Holds the connection slot.
///
/// Not an `async fn`: its arguments would live in the session's future for the whole
/// session; only what the session needs of the token goes in (see docs/benchmarks.md §1).
pub(crate) fn run(
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    claims: Claims,
    slot: ConnectionSlot,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let identity = Identity {
        user: claims.sub.as_str().into(),
        device: claims.device().into(),
        expires_at: expiry_instant(&claims),
    };
    serve(upgrade, identity, slot)
}

async fn serve(
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    identity: Identity,
    slot: ConnectionSlot,
) {
    let node = slot.node().clone();
    let Some((socket, prefix)) = upgraded_socket(upgrade).await else {
        return;
    };
    let max_frame_bytes = node.config.max_frame_bytes;

    let outbound = Outbound::new(node.config.queue_len);
    let Identity {
        user,
        device,
        expires_at,
    } = identity;
    let id = node
        .hub
        .register(user.clone(), device.clone(), outbound.clone());
    // Whatever ends this task (even a panic), the session leaves the hub and its channels.
    let _registered = Registered {
        node: node.clone(),
        id,
    };
    let now = Instant::now();
    let mut session = Session {
        id,
        user,
        device,
        fences: FenceTracker::default(),
        nearby: None,
        last_position: None,
        outbound: outbound.clone(),
        auth: Auth::Valid { expires_at },
        last_seen: now,
        next_ping_at: now + node.config.heartbeat(),
        rate: FixRate::new(node.config.max_fixes_per_second, now),
        pending_fix: None,
        last_fix_ts: i64::MIN,
        bad_window_start: now,
        bad_in_window: 0,
        partial: None,
        counted_acks: None,
        node: node.clone(),
    };
    debug!(session = id, user = %session.user, device = %session.device, "session open");
    session.send(&ServerFrame::Welcome {
        session: &format!("{id:x}"),
        node: &node.node_id,
        heartbeat_s: node.config.heartbeat_seconds,
        limits: &node.limits,
    });

    // Connected while the bus is down: what arrives live before the recovery must not
    // make the recovery replay skip what was stored meanwhile.
    if !node.bus.is_up() {
        outbound.mark_bus_gap();
    }
    // Replay what lies after this device's acked cursor, unasked.
    node.tasks.spawn(replay(
        node.clone(),
        session.user.clone(),
        session.device.clone(),
        outbound.clone(),
        ReplayFrom::Delivered,
    ));

    // Both halves are built in a block so that nothing they were made from stays in the
    // session's future. The writer is a task of its own: see the module header.
    let (read, writer) = {
        let (reader, ws_write) = socket_halves(&socket, prefix, max_frame_bytes);
        (
            read_next(reader, socket.clone(), max_frame_bytes),
            node.tasks.spawn(run_writer(
                ws_write,
                outbound.clone(),
                node.metrics.clone(),
                node.config.write_timeout(),
            )),
        )
    };
    tokio::pin!(writer);
    tokio::pin!(read);
    let mut consumed: u64 = 0;
    let mut deadline = session.next_deadline();
    let sleep = sleep_until(deadline);
    tokio::pin!(sleep);

    let writer_end = loop {
        tokio::select! {
            biased;
            end = &mut writer => break end.ok(),
            () = node.hard_stop.cancelled() => {
                outbound.abandon();
                break None;
            }
            (parser, result) = &mut read => {
                let flow = match result {
                    Ok(frame) => {
                        consumed += frame.wire_len;
                        // Everything read from the socket has been parsed: drop the parser
                        // and its buffer until more bytes arrive.
                        let next = if consumed == socket.bytes_read() { FrameReader::Parked } else { parser };
                        read.set(read_next(next, socket.clone(), max_frame_bytes));
                        session.on_frame(frame)
                    }
                    Err(e) => session.on_read_error(e),
                };
                if let Flow::Stop = flow {
                    break wait_writer(&mut writer, &node).await;
                }
            }
            () = &mut sleep => {
                if let Flow::Stop = session.on_timer(Instant::now()) {
                    break wait_writer(&mut writer, &node).await;
                }
            }
        }
        let next = session.next_deadline();
        if next != deadline {
            deadline = next;
            sleep.as_mut().reset(deadline);
        }
    };

    let code = outbound
        .close_requested()
        .map_or(ABNORMAL_CLOSE, |c| c.code);
    node.metrics.count_close(code);
    debug!(session = id, close = code, writer = ?writer_end, "session closed");
    drop(slot);
}

/// A session's place in the hub, given back on drop.
struct Registered {
    node: Arc<Node>,
    id: SessionId,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.node.hub.unregister(self.id);
    }
}

/// Let the writer send what is queued and the close frame; its every write is bounded.
async fn wait_writer(
    writer: &mut std::pin::Pin<&mut tokio::task::JoinHandle<outbound::WriterEnd>>,
    node: &Node,
) -> Option<outbound::WriterEnd> {
    tokio::select! {
        end = writer.as_mut() => end.ok(),
        () = node.hard_stop.cancelled() => None,
    }
}

impl Session {
    fn send(&self, frame: &ServerFrame<'_>) {
        let json = Bytes::from(frame.to_json());
        self.outbound
            .push(Outgoing::Text { json, since: None }, &self.node.metrics);
    }

    fn send_error(&self, code: ErrorCode, message: &str) {
        self.send(&ServerFrame::Error { code, message });
    }

    fn close(&self, code: CloseCode, reason: &'static str) -> Flow {
        self.outbound.close(code, reason);
        Flow::Stop
    }

    fn next_deadline(&self) -> Instant {
        let auth = match self.auth {
            Auth::Valid { expires_at } => expires_at,
            Auth::Grace { close_at } => close_at,
        };
        let mut next = self.next_ping_at.min(auth);
        if self.pending_fix.is_some() {
            next = next.min(self.rate.next_token_at());
        }
        if let Some(dwell) = self.fences.next_dwell_at() {
            next = next.min(dwell);
        }
        next
    }

    fn on_timer(&mut self, now: Instant) -> Flow {
        if now >= self.next_ping_at {
            if now.saturating_duration_since(self.last_seen) >= self.node.config.idle_timeout() {
                debug!(
                    session = self.id,
                    "no sign of life for two heartbeats; dropping"
                );
                self.outbound.abandon();
                return Flow::Stop;
            }
            self.outbound.push(Outgoing::Ping, &self.node.metrics);
            self.next_ping_at = now + self.node.config.heartbeat();
        }
        match self.auth {
            Auth::Valid { expires_at } if now >= expires_at => {
                self.send_error(
                    ErrorCode::TokenExpired,
                    "token expired: send refresh with a new token",
                );
                self.auth = Auth::Grace {
                    close_at: now + self.node.config.token_grace(),
                };
            }
            Auth::Grace { close_at } if now >= close_at => {
                info!(session = self.id, user = %self.user, "token expired and was not refreshed");
                return self.close(CloseCode::Auth, "token expired");
            }
            _ => {}
        }
        if self.pending_fix.is_some()
            && self.rate.try_take(now)
            && let Some(fix) = self.pending_fix.take()
        {
            self.process_fix(*fix);
        }
        if self.fences.next_dwell_at().is_some_and(|due| due <= now) {
            let places = self.node.places.snapshot();
            let mut events = Vec::new();
            self.fences.on_timer(&places, now, unix_ms(), &mut events);
            self.emit_fence_events(&places, &events);
        }
        Flow::Continue
    }

    fn on_read_error(&mut self, error: WebSocketError) -> Flow {
        match error {
            WebSocketError::FrameTooLarge => {
                self.node.metrics.count_bad_frame(ErrorCode::TooLarge);
                let message = format!("frame exceeds {} bytes", self.node.config.max_frame_bytes);
                self.send_error(ErrorCode::TooLarge, &message);
                self.close(CloseCode::TooBig, "frame too large")
            }
            WebSocketError::InvalidUTF8 => self.close(CloseCode::InvalidPayload, "invalid UTF-8"),
            WebSocketError::UnexpectedEOF | WebSocketError::IoError(_) => {
                debug!(session = self.id, error = %error, "peer went away");
                self.outbound.abandon();
                Flow::Stop
            }
            other => {
                debug!(session = self.id, error = %other, "protocol error");
                self.close(CloseCode::ProtocolError, "protocol error")
            }
        }
    }

    fn on_frame(&mut self, frame: InFrame) -> Flow {
        self.last_seen = Instant::now();
        self.node.metrics.frames_in.inc();
        let InFrame {
            fin,
            opcode,
            masked,
            payload,
            ..
        } = frame;
        if !masked {
            return self.close(CloseCode::ProtocolError, "client frames must be masked");
        }
        match opcode {
            OpCode::Ping => {
                self.outbound
                    .push(Outgoing::Pong(payload.freeze()), &self.node.metrics);
                Flow::Continue
            }
            OpCode::Pong => Flow::Continue,
            OpCode::Close => {
                // Echo a valid close code (1000 for none); anything else fails the
                // connection as RFC 6455 §7.4 says.
                let echoed = match payload.len() {
                    0 => CloseCode::Normal.as_u16(),
                    1 => return self.close(CloseCode::ProtocolError, "close payload of one byte"),
                    _ => u16::from_be_bytes([payload[0], payload[1]]),
                };
                if !is_valid_peer_close_code(echoed) {
                    return self.close(CloseCode::ProtocolError, "invalid close code");
                }
                if std::str::from_utf8(payload.get(2..).unwrap_or_default()).is_err() {
                    return self.close(CloseCode::InvalidPayload, "close reason is not UTF-8");
                }
                self.outbound.close_raw(echoed, "");
                Flow::Stop
            }
            OpCode::Text | OpCode::Binary if fin => {
                if self.partial.is_some() {
                    return self.close(
                        CloseCode::ProtocolError,
                        "new message inside a fragmented one",
                    );
                }
                self.on_message(opcode, payload)
            }
            OpCode::Text | OpCode::Binary => {
                if self.partial.is_some() {
                    return self.close(
                        CloseCode::ProtocolError,
                        "new message inside a fragmented one",
                    );
                }
                self.partial = Some(Box::new((opcode, payload)));
                Flow::Continue
            }
            OpCode::Continuation => {
                let Some(partial) = self.partial.take() else {
                    return self.close(CloseCode::ProtocolError, "continuation without a message");
                };
                let (first, mut message) = *partial;
                if message.len() + payload.len() > self.node.config.max_frame_bytes {
                    self.node.metrics.count_bad_frame(ErrorCode::TooLarge);
                    return self.close(CloseCode::TooBig, "message too large");
                }
                message.extend_from_slice(&payload);
                if fin {
                    self.on_message(first, message)
                } else {
                    self.partial = Some(Box::new((first, message)));
                    Flow::Continue
                }
            }
        }
    }

    /// A complete message.
    fn on_message(&mut self, opcode: OpCode, payload: BytesMut) -> Flow {
        if opcode == OpCode::Binary {
            return self.bad_frame(
                ErrorCode::BinaryNotSupported,
                "binary frames are not part of protocol v1; send JSON text",
            );
        }
        if std::str::from_utf8(&payload).is_err() {
            return self.close(CloseCode::InvalidPayload, "invalid UTF-8");
        }
        match decode_client_frame(&payload) {
            Ok(frame) => self.on_client_frame(frame),
            Err(e) => self.bad_frame(e.code(), &e.to_string()),
        }
    }

    /// Answer a bad frame; too many in a minute closes with 4008.
    fn bad_frame(&mut self, code: ErrorCode, message: &str) -> Flow {
        self.node.metrics.count_bad_frame(code);
        debug!(
            session = self.id,
            code = code.as_str(),
            message,
            "bad frame"
        );
        self.send_error(code, message);
        let now = Instant::now();
        if now.saturating_duration_since(self.bad_window_start) >= Duration::from_secs(60) {
            self.bad_window_start = now;
            self.bad_in_window = 0;
        }
        self.bad_in_window += 1;
        if self.bad_in_window > self.node.config.max_bad_frames_per_minute {
            info!(session = self.id, user = %self.user, "too many bad frames");
            return self.close(CloseCode::Policy, "too many bad frames");
        }
        Flow::Continue
    }

    fn on_client_frame(&mut self, frame: ClientFrame) -> Flow {
        match frame {
            ClientFrame::Location(location) => self.on_location(&location),
            ClientFrame::Ping { id } => {
                self.send(&ServerFrame::Pong { id: id.as_ref() });
                Flow::Continue
            }
            ClientFrame::Subscribe { topic } => {
                match self
                    .node
                    .hub
                    .subscribe(self.id, &topic, self.node.config.max_topics)
                {
                    Ok(()) => Flow::Continue,
                    Err(SubscribeError::TooManyTopics) => {
                        let message =
                            format!("at most {} topics per session", self.node.config.max_topics);
                        self.bad_frame(ErrorCode::TooManySubscriptions, &message)
                    }
                    Err(SubscribeError::UnknownSession) => Flow::Continue,
                }
            }
            ClientFrame::Unsubscribe { topic } => {
                self.node.hub.unsubscribe(self.id, &topic);
                Flow::Continue
            }
            ClientFrame::Refresh { token } => self.on_refresh(&token),
            ClientFrame::Ack { ids } => {
                let mut matched = Vec::with_capacity(ids.len());
                let stored = self.outbound.ack(&ids, &mut matched);
                self.count_acks(&ids, &matched);
                if let Some(cursor) = stored {
                    self.node.bus.store_ack_in_background(
                        &self.node,
                        &self.user,
                        &self.device,
                        cursor,
                    );
                }
                Flow::Continue
            }
            ClientFrame::Resume { after } => match Cursor::parse(&after) {
                Some(cursor) => {
                    let node = self.node.clone();
                    let task = replay(
                        node.clone(),
                        self.user.clone(),
                        self.device.clone(),
                        self.outbound.clone(),
                        ReplayFrom::Cursor(cursor),
                    );
                    node.tasks.spawn(task);
                    Flow::Continue
                }
                None => self.bad_frame(
                    ErrorCode::BadRequest,
                    "resume.after must be an inbox cursor like 1763700000000-0",
                ),
            },
        }
    }

    /// Count acks in the notifications' status: a user notification's first ack, and an
    /// untracked id (a live notification) unless this session counted it lately.
    fn count_acks(&mut self, ids: &[String], matched: &[AckMatch]) {
        for (id, matched) in ids.iter().zip(matched) {
            let recent = self.counted_acks.get_or_insert_with(Default::default);
            let count = match matched {
                AckMatch::First => true,
                AckMatch::Again => false,
                AckMatch::Untracked => !recent.iter().any(|r| **r == **id),
            };
            if !count {
                continue;
            }
            if recent.len() >= COUNTED_ACKS_REMEMBERED {
                recent.pop_front();
            }
            recent.push_back(id.as_str().into());
            self.node.status.count(
                id,
                Counts {
                    acked: 1,
                    ..Counts::default()
                },
            );
        }
    }

    fn on_refresh(&mut self, token: &str) -> Flow {
        match self.node.verifier.verify(token) {
            Ok(claims) if *claims.sub == *self.user => {
                self.auth = Auth::Valid {
                    expires_at: expiry_instant(&claims),
                };
                Flow::Continue
            }
            Ok(_) => self.bad_frame(ErrorCode::TokenInvalid, "refresh token is for another user"),
            Err(e) => self.bad_frame(ErrorCode::TokenInvalid, &e.to_string()),
        }
    }

    /// The per-fix path: validate, rate limit (coalescing), index.
    fn on_location(&mut self, location: &LocationFrame) -> Flow {
        let fix = match Fix::validate(location, unix_ms(), self.node.fix_policy) {
            Ok(fix) => fix,
            Err(e) => return self.bad_frame(ErrorCode::InvalidFix, &e.to_string()),
        };
        let now = Instant::now();
        let config = &self.node.config;
        if self
            .rate
            .count_arrival(now, config.fix_flood_factor, config.fix_flood_seconds)
        {
            info!(session = self.id, user = %self.user, "persistent fix flood");
            return self.close(CloseCode::Policy, "fix flood");
        }
        if self.pending_fix.is_none() && self.rate.try_take(now) {
            self.process_fix(fix);
            return Flow::Continue;
        }
        match self.pending_fix.as_mut() {
            Some(pending) => {
                **pending = fix;
                self.node.metrics.fixes_coalesced.inc();
            }
            None => self.pending_fix = Some(Box::new(fix)),
        }
        let warn_due = self
            .rate
            .warned_at
            .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1));
        if warn_due {
            self.rate.warned_at = Some(now);
            let message = format!(
                "more than {} fixes/s: only the latest is processed",
                config.max_fixes_per_second
            );
            self.node.metrics.count_bad_frame(ErrorCode::RateLimited);
            self.send_error(ErrorCode::RateLimited, &message);
        }
        Flow::Continue
    }

    /// Index the fix, apply it to geofences, and send `nearby` when the result changed.
    fn process_fix(&mut self, fix: Fix) {
        if fix.ts_ms < self.last_fix_ts {
            return;
        }
        self.last_fix_ts = fix.ts_ms;
        self.last_position = Some((fix.lat, fix.lon));
        self.node.hub.update_position(self.id, &fix);
        self.node.metrics.fixes.inc();

        let places = self.node.places.snapshot();
        let mut events = Vec::new();
        self.fences.on_fix(
            &fix,
            &places,
            &self.node.fence_rules,
            Instant::now(),
            &mut events,
        );
        self.emit_fence_events(&places, &events);
        let rules = &self.node.nearby_rules;
        let nearby = self
            .nearby
            .get_or_insert_with(|| Box::new(NearbyTracker::new(rules)));
        if let Some(json) = nearby.on_fix(&fix, &places, rules) {
            self.outbound.push_nearby(json, &self.node.metrics);
            self.node.metrics.nearby_deliveries.inc();
        }
    }

    fn emit_fence_events(&self, places: &PlacesSnapshot, events: &[FenceEvent]) {
        let (lat, lon) = self.last_position.unwrap_or_default();
        for event in events {
            let json = geofence_frame(places, event);
            self.outbound
                .push(Outgoing::Text { json, since: None }, &self.node.metrics);
            self.node.metrics.geofence_deliveries.inc();
            self.node.geofence_sink.publish(GeofenceRecord {
                user: self.user.to_string(),
                device: self.device.to_string(),
                place: places.entry(event.place).place.id.clone(),
                event: event.kind,
                ts: event.ts_ms,
                lat,
                lon,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut out = vec![0x80 | opcode];
        if payload.len() < 126 {
            out.push(0x80 | payload.len() as u8);
        } else {
            out.push(0x80 | 126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn small_complete_frames_parse_in_place_and_the_rest_is_left_to_the_parser() {
        let text = br#"{"type":"ping","id":1}"#;
        let frame = single_small_frame(&masked(0x1, text), 16_384).expect("one text frame");
        assert_eq!(
            (frame.opcode, &frame.payload[..], frame.wire_len),
            (OpCode::Text, &text[..], 6 + text.len() as u64)
        );
        let long = vec![b'x'; 300];
        let frame = single_small_frame(&masked(0x1, &long), 16_384).expect("16-bit length");
        assert_eq!(frame.payload.len(), 300);
        assert!(
            single_small_frame(&masked(0xA, b""), 16_384).is_some(),
            "empty pong"
        );

        let mut two = masked(0x1, text);
        two.extend(masked(0x1, text));
        assert!(single_small_frame(&two, 16_384).is_none(), "two frames");
        let whole = masked(0x1, text);
        assert!(
            single_small_frame(&whole[..whole.len() - 1], 16_384).is_none(),
            "partial"
        );
        let mut fragment = masked(0x1, text);
        fragment[0] &= 0x7F;
        assert!(single_small_frame(&fragment, 16_384).is_none(), "not final");
        let mut reserved = masked(0x1, text);
        reserved[0] |= 0x40;
        assert!(
            single_small_frame(&reserved, 16_384).is_none(),
            "reserved bit"
        );
        let mut unmasked = masked(0x1, text);
        unmasked[1] &= 0x7F;
        assert!(single_small_frame(&unmasked, 16_384).is_none(), "unmasked");
        assert!(
            single_small_frame(&masked(0x3, b""), 16_384).is_none(),
            "unknown opcode"
        );
        assert!(
            single_small_frame(&masked(0x9, &[0; 126]), 16_384).is_none(),
            "long ping"
        );
        assert!(
            single_small_frame(&masked(0x1, &long), 100).is_none(),
            "over the frame limit"
        );
    }

    #[test]
    fn peer_close_codes_follow_rfc_6455() {
        for ok in [1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4009, 4999] {
            assert!(is_valid_peer_close_code(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert!(!is_valid_peer_close_code(bad), "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fix_rate_coalesces_and_detects_floods() {
        let start = Instant::now();
        let mut rate = FixRate::new(5, start);
        let taken = (0..10).filter(|_| rate.try_take(start)).count();
        assert_eq!(taken, 5, "a burst of one second's worth");
        assert!(rate.next_token_at() > start);
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(rate.try_take(Instant::now()), "a token per 200 ms");

        let mut flood = FixRate::new(5, Instant::now());
        let mut closed_after = None;
        for second in 0..5 {
            for _ in 0..60 {
                if flood.count_arrival(Instant::now(), 10, 3) && closed_after.is_none() {
                    closed_after = Some(second);
                }
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(
            closed_after,
            Some(3),
            "three full flooding seconds, detected in the fourth"
        );

        let mut calm = FixRate::new(5, Instant::now());
        for _ in 0..10 {
            for _ in 0..40 {
                assert!(!calm.count_arrival(Instant::now(), 10, 3));
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
    }
}
