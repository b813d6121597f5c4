//! The local cluster (`deploy/local/cluster.sh`) under traffic through a rolling restart
//! (issue 7): the script starts a private Redis, three gateways, the worker and the
//! loopback load balancer; 30 clients (distinct users, one device each) connect through the
//! LB and ack what they get; notifications are published to them through the worker's API
//! at a steady rate the whole time; `cluster.sh restart-gateways` drains and restarts the
//! gateways one at a time. Then every client is connected again (through the LB, after its
//! 1001) and every notification the worker accepted (202) reached its user at least once —
//! duplicates are counted and allowed (at-least-once across reconnects), losses are not.
//! Finally SIGTERM stops the cluster, and no process from its state dir is left.
//!
//! Half of the clients send `resume` with the last cursor they saw after each reconnect;
//! the other half rely on the gateway replaying after the device's stored ack cursor.
//!
//! Needs the binaries (`cargo build --workspace --bins`), `redis-server` and `python3`.

use anyhow::{Context, bail};
use geopush_gateway::config::{DEV_API_KEY, DEV_JWT_SECRET};
use geopush_proto::bus::Cursor;
use geopush_tests::redis::free_port;
use geopush_tests::wait::{POLL_INTERVAL, eventually, eventually_async};
use geopush_tests::worker::ApiClient;
use geopush_tests::{READ_TIMEOUT, WsClient, WsEvent};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const CLIENTS: usize = 30;
const DEVICE: &str = "phone";
/// One publish every 25 ms: 40 notifications per second through the worker.
const PUBLISH_EVERY: Duration = Duration::from_millis(25);
/// Published before the restart begins, and again after it ended.
const PUBLISHED_AROUND_RESTART: usize = 40;

/// The workspace root (the script's paths are relative to it).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// `target/<profile>/`, where the gateway and worker binaries are (the gateway one is
/// checked to be newer than its sources).
fn bin_dir() -> anyhow::Result<PathBuf> {
    let gateway = geopush_tests::process::gateway_binary()?;
    let dir = gateway.parent().context("binary dir")?.to_path_buf();
    let worker = dir.join(format!("geopush-worker{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        worker.is_file(),
        "{} does not exist: run `cargo build --workspace --bins` first",
        worker.display()
    );
    Ok(dir)
}

/// `bash deploy/local/cluster.sh <command>` with `env` and nothing else of the shell's
/// GEOPUSH_* settings.
fn script_command(env: &[(String, String)], command: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(workspace().join("deploy").join("local").join("cluster.sh"))
        .arg(command);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("GEOPUSH_")) {
        cmd.env_remove(key);
    }
    cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    cmd.stdin(Stdio::null());
    cmd
}

/// `cluster.sh start` as a child process, with its state dir in a scratch directory.
struct LocalCluster {
    child: Child,
    scratch: PathBuf,
    env: Vec<(String, String)>,
    lb: SocketAddr,
    worker: SocketAddr,
    gateways: Vec<SocketAddr>,
}

