//! How a load publisher sends a notification: through a worker's (or a single-node
//! gateway's) HTTP API, as backends do, or with the publisher library straight to Redis.

use anyhow::Context;
use geopush_gateway::bus::redis::RedisTarget;
use geopush_gateway::publish::Publisher;
use geopush_proto::api::NotificationRequest;
use std::sync::Arc;

/// Inbox length the direct publisher trims user inboxes to (the gateways' default).
const DIRECT_INBOX_LEN: usize = 1_000;

/// Where notifications go.
#[derive(Clone, Debug)]
pub enum PublishVia {
    /// `POST {base}/v1/notifications` with `Authorization: Bearer {api_key}`.
    Api { base: String, api_key: String },
    /// The publisher library against this Redis.
    Redis { url: String, prefix: String },
}

/// A connected publisher; cheap to clone.
#[derive(Clone)]
pub enum Sender {
    Direct(Publisher),
    Api {
        client: reqwest::Client,
        url: Arc<String>,
        authorization: Arc<String>,
    },
}

impl Sender {
    /// Connect (Redis) or build the HTTP client with `in_flight` idle connections.
    pub async fn connect(via: &PublishVia, in_flight: usize) -> anyhow::Result<Sender> {
        Ok(match via {
            PublishVia::Api { base, api_key } => Sender::Api {
                client: reqwest::Client::builder()
                    .pool_max_idle_per_host(in_flight)
                    .build()
                    .context("publisher: building the HTTP client")?,
                url: Arc::new(format!("{}/v1/notifications", base.trim_end_matches('/'))),
                authorization: Arc::new(format!("Bearer {api_key}")),
            },
            PublishVia::Redis { url, prefix } => {
                let target = RedisTarget::parse(url, false);
                Sender::Direct(
                    Publisher::connect(&target, prefix, DIRECT_INBOX_LEN)
                        .await
                        .context("publisher: connecting to Redis")?,
                )
            }
        })
    }

    /// Publish one notification; `Err` carries a short reason (counted by text).
    pub async fn send(&self, request: &NotificationRequest) -> Result<(), String> {
        match self {
            Sender::Direct(publisher) => publisher
                .publish(request)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Sender::Api {
                client,
                url,
                authorization,
            } => {
                let body = serde_json::to_vec(request).map_err(|e| e.to_string())?;
                let response = client
                    .post(url.as_str())
                    .header("authorization", authorization.as_str())
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| format!("API: {e}"))?;
                if response.status().as_u16() == 202 {
                    Ok(())
                } else {
                    Err(format!("API answered {}", response.status().as_u16()))
                }
            }
        }
    }
}
