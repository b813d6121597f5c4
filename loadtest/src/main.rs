//! `geopush-loadtest`: simulated fleets against a running gateway.
//!
//! ```text
//! geopush-loadtest connect --url ws://127.0.0.1:8080/v1/ws --secret S --connections 10000 \
//!     --rate 1000 --hold-seconds 30 [--fix-once] [--gateway-pid PID] [--json-report out.json]
//! geopush-loadtest fixes   --url … --secret S --connections 2000 --fix-interval-ms 1000 …
//! geopush-loadtest notify  --url ws://A/v1/ws,ws://B/v1/ws --secret S --redis-url redis://… \
//!     --users 2000 --rate 10000 --seconds 30 [--churn 1000] [--gateway-pid PA,PB]
//! ```

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use geopush_loadtest::cities::{self, Cities};
use geopush_loadtest::{FleetOptions, Scenario, fleet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "geopush-loadtest",
    version,
    about = "Simulated mobile fleets against a geopush gateway"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open N authenticated sessions, hold them idle (answering pings), close them, report.
    Connect {
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// Like `connect`, and every client sends a fix per interval during the hold.
    Fixes {
        #[command(flatten)]
        fleet: FleetArgs,
        /// Milliseconds between two fixes of one client.
        #[arg(
            long,
            env = "GEOPUSH_LOADTEST_FIX_INTERVAL_MS",
            default_value_t = 1_000
        )]
        fix_interval_ms: u64,
    },
    /// Time geopush's `nearby` beside Redis GEOSEARCH on the same places (own redis-server).
    GeoBench(geopush_loadtest::geo_bench::GeoBenchArgs),
    /// User notifications through Redis to clients on several gateways: latency, loss, cost.
    Notify(geopush_loadtest::notify::NotifyArgs),
}

#[derive(Args)]
struct FleetArgs {
    /// Gateway WebSocket URL (path defaults to /v1/ws).
    #[arg(
        long,
        env = "GEOPUSH_LOADTEST_URL",
        default_value = "ws://127.0.0.1:8080/v1/ws"
    )]
    url: String,
    /// The gateway's HS256 secret (its --jwt-secret); one token is minted per client.
    #[arg(long, env = "GEOPUSH_JWT_SECRET")]
    secret: String,
    /// Number of clients, each with its own `sub`.
    #[arg(
        long,
        short = 'n',
        env = "GEOPUSH_LOADTEST_CONNECTIONS",
        default_value_t = 100
    )]
    connections: usize,
    /// New connections per second.
    #[arg(long, env = "GEOPUSH_LOADTEST_RATE", default_value_t = 500.0)]
    rate: f64,
    /// Most handshakes in flight at once.
    #[arg(long, env = "GEOPUSH_LOADTEST_CONCURRENCY", default_value_t = 200)]
    concurrency: usize,
    /// Seconds to hold the fleet once every client is connected.
    #[arg(long, env = "GEOPUSH_LOADTEST_HOLD_SECONDS", default_value_t = 10.0)]
    hold_seconds: f64,
    /// Seconds between the last connect and the memory sample (part of the hold).
    #[arg(long, env = "GEOPUSH_LOADTEST_SETTLE_SECONDS", default_value_t = 3.0)]
    settle_seconds: f64,
    /// Each client sends one `location` fix right after `welcome`.
    #[arg(long)]
    fix_once: bool,
    /// Gateway process id: its RSS is read before and after connecting.
    #[arg(long, env = "GEOPUSH_LOADTEST_GATEWAY_PID")]
    gateway_pid: Option<u32>,
    /// Bound on TCP connect + upgrade + welcome per client, seconds.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout_seconds: f64,
    /// Clients are named `{prefix}-{i}` (use distinct prefixes for parallel processes).
    #[arg(long, default_value = "load")]
    sub_prefix: String,
    /// GeoNames cities1000 CSV to scatter clients around.
    #[arg(long, env = "GEOPUSH_CITIES_FILE")]
    cities: Option<PathBuf>,
    /// Seed for client positions.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Spread clients over this many loopback source addresses (127.0.0.1, .2, …): past
    /// ~14,000 connections from one address, the kernel's source-port search dominates the
    /// client's CPU.
    #[arg(long, default_value_t = 1)]
    source_ips: u8,
    /// Runtime worker threads (1 = a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json_report: Option<PathBuf>,
    /// No progress lines.
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn options(
    args: &FleetArgs,
    scenario: Scenario,
    fix_interval_ms: u64,
) -> anyhow::Result<FleetOptions> {
    let needs_cities = args.fix_once || scenario == Scenario::Fixes;
    let cities = if needs_cities {
        let path = args.cities.clone().unwrap_or_else(cities::default_path);
        Some(Arc::new(Cities::load(&path).context(
            "fixes need real positions: pass --cities PATH (GeoNames cities1000.csv)",
        )?))
    } else {
        None
    };
    Ok(FleetOptions {
        scenario,
        url: args.url.clone(),
        secret: args.secret.clone(),
        connections: args.connections,
        rate: args.rate,
        concurrency: args.concurrency,
        hold_seconds: args.hold_seconds,
        settle_seconds: args.settle_seconds,
        fix_once: args.fix_once,
        fix_interval_ms,
        gateway_pid: args.gateway_pid,
        connect_timeout_seconds: args.connect_timeout_seconds,
        sub_prefix: args.sub_prefix.clone(),
        cities,
        progress: !args.quiet,
        seed: args.seed,
        source_ips: args.source_ips,
    })
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("geopush-loadtest: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let (args, scenario, interval) = match &cli.scenario {
        Command::Connect { fleet } => (fleet, Scenario::Connect, 1_000),
        Command::Fixes {
            fleet,
            fix_interval_ms,
        } => (fleet, Scenario::Fixes, *fix_interval_ms),
        Command::GeoBench(args) => return geopush_loadtest::geo_bench::main(args),
        Command::Notify(args) => return geopush_loadtest::notify::main(args.clone()),
    };
    let options = options(args, scenario, interval)?;
    options.validate()?;
    if args.threads == 0 {
        anyhow::bail!("--threads must be at least 1");
    }
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .context("starting tokio")?;
    let report = runtime.block_on(fleet::run(options))?;
    print!("{}", report.summary());
    if let Some(path) = &args.json_report {
        let json = serde_json::to_string_pretty(&report).context("serializing the report")?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if report.connected == 0 {
        anyhow::bail!("no client connected");
    }
    Ok(())
}
