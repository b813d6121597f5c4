//! `GatewayProcess`: the real `geopush-gateway` binary as a child process, for tests of
//! signals and exit status.
//!
//! The child listens on `127.0.0.1:0`; its address is read from the JSON `listening` log line
//! on stderr. Every stderr line is kept for diagnostics. Dropping the guard kills the child
//! (by its own PID, through `Child::kill`) if it is still running.

use anyhow::{Context, bail};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Where cargo put the gateway binary: next to the test binary's `deps/` directory.
pub fn gateway_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    // target/<profile>/deps/<test>-<hash> → target/<profile>/geopush-gateway
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary is not in target/<profile>/deps")?;
    let binary = profile_dir.join(format!("geopush-gateway{}", std::env::consts::EXE_SUFFIX));
    if !binary.is_file() {
        bail!(
            "{} does not exist: run `cargo build --workspace --bins` before these tests \
             (cargo test -p geopush-tests does not build other packages' binaries)",
            binary.display()
        );
    }
    refuse_stale(&binary)?;
    Ok(binary)
}

/// Fail when a gateway or proto source file is newer than the binary: the test would
/// exercise old code.
fn refuse_stale(binary: &Path) -> anyhow::Result<()> {
    let built = std::fs::metadata(binary)
        .and_then(|m| m.modified())
        .with_context(|| format!("mtime of {}", binary.display()))?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let mut pending = vec![
        workspace.join("gateway").join("src"),
        workspace.join("proto").join("src"),
    ];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|changed| changed > built)
            {
                bail!(
                    "{} is older than {}: run `cargo build --workspace --bins` before these tests",
                    binary.display(),
                    path.display()
                );
            }
        }
    }
    Ok(())
}

/// A running gateway process.
pub struct GatewayProcess {
    child: Child,
    addr: SocketAddr,
    /// Every stderr line so far (JSON logs).
    logs: Arc<Mutex<Vec<String>>>,
}

/// The address in a JSON `{"message":"listening","addr":"…"}` log line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    if value["message"] != "listening" {
        return None;
    }
    value["addr"].as_str()?.parse().ok()
}

impl GatewayProcess {
    /// Start the binary with `--listen 127.0.0.1:0 --log-format json` and `args`, and wait
    /// for its `listening` line.
    pub fn start(args: &[&str]) -> anyhow::Result<GatewayProcess> {
        let binary = gateway_binary()?;
        let mut command = Command::new(&binary);
        command
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(args);
        // Configuration comes from the flags only, never from the shell running the tests.
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("GEOPUSH_")) {
            command.env_remove(key);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        let stderr = child.stderr.take().context("child stderr")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        let kept = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = listening_addr(&line) {
                    let _ = addr_tx.send(addr);
                }
                kept.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let mut process = GatewayProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            logs,
        };
        match addr_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(addr) => process.addr = addr,
            Err(_) => bail!(
                "the gateway printed no listening line within 10 s; logs:\n{}",
                process.logs_text()
            ),
        }
        Ok(process)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The stderr lines so far, joined.
    pub fn logs_text(&self) -> String {
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    /// True when a JSON log line has this `message`.
    pub fn logged(&self, message: &str) -> bool {
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| v["message"] == message)
    }

    /// Send SIGTERM to this child (by its PID).
    pub fn sigterm(&self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -TERM {} failed: {status}", self.pid());
        }
        Ok(())
    }

    /// SIGKILL this child (by its PID, through `Child::kill`) and reap it: no drain, no
    /// goodbye to its clients or to Redis.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait().context("try_wait")? {
            bail!("the gateway had already exited ({status})");
        }
        self.child.kill().context("SIGKILL")?;
        self.child.wait().context("reaping the gateway")
    }

    /// Wait until `GET /readyz` answers 200.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let addr = self.addr;
        crate::wait::eventually_async(
            &format!("{addr} /readyz to answer 200"),
            crate::WAIT_TIMEOUT,
            || async move {
                matches!(crate::http::get(addr, "/readyz").await, Ok(r) if r.status == 200)
            },
        )
        .await
        .with_context(|| format!("logs:\n{}", self.logs_text()))
    }

    /// Poll until the child exits, up to `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().context("try_wait")? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the gateway did not exit within {within:?}; logs:\n{}",
                    self.logs_text()
                );
            }
            tokio::time::sleep(crate::wait::POLL_INTERVAL).await;
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
