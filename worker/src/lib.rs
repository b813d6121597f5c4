//! geopush worker: the control plane (publish API, places API, status, webhooks).
//!
//! Not built yet: issue 5 fills this crate. It exists so the workspace has its final shape.
