//! `geopush-worker`: serve the backend API with Redis (`serve`, the default), or do an
//! operator's task: import a places file, hash an API key, send a test notification.

use anyhow::Context;
use clap::{Parser, Subcommand};
use geopush_gateway::api::keys::hash_key;
use geopush_gateway::bus::places_sync::PlacesStore;
use geopush_gateway::bus::redis::RedisTarget;
use geopush_gateway::process::{init_logging, shutdown_signal};
use geopush_gateway::publish::Publisher;
use geopush_proto::api::{NotificationRequest, PublishTarget};
use geopush_worker::{Worker, WorkerConfig};
use std::path::PathBuf;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "geopush-worker",
    version,
    about = "geopush worker: backend publish and places API, scheduled sends, webhooks"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: WorkerConfig,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API and run scheduled sends and webhooks (the default).
    Serve,
    /// Import a places file (GeoJSON FeatureCollection or NDJSON) into the Redis store.
    Import {
        /// The file.
        file: PathBuf,
    },
    /// Print the `GEOPUSH_API_KEYS` entry of a key: give the key, or `--generate` one.
    HashKey {
        /// The key to hash (prefer `--generate`: the key then never sits in shell history).
        key: Option<String>,
        /// Make a new random key and print it with its entry.
        #[arg(long)]
        generate: bool,
        /// The key's name in the entry.
        #[arg(long, default_value = "backend")]
        name: String,
        /// Scopes, `+`-separated: publish, places, admin.
        #[arg(long, default_value = "publish")]
        scopes: String,
    },
    /// Send a notification to one user through Redis and print its id.
    SendTest {
        /// User id (`sub`).
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "geopush test")]
        title: String,
        #[arg(long, default_value = "If you can read this, delivery works.")]
        body: String,
    },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config;
    match cli.command {
        None | Some(Command::Serve) => {
            init_logging(config.log_format);
            runtime()?.block_on(async move {
                tracing::info!(config = ?config, "configuration");
                let worker = Worker::start(config.clone())
                    .await
                    .context("starting the worker")?;
                let listener = tokio::net::TcpListener::bind(config.listen)
                    .await
                    .with_context(|| format!("binding {}", config.listen))?;
                worker.serve(listener, shutdown_signal()).await;
                anyhow::Ok(())
            })
        }
        Some(Command::Import { file }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let parsed = geopush_proto::place::parse_places_file(&text);
            for row in &parsed.rejected {
                eprintln!("rejected {} {}: {}", row.unit, row.position, row.reason);
            }
            let target = RedisTarget::parse(config.redis()?, config.redis_cluster);
            runtime()?.block_on(async move {
                let store = PlacesStore::connect(&target, &config.redis_prefix)
                    .await
                    .context("connecting to Redis")?;
                store
                    .upsert(&parsed.places)
                    .await
                    .context("writing the places")?;
                println!(
                    "imported {} places, rejected {} rows",
                    parsed.places.len(),
                    parsed.rejected.len()
                );
                anyhow::Ok(())
            })
        }
        Some(Command::HashKey {
            key,
            generate,
            name,
            scopes,
        }) => {
            for scope in scopes.split('+') {
                if geopush_gateway::api::keys::Scope::parse(scope).is_none() {
                    anyhow::bail!("unknown scope {scope:?}: use publish, places, admin");
                }
            }
            let key = match (key, generate) {
                (Some(key), false) => key,
                (None, true) => {
                    let key = format!("gpk_{}", hex::encode(rand::random::<[u8; 24]>()));
                    println!("key:   {key}");
                    key
                }
                _ => anyhow::bail!("give a key or --generate (not both)"),
            };
            println!("entry: {name}:{}:{scopes}", hash_key(&key));
            Ok(())
        }
        Some(Command::SendTest { user, title, body }) => {
            let target = RedisTarget::parse(config.redis()?, config.redis_cluster);
            runtime()?.block_on(async move {
                let publisher = Publisher::connect_with_status_retention(
                    &target,
                    &config.redis_prefix,
                    config.inbox_len,
                    config.api.status_retention(),
                )
                .await
                .context("connecting to Redis")?;
                let request = NotificationRequest {
                    target: PublishTarget::Users(vec![user]),
                    title,
                    body,
                    data: None,
                    ttl_s: 3600,
                    send_at: None,
                    idempotency_key: None,
                };
                let published = publisher.publish(&request).await.context("publishing")?;
                println!("{}", published.id);
                anyhow::Ok(())
            })
        }
    }
}