impl LocalCluster {
    fn state(&self) -> PathBuf {
        self.scratch.join("state")
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.scratch.join("cluster.out")).unwrap_or_default()
    }

    /// The cluster's stdout/stderr and the tail of every log, for failure messages.
    fn diagnostics(&self) -> String {
        let mut text = format!("cluster.sh output:\n{}", self.output());
        if let Ok(entries) = std::fs::read_dir(self.state().join("logs")) {
            for entry in entries.flatten() {
                let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                text.push_str(&format!("\n--- {} (tail)\n{tail}", entry.path().display()));
            }
        }
        text
    }

    /// `bash cluster.sh <command>` with this cluster's environment.
    fn command(&self, command: &str) -> Command {
        script_command(&self.env, command)
    }

    /// Start the cluster on free loopback ports and wait until it says it is up.
    async fn start() -> anyhow::Result<LocalCluster> {
        let bins = bin_dir()?;
        let scratch = std::env::temp_dir().join(format!(
            "geopush-local-cluster-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        let mut ports = HashSet::new();
        while ports.len() < 6 {
            ports.insert(free_port()?);
        }
        let ports: Vec<u16> = ports.into_iter().collect();
        let (lb, worker, redis) = (ports[0], ports[1], ports[2]);
        let gateways = &ports[3..6];
        let env: Vec<(String, String)> = [
            (
                "GEOPUSH_LOCAL_STATE_DIR",
                scratch.join("state").display().to_string(),
            ),
            ("GEOPUSH_LOCAL_LB_PORT", lb.to_string()),
            ("GEOPUSH_LOCAL_WORKER_PORT", worker.to_string()),
            ("GEOPUSH_LOCAL_REDIS_PORT", redis.to_string()),
            (
                "GEOPUSH_LOCAL_GATEWAY_PORTS",
                gateways
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("GEOPUSH_BIN_DIR", bins.display().to_string()),
            // A short drain keeps the rolling restart quick; the jitter stays under it.
            ("GEOPUSH_DRAIN_SECONDS", "1.5".into()),
            ("GEOPUSH_RECONNECT_JITTER_SECONDS", "1".into()),
            ("GEOPUSH_SHUTDOWN_GRACE_SECONDS", "3".into()),
            ("GEOPUSH_LOG_FORMAT", "json".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let out = std::fs::File::create(scratch.join("cluster.out")).context("output file")?;
        let child = script_command(&env, "start")
            .stdout(out.try_clone().context("dup output")?)
            .stderr(out)
            .spawn()
            .context("spawning bash deploy/local/cluster.sh start")?;
        let mut cluster = LocalCluster {
            child,
            scratch,
            env,
            lb: SocketAddr::from(([127, 0, 0, 1], lb)),
            worker: SocketAddr::from(([127, 0, 0, 1], worker)),
            gateways: gateways
                .iter()
                .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
                .collect(),
        };
        let ready = cluster.state().join("ready");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready.is_file() {
            if let Some(status) = cluster.child.try_wait().context("try_wait")? {
                bail!(
                    "cluster.sh exited at start ({status}):\n{}",
                    cluster.diagnostics()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "cluster.sh did not get ready within 60 s:\n{}",
                    cluster.diagnostics()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        Ok(cluster)
    }

    /// The value of a `  NAME=value` line the script printed.
    fn printed(&self, name: &str) -> Option<String> {
        self.output().lines().find_map(|line| {
            line.trim()
                .strip_prefix(&format!("{name}="))
                .map(str::to_owned)
        })
    }

    /// Every `<name>.pid` in the state dir.
    fn pids(&self) -> BTreeMap<String, u32> {
        let mut pids = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(self.state()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(component) = name.strip_suffix(".pid")
                    && let Ok(text) = std::fs::read_to_string(entry.path())
                    && let Ok(pid) = text.trim().parse()
                {
                    pids.insert(component.to_owned(), pid);
                }
            }
        }
        pids
    }

    /// Send SIGTERM to the script (by its PID).
    fn sigterm(&self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .context("running kill")?;
        anyhow::ensure!(status.success(), "kill -TERM {} failed", self.child.id());
        Ok(())
    }
}

impl Drop for LocalCluster {
    /// After a failure: stop the cluster the way an operator would (SIGTERM, bounded), then
    /// SIGKILL whatever of its own processes is left, by the PIDs in its state dir.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.sigterm();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(POLL_INTERVAL);
            }
            for pid in self.pids().values() {
                if running_component(*pid) {
                    let _ = Command::new("kill")
                        .arg("-KILL")
                        .arg(pid.to_string())
                        .status();
                }
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// True while `pid` runs (not a zombie) one of the cluster's programs.
fn running_component(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.split(' ').next())
        .unwrap_or("Z");
    if state == "Z" || state == "X" {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    [
        "redis-server",
        "geopush-gateway",
        "geopush-worker",
        "lb.py",
        "cluster.sh",
    ]
    .iter()
    .any(|program| cmdline.contains(program))
}

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    /// Notification id → how many times it arrived.
    ids: HashMap<String, usize>,
    /// The highest cursor seen (notifications of a user arrive in inbox order).
    last_cursor: Option<Cursor>,
    /// Sessions that got a `welcome`.
    sessions: usize,
    /// `reconnect` frames and 1001 closes received.
    reconnect_frames: usize,
    closes_1001: usize,
    /// Other ends of a session (other close codes, a vanished stream).
    other_ends: Vec<String>,
    /// Connection attempts that failed (refused upgrade, no backend).
    failed_connects: usize,
    /// True between a `welcome` and the end of that session.
    connected: bool,
}

/// One app: connect through the LB, ack every notification, and after a close reconnect
/// (after the `reconnect` frame's delay), until `stop`.
async fn run_client(
    lb: SocketAddr,
    user: String,
    explicit_resume: bool,
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
) {
    let token = match geopush_gateway::auth::mint_hs256(DEV_JWT_SECRET, &user, Some(DEVICE), 3600) {
        Ok(token) => token,
        Err(e) => panic!("minting a token: {e}"),
    };
    let lock = || seen.lock().unwrap_or_else(|p| p.into_inner());
    while !stop.is_cancelled() {
        let mut client = match WsClient::connect(lb, &token).await {
            Ok(client) => client,
            Err(_) => {
                lock().failed_connects += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if client.expect_type("welcome", READ_TIMEOUT).await.is_err() {
            lock().failed_connects += 1;
            continue;
        }
        let resume_after = {
            let mut seen = lock();
            seen.sessions += 1;
            seen.connected = true;
            seen.last_cursor
        };
        if explicit_resume && let Some(cursor) = resume_after {
            let _ = client
                .send_json(&json!({"type": "resume", "after": cursor.to_string()}))
                .await;
        }
        let mut wait_before_reconnect = Duration::from_millis(50);
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => {
                    let _ = client.close().await;
                    lock().connected = false;
                    return;
                }
                event = client.next_event(Duration::from_secs(120)) => event,
            };
            match event {
                Ok(WsEvent::Text(text)) => {
                    let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                        continue;
                    };
                    match frame["type"].as_str() {
                        Some("notification") => {
                            let id = frame["id"].as_str().unwrap_or_default().to_owned();
                            {
                                let mut seen = lock();
                                *seen.ids.entry(id.clone()).or_default() += 1;
                                if let Some(cursor) =
                                    frame["cursor"].as_str().and_then(Cursor::parse)
                                    && seen.last_cursor.is_none_or(|c| cursor > c)
                                {
                                    seen.last_cursor = Some(cursor);
                                }
                            }
                            let _ = client.send_json(&json!({"type": "ack", "ids": [id]})).await;
                        }
                        Some("reconnect") => {
                            lock().reconnect_frames += 1;
                            let after = frame["after_ms"].as_u64().unwrap_or(0).min(3_000);
                            wait_before_reconnect = Duration::from_millis(after);
                        }
                        _ => {}
                    }
                }
                Ok(WsEvent::Ping(_) | WsEvent::Pong(_) | WsEvent::Binary(_)) => {}
                Ok(WsEvent::Close(code, reason)) => {
                    let mut seen = lock();
                    seen.connected = false;
                    if code == Some(1001) {
                        seen.closes_1001 += 1;
                    } else {
                        seen.other_ends.push(format!("close {code:?} {reason}"));
                    }
                    break;
                }
                Ok(WsEvent::Ended(error)) => {
                    let mut seen = lock();
                    seen.connected = false;
                    seen.other_ends.push(format!("ended {error:?}"));
                    break;
                }
                Err(e) => {
                    let mut seen = lock();
                    seen.connected = false;
                    seen.other_ends.push(format!("read: {e:#}"));
                    break;
                }
            }
        }
        drop(client);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait_before_reconnect) => {}
        }
    }
}

/// What the publisher got back.
#[derive(Debug, Default)]
struct Published {
    /// User → ids accepted with 202, in order.
    accepted: BTreeMap<String, Vec<String>>,
    count: usize,
    /// Requests not answered 202 (status or error), allowed but reported.
    refused: Vec<String>,
}

/// POST one user notification every [`PUBLISH_EVERY`], users in turn, until `stop`.
async fn run_publisher(
    api: ApiClient,
    users: Vec<String>,
    published: Arc<Mutex<Published>>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0usize;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let user = &users[seq % users.len()];
        let body = json!({
            "target": {"users": [user]},
            "title": "rolling",
            "body": format!("notification {seq}"),
            "data": {"seq": seq},
        });
        let answer = api.post("/v1/notifications", &body).await;
        let mut published = published.lock().unwrap_or_else(|p| p.into_inner());
        match answer {
            Ok(response) if response.status == 202 => {
                match response
                    .json()
                    .ok()
                    .and_then(|v| v["id"].as_str().map(str::to_owned))
                {
                    Some(id) => {
                        published.accepted.entry(user.clone()).or_default().push(id);
                        published.count += 1;
                    }
                    None => published
                        .refused
                        .push(format!("202 without an id: {}", response.text())),
                }
            }
            Ok(response) => {
                published
                    .refused
                    .push(format!("{} {}", response.status, response.text()))
            }
            Err(e) => published.refused.push(format!("{e:#}")),
        }
        seq += 1;
    }
}

/// `geopush_connections` summed over the gateways.
async fn connections(gateways: &[SocketAddr]) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for addr in gateways {
        let response = geopush_tests::http::get(*addr, "/metrics").await?;
        anyhow::ensure!(
            response.status == 200,
            "{addr} /metrics: {}",
            response.status
        );
        total += geopush_tests::prom::Exposition::parse(&response.text())?
            .value("geopush_connections", &[]);
    }
    Ok(total)
}

/// The ids of `accepted` that `seen` lacks, per user.
fn missing(
    accepted: &BTreeMap<String, Vec<String>>,
    seen: &[(String, Arc<Mutex<Seen>>)],
) -> BTreeMap<String, Vec<String>> {
    let mut missing = BTreeMap::new();
    for (user, seen) in seen {
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        let lacking: Vec<String> = accepted
            .get(user)
            .into_iter()
            .flatten()
            .filter(|id| !seen.ids.contains_key(*id))
            .cloned()
            .collect();
        if !lacking.is_empty() {
            missing.insert(user.clone(), lacking);
        }
    }
    missing
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_the_local_cluster_loses_no_notification() {
    let cluster = LocalCluster::start()
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let fail =
        |what: &str, e: anyhow::Error| -> ! { panic!("{what}: {e:#}\n{}", cluster.diagnostics()) };

    // What the script printed works: the dev API key, and a dev token through the LB.
    assert_eq!(
        cluster.printed("KEY").as_deref(),
        Some(DEV_API_KEY),
        "{}",
        cluster.output()
    );
    let demo_token = cluster
        .printed("TOKEN")
        .unwrap_or_else(|| panic!("no TOKEN line:\n{}", cluster.output()));
    let (_demo, welcome) = WsClient::connect_welcomed(cluster.lb, &demo_token)
        .await
        .unwrap_or_else(|e| fail("the printed token through the LB", e));
    assert!(
        welcome["node"]
            .as_str()
            .is_some_and(|n| n.starts_with("gw-")),
        "{welcome}"
    );

    let stop_clients = CancellationToken::new();
    let users: Vec<String> = (0..CLIENTS).map(|i| format!("local-user-{i}")).collect();
    let mut seen = Vec::new();
    let mut client_tasks = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let state = Arc::new(Mutex::new(Seen::default()));
        seen.push((user.clone(), state.clone()));
        client_tasks.push(tokio::spawn(run_client(
            cluster.lb,
            user.clone(),
            i % 2 == 0,
            state,
            stop_clients.clone(),
        )));
    }
    let all_connected = || {
        seen.iter()
            .all(|(_, s)| s.lock().unwrap_or_else(|p| p.into_inner()).connected)
    };
    eventually(
        "every client connected through the LB",
        Duration::from_secs(30),
        all_connected,
    )
    .await
    .unwrap_or_else(|e| fail("connecting", e));
    // The LB spreads them: every gateway holds some.
    for addr in &cluster.gateways {
        let response = geopush_tests::http::get(*addr, "/metrics")
            .await
            .unwrap_or_else(|e| fail("metrics", e));
        let held = geopush_tests::prom::Exposition::parse(&response.text())
            .unwrap_or_else(|e| fail("metrics", e))
            .value("geopush_connections", &[]);
        assert!(held >= 1.0, "gateway {addr} holds no client");
    }

    let stop_publishing = CancellationToken::new();
    let published = Arc::new(Mutex::new(Published::default()));
    let count = || published.lock().unwrap_or_else(|p| p.into_inner()).count;
    let publisher = tokio::spawn(run_publisher(
        ApiClient::new(cluster.worker, Some(DEV_API_KEY)),
        users.clone(),
        published.clone(),
        stop_publishing.clone(),
    ));
    eventually(
        "notifications before the restart",
        Duration::from_secs(30),
        || count() >= PUBLISHED_AROUND_RESTART,
    )
    .await
    .unwrap_or_else(|e| fail("publishing", e));

    let pids_before = cluster.pids();
    let restart = tokio::task::spawn_blocking({
        let mut command = cluster.command("restart-gateways");
        move || command.output()
    });
    let restart = tokio::time::timeout(Duration::from_secs(120), restart)
        .await
        .unwrap_or_else(|_| panic!("restart-gateways did not finish\n{}", cluster.diagnostics()))
        .expect("join")
        .expect("runs bash");
    let restart_log = format!(
        "{}{}",
        String::from_utf8_lossy(&restart.stdout),
        String::from_utf8_lossy(&restart.stderr)
    );
    assert!(
        restart.status.success(),
        "restart-gateways failed ({}):\n{restart_log}\n{}",
        restart.status,
        cluster.diagnostics()
    );
    let published_during = count();
    let pids_after = cluster.pids();
    for i in 1..=3 {
        let name = format!("gateway-{i}");
        assert!(
            pids_before.contains_key(&name) && pids_before.get(&name) != pids_after.get(&name),
            "{name} was restarted: {pids_before:?} → {pids_after:?}\n{restart_log}"
        );
    }

    eventually(
        "notifications after the restart",
        Duration::from_secs(30),
        || count() >= published_during + PUBLISHED_AROUND_RESTART,
    )
    .await
    .unwrap_or_else(|e| fail("publishing after the restart", e));
    stop_publishing.cancel();
    publisher.await.expect("publisher task");
    let published = std::mem::take(&mut *published.lock().unwrap_or_else(|p| p.into_inner()));
    assert!(published.count > 0);

    // Everything accepted arrives, and everyone is connected again.
    let settled = eventually(
        "every accepted notification received and every client connected",
        Duration::from_secs(30),
        || missing(&published.accepted, &seen).is_empty() && all_connected(),
    )
    .await;
    if let Err(e) = settled {
        let lost = missing(&published.accepted, &seen);
        let states: Vec<String> = seen
            .iter()
            .map(|(u, s)| {
                let s = s.lock().unwrap_or_else(|p| p.into_inner());
                format!(
                    "{u}: connected {} sessions {} reconnect frames {} 1001s {} failed connects {} other ends {:?}",
                    s.connected, s.sessions, s.reconnect_frames, s.closes_1001, s.failed_connects, s.other_ends
                )
            })
            .collect();
        panic!(
            "{e:#}\nlost (user → ids): {lost:?}\n{}\nrestart:\n{restart_log}\n{}",
            states.join("\n"),
            cluster.diagnostics()
        );
    }
    eventually_async(
        "30 sessions on the gateways",
        Duration::from_secs(10),
        || async {
            connections(&cluster.gateways)
                .await
                .is_ok_and(|n| n == CLIENTS as f64)
        },
    )
    .await
    .unwrap_or_else(|e| fail("connections", e));

    let mut duplicates = 0;
    let mut sessions = 0;
    let mut drained = 0;
    for (user, state) in &seen {
        let state = state.lock().unwrap_or_else(|p| p.into_inner());
        let accepted: HashSet<&String> =
            published.accepted.get(user).into_iter().flatten().collect();
        let unexpected: Vec<&String> = state
            .ids
            .keys()
            .filter(|id| !accepted.contains(id))
            .collect();
        assert!(
            unexpected.is_empty(),
            "{user} got ids never accepted for it: {unexpected:?}"
        );
        duplicates += state.ids.values().map(|n| n - 1).sum::<usize>();
        sessions += state.sessions;
        drained += state.closes_1001;
        // Whichever gateway held the client at first was restarted: every client
        // reconnected at least once.
        assert!(state.sessions >= 2, "{user} never reconnected: {state:?}");
    }
    println!(
        "local cluster rolling restart: {} notifications accepted, all received; {duplicates} \
         duplicates; {} not accepted {:?}; {sessions} sessions for {CLIENTS} clients, {drained} \
         closes 1001",
        published.count,
        published.refused.len(),
        published.refused.iter().take(5).collect::<Vec<_>>(),
    );

    // Stop: the clients first, then the cluster on SIGTERM; nothing of it may remain.
    stop_clients.cancel();
    for task in client_tasks {
        task.await.expect("client task");
    }
    let pids = cluster.pids();
    assert!(
        [
            "cluster",
            "redis",
            "worker",
            "lb",
            "gateway-1",
            "gateway-2",
            "gateway-3"
        ]
        .iter()
        .all(|name| pids.contains_key(*name)),
        "pid files: {pids:?}"
    );
    cluster.sigterm().expect("SIGTERM to cluster.sh");
    let mut cluster = cluster;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = cluster.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "cluster.sh did not stop within 60 s of SIGTERM\n{}",
            cluster.diagnostics()
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    assert_eq!(status.code(), Some(0), "{}", cluster.diagnostics());
    let left: Vec<(&String, &u32)> = pids
        .iter()
        .filter(|(_, pid)| running_component(**pid))
        .collect();
    assert!(
        left.is_empty(),
        "processes left behind: {left:?}\n{}",
        cluster.diagnostics()
    );
    let pid_files = cluster.pids();
    assert!(pid_files.is_empty(), "pid files left: {pid_files:?}");
}
