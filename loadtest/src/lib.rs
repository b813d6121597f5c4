//! geopush load tests: simulated mobile fleets and publishers against running gateways.
//!
//! [`sim`] runs every fleet scenario (connect, fixes, geo, broadcast, churn, drain, city):
//! clients that walk around real cities ([`cities`]), ack, answer pings and reconnect with
//! `resume`, and a publisher that sends user, geo and broadcast notifications ([`sender`]).
//! Each run yields a [`report::Report`]: HDR latency histograms, delivered vs expected with
//! loss and duplicates apart, counts per second, gateway RSS and CPU from `/proc`
//! ([`procfs`]) next to the client's own, a table, JSON that merges across processes, and
//! an SVG [`chart`]. [`notify`] is the Redis-centred user-notification benchmark and
//! [`geo_bench`] times `nearby` beside Redis GEOSEARCH.

pub mod chart;
pub mod cities;
pub mod geo_bench;
pub mod net;
pub mod notify;
pub mod procfs;
pub mod report;
pub mod sender;
pub mod sim;
