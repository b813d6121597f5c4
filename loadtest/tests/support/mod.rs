//! What the loadtest's integration tests share: a private redis-server and the workspace's
//! binaries as child processes, each stopped by its PID when dropped.

#![allow(dead_code)]

use geopush_gateway::Gateway;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::{Instant, sleep};

/// A memory-only redis-server on a free loopback port, killed by its PID on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawning redis-server (is it installed?)");
            let mut server = RedisServer { child, port };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if server.child.try_wait().ok().flatten().is_some() {
                    break; // lost the port to someone else: try another
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return server;
                }
                sleep(Duration::from_millis(20)).await;
            }
            let _ = server.child.kill();
        }
        panic!("redis-server did not start");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free at the moment of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A binary of the workspace, built beside this test's `geopush-loadtest` (the README's
/// test command builds every binary first).
pub fn binary(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_geopush-loadtest")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A child process, killed by its PID when dropped.
pub struct Process {
    pub child: Child,
    pub name: String,
}

impl Process {
    pub fn spawn(name: &str, env: &[(&str, String)]) -> Process {
        let mut command = Command::new(binary(name));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Process {
            child,
            name: name.into(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait for the process to exit by itself, bounded; its exit status.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.name);
            sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `http://{addr}{path}`; the status code, or 0 when nothing answers.
pub async fn http_status(addr: &str, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else {
        return 0;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if tcp.write_all(request.as_bytes()).await.is_err() {
        return 0;
    }
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// Wait until `GET {path}` answers 200, bounded.
pub async fn wait_http_ok(addr: &str, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_status(addr, path).await != 200 {
        assert!(Instant::now() < deadline, "{addr}{path} never answered 200");
        sleep(Duration::from_millis(50)).await;
    }
}

/// A gateway served in this process on 127.0.0.1:0 until [`InProcessGateway::stop`].
pub struct InProcessGateway {
    pub gateway: Gateway,
    /// Its WebSocket URL.
    pub url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl InProcessGateway {
    /// Serve `gateway` and wait until it is ready (a Redis-backed one subscribes first).
    pub async fn serve(gateway: Gateway) -> InProcessGateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("ws://{}/v1/ws", listener.local_addr().expect("addr"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = gateway.clone();
        let task = tokio::spawn(async move {
            serving
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await;
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gateway.is_ready() {
            assert!(Instant::now() < deadline, "gateway not ready");
            sleep(Duration::from_millis(20)).await;
        }
        InProcessGateway {
            gateway,
            url,
            stop,
            task,
        }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("gateway stopped");
    }
}
