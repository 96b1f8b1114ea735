//! Where data goes: NDJSON events (stdout, a file, `watch` clients), the control API server
//! and Prometheus metrics. Sinks never hold up the loop that feeds them.
pub mod api_server;
pub mod metrics;
pub mod ndjson;
pub mod writer;
