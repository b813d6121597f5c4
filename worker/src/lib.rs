//! geopush worker: the control plane process.
//!
//! It serves the backend HTTP API (the routes live in `geopush_gateway::api`, which the
//! single-node gateway serves too) with a Redis publisher, runs scheduled sends, and
//! delivers geofence events to webhooks ([`webhooks`]).

pub mod webhooks;
