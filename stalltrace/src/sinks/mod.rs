//! Where data goes: NDJSON events (stdout, a file, `watch` clients) and the control API
//! server. Sinks never hold up the loop that feeds them.
pub mod api_server;
pub mod ndjson;
pub mod writer;
