//! The geopush wire protocol, version 1.
//!
//! Everything that crosses a process boundary and can be described without I/O lives here:
//! the JSON frames a mobile client and the gateway exchange ([`frames`]), the error and close
//! codes ([`codes`]), validated positions ([`fix`]) and delivery areas ([`area`]).
//!
//! Decoding never panics: bad bytes become a [`frames::DecodeError`] that names what was wrong,
//! so the gateway can answer it with a precise `error` frame.

pub mod api;
pub mod area;
pub mod bus;
pub mod codes;
pub mod fix;
pub mod frames;
pub mod place;

pub use area::{Area, AreaError, Circle, Polygon};
pub use codes::{CloseCode, ErrorCode};
pub use fix::{Fix, FixError, FixPolicy};
pub use frames::{ClientFrame, DecodeError, ServerFrame, decode_client_frame};
pub use place::{Place, PlaceError, PlaceFence};

/// Mean Earth radius in metres (IUGG), the sphere every distance in geopush is measured on.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;
