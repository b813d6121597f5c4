//! Support library for geopush integration tests.
