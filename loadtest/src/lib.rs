//! geopush load tests: simulated mobile fleets against a running gateway.
//!
//! [`fleet`] opens and holds many authenticated WebSocket sessions (`connect`) or has them
//! stream fixes (`fixes`), and measures the gateway's memory and CPU per connection from
//! `/proc` ([`procfs`]) next to the load client's own, so a client bottleneck is never read
//! as a server one. Clients start around real cities ([`cities`]).

pub mod cities;
pub mod fleet;
pub mod geo_bench;
pub mod notify;
pub mod procfs;

pub use fleet::{FleetOptions, Report, Scenario};
