//! Diagnosing stalls, off the event loop: a worker thread gathers the facts (samples of the
//! responsible thread from /proc, TCP signals from sock_diag, what a blocking fd is, stack
//! symbols), the loop keeps the book of open stalls and composes each diagnosis (cause,
//! confidence, request, blame chain) from them. The model and the classifiers are pure, in
//! `stalltrace_core::diagnosis`.
mod blame;
mod book;
mod gather;
mod worker;

pub(crate) use book::{Diagnoser, Outcome};
pub(crate) use gather::UnreadRequest;
pub(crate) use worker::Finding;
