//! `geopush-loadtest`: simulated fleets and publishers against running gateways.
//!
//! ```text
//! geopush-loadtest connect   --url ws://127.0.0.1:8080/v1/ws --secret S -n 10000 --rate 1000 \
//!     --seconds 30 [--gateway-pid PID] [--json-report out.json] [--chart out.svg]
//! geopush-loadtest fixes     --url ws://A/v1/ws,ws://B/v1/ws --secret S -n 2000 --fix-interval-ms 1000
//! geopush-loadtest geo       … --geo-rate 50 --geo-radius-m 1000
//! geopush-loadtest broadcast … --broadcast-every-s 1
//! geopush-loadtest churn     … --churn-per-s 100 --user-rate 100
//! geopush-loadtest drain     --url ws://A,ws://B … --drain-pid PID_A --user-rate 200
//! geopush-loadtest city      … (fixes, user, geo and broadcast notifications at once)
//! geopush-loadtest notify    --url … --redis-url redis://… --users 2000 --rate 10000
//! geopush-loadtest merge     a.json b.json --json-report all.json --chart all.svg
//! geopush-loadtest geo-bench (nearby beside Redis GEOSEARCH)
//! ```

use anyhow::Context;
use clap::{Parser, Subcommand};
use geopush_loadtest::report::Report;
use geopush_loadtest::sim::{self, Scenario, SimArgs};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "geopush-loadtest",
    version,
    about = "Simulated mobile fleets and publishers against geopush gateways"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open N authenticated sessions and hold them idle: connect rate, memory per connection.
    Connect(SimArgs),
    /// Every client walks and sends a fix per interval: fixes/s and fix → nearby latency.
    Fixes(SimArgs),
    /// Geo notifications to circles around clients: exact expected recipients, latency.
    Geo(SimArgs),
    /// Broadcasts to every socket: the time until the last one is reached.
    Broadcast(SimArgs),
    /// Clients disconnect and reconnect (with resume) while user notifications flow.
    Churn(SimArgs),
    /// SIGTERM one gateway mid-run: reconnect spread and notification loss.
    Drain(SimArgs),
    /// A mixed city: moving clients, user, geo and broadcast notifications at once.
    City(SimArgs),
    /// User notifications through Redis to clients on several gateways: latency, loss, cost.
    Notify(geopush_loadtest::notify::NotifyArgs),
    /// Merge the JSON reports of several loadtest processes of one run into one.
    Merge(MergeArgs),
    /// Time geopush's `nearby` beside Redis GEOSEARCH on the same places (own redis-server).
    GeoBench(geopush_loadtest::geo_bench::GeoBenchArgs),
}

#[derive(clap::Args)]
struct MergeArgs {
    /// The reports to merge (same scenario).
    #[arg(required = true)]
    reports: Vec<PathBuf>,
    /// Write the merged report as JSON here.
    #[arg(long)]
    json_report: Option<PathBuf>,
    /// Write the merged chart (SVG) here.
    #[arg(long)]
    chart: Option<PathBuf>,
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
    let (scenario, args) = match cli.scenario {
        Command::Connect(args) => (Scenario::Connect, args),
        Command::Fixes(args) => (Scenario::Fixes, args),
        Command::Geo(args) => (Scenario::Geo, args),
        Command::Broadcast(args) => (Scenario::Broadcast, args),
        Command::Churn(args) => (Scenario::Churn, args),
        Command::Drain(args) => (Scenario::Drain, args),
        Command::City(args) => (Scenario::City, args),
        Command::Notify(args) => return geopush_loadtest::notify::main(args),
        Command::GeoBench(args) => return geopush_loadtest::geo_bench::main(&args),
        Command::Merge(args) => return merge(&args),
    };
    args.validate(scenario)?;
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
    let report = runtime.block_on(sim::run(scenario, args.clone()))?;
    print!("{}", report.summary());
    report.write(args.json_report.as_deref(), args.chart.as_deref())?;
    if report.connected == 0 {
        anyhow::bail!("no client connected");
    }
    Ok(())
}

fn merge(args: &MergeArgs) -> anyhow::Result<()> {
    let reports = args
        .reports
        .iter()
        .map(|path| Report::load(path))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let merged = Report::merge(&reports)?;
    print!("{}", merged.summary());
    merged.write(args.json_report.as_deref(), args.chart.as_deref())
}
