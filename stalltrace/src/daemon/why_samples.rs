//! Feeds `why`: the request starts the kernel sampled (one per connection per sweep, with its
//! captured bytes), their completions, and closes.
use stalltrace_common::{Capture, ConnEvent, EventKind};
use stalltrace_core::{
    protocols,
    tracker::{model::Role, Conn},
    why::WhyKey,
};

use super::Daemon;

/// Signature of a request whose bytes were not captured.
pub(super) const NOT_CAPTURED: &str = "(not captured)";

impl Daemon {
    /// Feeds sampled exchanges to `why`: a reported request start carries its captured bytes,
    /// its completion follows.
    pub(super) fn sample_exchange(&mut self, event: &ConnEvent, capture: Option<Capture>) {
        let sock = event.header.sock;
        let sampled_start = match event.kind() {
            Some(EventKind::RequestStarted) => true,
            // A passive connection's first transfer, when it started a request.
            Some(EventKind::Discovered) => capture.is_some(),
            Some(EventKind::ExchangeCompleted) => {
                self.why.exchange_completed(sock, event.header.ts_ns);
                false
            }
            Some(EventKind::Closed) => {
                self.why.forget(sock);
                false
            }
            _ => false,
        };
        if !sampled_start {
            return;
        }
        let Some(conn) = self.tracker.conn(sock) else {
            return;
        };
        let signature =
            capture.and_then(|c| protocols::recognize_with(c.data(), self.config.privacy));
        let signature = signature.map_or_else(|| NOT_CAPTURED.to_owned(), |s| s.display());
        self.why
            .request_started(sock, why_key(conn, signature), event.header.ts_ns);
    }
}

/// Prefix of a Unix connection's `why` endpoint: `unix:/run/php/fpm.sock`.
pub(super) const UNIX_ENDPOINT: &str = "unix:";

/// The `why` group of a request on `conn`: a server is grouped by the port it serves, a client
/// by the peer it calls; both ends of a Unix connection by its path.
pub(super) fn why_key(conn: &Conn, signature: String) -> WhyKey {
    let endpoint = match (conn.unix(), conn.role) {
        (Some(unix), _) => format!("{UNIX_ENDPOINT}{}", unix.path()),
        (None, Role::Server) => format!(":{}", conn.endpoints.local_port),
        (None, Role::Client) => conn.endpoints.peer_addr().to_string(),
    };
    let executable = if conn.owner.pid == 0 {
        "-".to_owned()
    } else {
        conn.owner.comm.as_str().into_owned()
    };
    WhyKey {
        executable,
        role: conn.role.as_str().into(),
        endpoint,
        signature,
    }
}
