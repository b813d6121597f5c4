//! Real `redis-server` processes for the multi-node tests: a standalone server
//! ([`RedisServer`]), optionally durable (AOF with `fsync` on every write) so that it can be
//! SIGKILLed and restarted on the same port with its data, and a three-master Redis Cluster
//! ([`RedisCluster`]) built with `redis-cli --cluster create`.
//!
//! Every server listens on a free loopback port found by binding `127.0.0.1:0` first (never
//! 6379, where a shared instance runs), keeps its files in a scratch directory of its own,
//! and is killed on drop by its child's PID. [`Redis`] is either deployment behind one face:
//! the URL a gateway is given, subscriber counts (`PUBSUB NUMSUB`, or `SHARDNUMSUB` summed
//! over the masters) and plain commands for checking what is stored.

use crate::wait::POLL_INTERVAL;
use anyhow::{Context, anyhow, bail};
use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::{Instant, timeout};

/// The bound on starting one server (or loading its append-only file after a restart).
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The bound on one command sent by a test.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// A free loopback port: bind `127.0.0.1:0`, read the port, let it go. Whoever binds it
/// next races everyone else, so starters retry on "address in use".
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr().context("local addr")?.port())
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(what: &str) -> anyhow::Result<ScratchDir> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "geopush-tests-{what}-{}-{}-{:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(ScratchDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How a server keeps its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Memory only (`--save "" --appendonly no`): a restart comes back empty.
    Ephemeral,
    /// `--appendonly yes --appendfsync always`: every acknowledged write survives a SIGKILL,
    /// as on a production Redis with persistence.
    Durable,
    /// A cluster node (memory only) with its cluster bus on `cluster_port`.
    ClusterNode { cluster_port: u16 },
}

/// One `redis-server` child process.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    mode: Mode,
    dir: ScratchDir,
}

impl RedisServer {
    /// A memory-only server on a free port.
    pub async fn start() -> anyhow::Result<RedisServer> {
        RedisServer::start_mode(|| Ok(Mode::Ephemeral)).await
    }

    /// A server whose every acknowledged write is on disk before the reply
    /// (`--appendonly yes --appendfsync always`), so [`RedisServer::restart`] after
    /// [`RedisServer::kill`] brings the data back.
    pub async fn start_durable() -> anyhow::Result<RedisServer> {
        RedisServer::start_mode(|| Ok(Mode::Durable)).await
    }

    async fn start_cluster_node() -> anyhow::Result<RedisServer> {
        RedisServer::start_mode(|| {
            Ok(Mode::ClusterNode {
                cluster_port: free_port()?,
            })
        })
        .await
    }

    /// Start on a fresh free port, retrying when another process took the port first.
    async fn start_mode(mode: impl Fn() -> anyhow::Result<Mode>) -> anyhow::Result<RedisServer> {
        let mut last_error = anyhow!("never tried");
        for _ in 0..5 {
            let mut server = RedisServer {
                child: None,
                port: free_port()?,
                mode: mode()?,
                dir: ScratchDir::new("redis")?,
            };
            match server.launch().await {
                Ok(()) => return Ok(server),
                Err(e) => last_error = e,
            }
        }
        Err(last_error.context("redis-server did not start in five attempts"))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Spawn the process on `self.port` with `self.dir` and wait until it answers PING.
    async fn launch(&mut self) -> anyhow::Result<()> {
        let dir = self.dir.path();
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(self.log_path())
            .args(["--daemonize", "no"]);
        match self.mode {
            Mode::Ephemeral => {
                command.args(["--appendonly", "no"]);
            }
            Mode::Durable => {
                command.args(["--appendonly", "yes", "--appendfsync", "always"]);
            }
            Mode::ClusterNode { cluster_port } => {
                command
                    .args(["--appendonly", "no", "--cluster-enabled", "yes"])
                    .arg("--cluster-config-file")
                    .arg(dir.join("nodes.conf"))
                    .args(["--cluster-port", &cluster_port.to_string()])
                    .args(["--cluster-node-timeout", "3000"]);
            }
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning redis-server (is it installed?)")?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "redis-server on port {} exited at start ({status}); log:\n{}",
                    self.port,
                    self.log_text()
                );
            }
            if ping(self.addr()).is_ok_and(|pong| pong) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill()?;
                bail!(
                    "redis-server on port {} did not answer PING within {START_TIMEOUT:?}; log:\n{}",
                    self.port,
                    self.log_text()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The child's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILL the server (by its child's PID) and reap it. No shutdown, no final save.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            // `Child::kill` is SIGKILL on Unix, sent to this child's PID only.
            child.kill().context("killing redis-server")?;
            child.wait().context("reaping redis-server")?;
        }
        Ok(())
    }

    /// Start the server again on the same port with the same directory (a durable server
    /// loads its append-only file) and wait until it answers PING.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        let mut last_error = anyhow!("never tried");
        // The old process's port may linger for a moment; retry briefly.
        for _ in 0..10 {
            match self.launch().await {
                Ok(()) => return Ok(()),
                Err(e) => last_error = e,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(last_error.context(format!("restarting redis-server on port {}", self.port)))
    }

    /// A new multiplexed connection to this server.
    pub async fn connection(&self) -> anyhow::Result<MultiplexedConnection> {
        let client = redis::Client::open(self.url()).context("redis URL")?;
        timeout(COMMAND_TIMEOUT, client.get_multiplexed_async_connection())
            .await
            .with_context(|| format!("timed out connecting to {}", self.url()))?
            .with_context(|| format!("connecting to {}", self.url()))
    }

    /// Run one command on a new connection.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> anyhow::Result<T> {
        let mut conn = self.connection().await?;
        timeout(COMMAND_TIMEOUT, cmd.query_async(&mut conn))
            .await
            .context("redis command timed out")?
            .context("redis command")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// PING over a raw socket: `Ok(true)` on `+PONG` (not while loading the AOF: `-LOADING`).
fn ping(addr: SocketAddr) -> std::io::Result<bool> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(b"PING\r\n")?;
    let mut reply = [0u8; 64];
    let n = stream.read(&mut reply)?;
    Ok(reply[..n].starts_with(b"+PONG"))
}

