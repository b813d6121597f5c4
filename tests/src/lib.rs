//! Support library for the geopush integration tests.
//!
//! Everything here talks to real components over loopback: an in-process gateway on port 0
//! ([`gateway::TestGateway`]), the real `geopush-gateway` binary as a child process
//! ([`process::GatewayProcess`]), real WebSocket clients ([`client::WsClient`], and
//! [`raw::RawWsClient`] for frames a conforming library refuses to send), real HTTP
//! ([`http`]). Nothing is mocked.
//!
//! With Redis: [`redis`] starts real `redis-server` processes (a standalone server, a
//! durable one that survives SIGKILL, a three-master cluster) on free ports, and [`fleet`]
//! runs several gateway nodes on one of them, with the delivery checks the multi-node and
//! cluster tests share.
//!
//! Waiting is always on a condition with a bounded timeout ([`wait::eventually`]), never a
//! fixed sleep; reads always carry a timeout.
//!
//! `cargo test -p geopush-tests` does not build other packages' binaries: run
//! `cargo build --workspace --bins` first, or the process tests (`drain.rs`) fail and say so.

pub mod client;
pub mod fleet;
pub mod gateway;
pub mod geometry;
pub mod http;
pub mod process;
pub mod prom;
pub mod raw;
pub mod redis;
pub mod tokens;
pub mod wait;
pub mod worker;

pub use client::{WsClient, WsEvent};
pub use gateway::{TestGateway, redis_config, test_config};
pub use process::GatewayProcess;
pub use raw::RawWsClient;
pub use worker::{ApiClient, TestWorker};

use std::time::Duration;

/// The default bound on a single read in tests: generous for a loaded 2-core machine, still
/// far below the harness's patience.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The bound for "wait until this becomes true" loops.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(10);
