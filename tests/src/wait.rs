//! Waiting for conditions: poll every 20 ms up to a bound, never sleep a fixed time.

use anyhow::bail;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// How often conditions are polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Poll `condition` until it holds or `timeout` passes; the error names `what`.
pub async fn eventually(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Like [`eventually`] with an async condition (for example an HTTP probe).
pub async fn eventually_async<F, Fut>(
    what: &str,
    timeout: Duration,
    mut condition: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Wait until the wall clock (Unix seconds, fractional) is past `unix_seconds`. For tests
/// whose subject is a wall-clock deadline, such as a token's `exp`; polls in short steps.
pub async fn until_unix_time(unix_seconds: f64, timeout: Duration) -> anyhow::Result<()> {
    eventually(
        &format!("the wall clock to pass {unix_seconds}"),
        timeout,
        || crate::tokens::now_unix_f64() > unix_seconds,
    )
    .await
}
