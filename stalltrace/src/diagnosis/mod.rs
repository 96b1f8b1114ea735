//! Gathering what explains a stall: samples of the responsible thread (/proc), TCP signals
//! (sock_diag), the captured request and the blame chain, kept current while the stall is
//! open. The model and the classifiers are pure, in `stalltrace_core::diagnosis`.
mod blame;
mod gather;

pub(crate) use gather::{Diagnoser, REFRESH_EVERY_NS};
