//! Why a connection is stalled: the model of a diagnosis (the responsible thread's verdict,
//! TCP signals, the request, the chain of stalls behind it) and its pure classifiers. The
//! daemon gathers the inputs; nothing here does I/O.
pub mod classify;
pub mod model;

pub use classify::{classify, confidence, tcp_cause, tcp_cause_of_stream, unseen_bytes_reason};
pub use model::*;
