//! The control API and the public JSON shapes: [`protocol`] is the request/response exchange
//! on the daemon's Unix socket (docs/api.md); [`schema`] the objects of NDJSON events and API
//! answers (docs/events.md). The server lives in the daemon crate.
pub mod protocol;
pub mod schema;

pub use protocol::*;
