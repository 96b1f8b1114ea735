//! Where data goes: NDJSON events and the JSON shapes shared with the control API.
pub mod api;
pub mod json;
pub mod ndjson;
pub mod writer;
