//! `geopush-gateway`: run a gateway (`serve`, the default) or mint a development token.

use anyhow::Context;
use clap::{Parser, Subcommand};
use geopush_gateway::config::{Config, DEV_JWT_SECRET};
use geopush_gateway::process::{init_logging, shutdown_signal};
use geopush_gateway::{Gateway, auth};

// jemalloc returns freed memory to the system and fragments less under the churn of many
// small per-connection allocations: measured ~40% less RSS per connection than glibc's
// malloc (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "geopush-gateway",
    version,
    about = "geopush gateway: location-aware WebSocket push"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Print an HS256 client token signed with the configured secret (or the dev secret).
    Token {
        /// User id (`sub`).
        #[arg(long)]
        sub: String,
        /// Device id (`did`).
        #[arg(long)]
        did: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Token { sub, did, ttl }) => {
            let config = cli.config;
            if config.tokens.jwt_public_key.is_some() || config.tokens.jwks_file.is_some() {
                anyhow::bail!(
                    "token minting needs an HMAC secret; this gateway verifies with a public key"
                );
            }
            let secret = config
                .tokens
                .jwt_secret
                .as_ref()
                .map(|s| s.expose().to_owned())
                .unwrap_or_else(|| {
                    eprintln!("warning: signing with the INSECURE development secret");
                    DEV_JWT_SECRET.to_owned()
                });
            println!(
                "{}",
                auth::mint_hs256(&secret, &sub, did.as_deref(), ttl)
                    .context("signing the token")?
            );
            Ok(())
        }
        None | Some(Command::Serve) => {
            init_logging(cli.config.log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting tokio")?;
            runtime.block_on(async move {
                tracing::info!(config = ?cli.config, "configuration");
                let gateway = Gateway::start(cli.config.clone())
                    .await
                    .context("starting the gateway")?;
                let listener = tokio::net::TcpListener::bind(cli.config.listen)
                    .await
                    .with_context(|| format!("binding {}", cli.config.listen))?;
                gateway.serve(listener, shutdown_signal()).await;
                anyhow::Ok(())
            })
        }
    }
}