/// A three-master Redis Cluster without replicas, built by `redis-cli --cluster create`.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Start three cluster-enabled servers, join them, and wait until every node reports
    /// `cluster_state:ok` and knows the other two.
    pub async fn start() -> anyhow::Result<RedisCluster> {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(RedisServer::start_cluster_node().await?);
        }
        let cluster = RedisCluster { nodes };
        let mut command = tokio::process::Command::new("redis-cli");
        command.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            command.arg(format!("127.0.0.1:{}", node.port()));
        }
        command
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = timeout(Duration::from_secs(30), command.output())
            .await
            .context("redis-cli --cluster create timed out")?
            .context("running redis-cli --cluster create")?;
        if !output.status.success() {
            bail!(
                "redis-cli --cluster create failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for node in &cluster.nodes {
            loop {
                let info: String = node.query(redis::cmd("CLUSTER").arg("INFO")).await?;
                if info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3") {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "node {} never reported cluster_state:ok with three nodes:\n{info}",
                        node.port()
                    );
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        Ok(cluster)
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The seed URLs, comma-separated, as `--redis-url` takes them.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A command connection to a deployment (slot-routed on a cluster).
pub enum Commands {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Commands {
    pub async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> anyhow::Result<T> {
        let reply = match self {
            Commands::Single(conn) => timeout(COMMAND_TIMEOUT, cmd.query_async(conn)).await,
            Commands::Cluster(conn) => timeout(COMMAND_TIMEOUT, cmd.query_async(conn)).await,
        };
        reply
            .context("redis command timed out")?
            .context("redis command")
    }
}

/// A Redis deployment the gateways of a test share.
#[derive(Debug)]
pub enum Redis {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Redis {
    /// A memory-only standalone server.
    pub async fn single() -> anyhow::Result<Redis> {
        RedisServer::start().await.map(Redis::Single)
    }

    /// A three-master cluster.
    pub async fn cluster() -> anyhow::Result<Redis> {
        RedisCluster::start().await.map(Redis::Cluster)
    }

    /// What `--redis-url` gets: one URL, or the cluster's seeds comma-separated.
    pub fn url(&self) -> String {
        match self {
            Redis::Single(server) => server.url(),
            Redis::Cluster(cluster) => cluster.url(),
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Redis::Cluster(_))
    }

    /// The standalone server (to kill and restart it).
    pub fn server_mut(&mut self) -> Option<&mut RedisServer> {
        match self {
            Redis::Single(server) => Some(server),
            Redis::Cluster(_) => None,
        }
    }

    /// Every process of the deployment.
    pub fn servers(&self) -> Vec<&RedisServer> {
        match self {
            Redis::Single(server) => vec![server],
            Redis::Cluster(cluster) => cluster.nodes.iter().collect(),
        }
    }

    /// A command connection (keys are routed to their slot's master on a cluster).
    pub async fn commands(&self) -> anyhow::Result<Commands> {
        match self {
            Redis::Single(server) => server.connection().await.map(Commands::Single),
            Redis::Cluster(cluster) => {
                let client = ClusterClient::new(cluster.nodes.iter().map(RedisServer::url))
                    .context("cluster client")?;
                timeout(COMMAND_TIMEOUT, client.get_async_connection())
                    .await
                    .context("timed out connecting to the cluster")?
                    .context("connecting to the cluster")
                    .map(Commands::Cluster)
            }
        }
    }

    /// How many connections subscribe each channel: `PUBSUB NUMSUB` on a standalone
    /// server; on a cluster `PUBSUB SHARDNUMSUB` on every master, summed (only the master
    /// owning a channel's slot has its sharded subscribers).
    pub async fn subscribers_of(&self, channels: &[String]) -> anyhow::Result<Vec<u64>> {
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        let sub = if self.is_cluster() {
            "SHARDNUMSUB"
        } else {
            "NUMSUB"
        };
        let mut totals = vec![0u64; channels.len()];
        for server in self.servers() {
            let reply: Vec<Value> = server
                .query(redis::cmd("PUBSUB").arg(sub).arg(channels))
                .await
                .with_context(|| format!("PUBSUB {sub} on port {}", server.port()))?;
            if reply.len() != 2 * channels.len() {
                bail!("PUBSUB {sub} answered {reply:?} for {channels:?}");
            }
            for (i, pair) in reply.chunks(2).enumerate() {
                let name: String =
                    redis::from_redis_value(pair[0].clone()).context("PUBSUB channel name")?;
                if name != channels[i] {
                    bail!(
                        "PUBSUB {sub} answered {name:?} where {:?} was asked",
                        channels[i]
                    );
                }
                let count: u64 =
                    redis::from_redis_value(pair[1].clone()).context("PUBSUB count")?;
                totals[i] += count;
            }
        }
        Ok(totals)
    }

    /// Subscribers of one channel (see [`Redis::subscribers_of`]).
    pub async fn subscribers(&self, channel: &str) -> anyhow::Result<u64> {
        Ok(self.subscribers_of(&[channel.to_owned()]).await?[0])
    }
}
