//! "What is different": per (process, endpoint, request signature), completed requests with
//! latency percentiles and stalls, over the daemon's life, in bounded memory; ranked by how
//! over-represented a group is among stalls compared with completed requests.
//!
//! Completed requests are sampled (the kernel reports at most one request per connection per
//! sweep, with its bytes, and then its completion), so counts of completed requests are
//! samples; shares and percentiles are estimates. Stalls are all counted.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// At most this many groups; later ones share an `(other signatures)` group per endpoint…
const MAX_GROUPS: usize = 4096;
/// …of which there are at most this many; beyond, one `(other signatures)` group for all.
const MAX_OTHER_GROUPS: usize = 256;
const OTHER: &str = "(other signatures)";
/// Sampled requests awaiting their completion at most (one per connection at a time).
const MAX_IN_FLIGHT: usize = 65_536;

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WhyKey {
    pub executable: String,
    pub role: String,
    /// `:8080` (the port a server serves) or `10.0.0.5:5432` (the peer a client calls).
    pub endpoint: String,
    pub signature: String,
}

#[derive(Default)]
struct Group {
    completed: u64,
    stalls: u64,
    latency: Histogram,
}

/// Latencies in log-linear buckets: 4 per power of two of microseconds, with the smallest and
/// largest seen. A quantile is interpolated within its bucket and kept within those two: within
/// 10 % of the truth for spread-out latencies, exact when they are all alike.
struct Histogram {
    buckets: [u32; 160],
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: [0; 160],
            min: u64::MAX,
            max: 0,
        }
    }
}

impl Histogram {
    fn bucket(micros: u64) -> usize {
        let micros = micros.max(1);
        let exponent = 63 - micros.leading_zeros() as usize;
        let mantissa = if exponent >= 2 {
            ((micros >> (exponent - 2)) & 3) as usize
        } else {
            0
        };
        (exponent * 4 + mantissa).min(159)
    }

    /// The lower bound of a bucket, in microseconds.
    fn floor(bucket: usize) -> u64 {
        let (exponent, mantissa) = (bucket / 4, (bucket % 4) as u64);
        if exponent >= 2 {
            (1u64 << exponent) + (mantissa << (exponent - 2))
        } else {
            1u64 << exponent
        }
    }

    fn record(&mut self, micros: u64) {
        let bucket = &mut self.buckets[Self::bucket(micros)];
        *bucket = bucket.saturating_add(1);
        self.min = self.min.min(micros);
        self.max = self.max.max(micros);
    }

    /// The value at quantile `q` (0–1), in microseconds.
    fn quantile(&self, q: f64) -> Option<u64> {
        let total: u64 = self.buckets.iter().map(|&b| u64::from(b)).sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (bucket, &count) in self.buckets.iter().enumerate() {
            let count = u64::from(count);
            if seen + count >= rank {
                // Spread evenly over the bucket: the rank's share of the way to the next floor.
                // The last bucket takes everything above it: it ends at the largest seen.
                let floor = Self::floor(bucket);
                let next = if bucket + 1 < self.buckets.len() {
                    Self::floor(bucket + 1)
                } else {
                    self.max
                };
                let within = (rank - seen) as f64 / count as f64;
                let value =
                    floor.saturating_add((within * next.saturating_sub(floor) as f64) as u64);
                return Some(value.clamp(self.min, self.max));
            }
            seen += count;
        }
        None
    }
}

/// One line of `stalltrace why`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WhyRow {
    #[serde(flatten)]
    pub key: WhyKey,
    pub stalls: u64,
    /// Share of all stalls.
    pub stall_share: f64,
    /// Completed requests sampled.
    pub completed: u64,
    /// Share of all completed requests sampled.
    pub completed_share: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    /// stall_share − completed_share: how much more this group stalls than it is used.
    pub over_representation: f64,
}

#[derive(Default)]
pub struct Why {
    groups: HashMap<WhyKey, Group>,
    /// Sampled requests awaiting their completion, by sock address.
    in_flight: HashMap<u64, (WhyKey, u64)>,
    /// Requests and stalls counted in an `(other signatures)` group: the table was full.
    folded: u64,
    /// Request samples not taken: too many awaiting their completion.
    dropped: u64,
}

impl Why {
    pub fn new() -> Self {
        Self::default()
    }

    /// A sampled request started at `at_ns`.
    pub fn request_started(&mut self, sock: u64, key: WhyKey, at_ns: u64) {
        if self.in_flight.len() >= MAX_IN_FLIGHT && !self.in_flight.contains_key(&sock) {
            self.dropped += 1;
            return;
        }
        self.in_flight.insert(sock, (key, at_ns));
    }

    /// Requests and stalls counted in an `(other signatures)` group because the group table
    /// was full, and request samples dropped because too many were in flight.
    pub fn losses(&self) -> (u64, u64) {
        (self.folded, self.dropped)
    }

    /// The reply to the sampled request on `sock` began at `at_ns`.
    pub fn exchange_completed(&mut self, sock: u64, at_ns: u64) {
        let Some((key, started)) = self.in_flight.remove(&sock) else {
            return;
        };
        let group = self.group(key);
        group.completed += 1;
        group.latency.record(at_ns.saturating_sub(started) / 1_000);
    }

    /// A stall began on a request of this group.
    pub fn stalled(&mut self, sock: u64, key: WhyKey) {
        self.in_flight.remove(&sock);
        self.group(key).stalls += 1;
    }

    /// The connection closed: its sampled request (if any) never completed.
    pub fn forget(&mut self, sock: u64) {
        self.in_flight.remove(&sock);
    }

    fn group(&mut self, key: WhyKey) -> &mut Group {
        let key = if self.groups.len() >= MAX_GROUPS && !self.groups.contains_key(&key) {
            self.folded += 1;
            let other = WhyKey {
                signature: OTHER.to_owned(),
                ..key
            };
            if self.groups.len() < MAX_GROUPS + MAX_OTHER_GROUPS || self.groups.contains_key(&other)
            {
                other
            } else {
                WhyKey {
                    executable: "*".to_owned(),
                    role: "*".to_owned(),
                    endpoint: "*".to_owned(),
                    signature: OTHER.to_owned(),
                }
            }
        } else {
            key
        };
        self.groups.entry(key).or_default()
    }

    /// The groups `select` keeps, ranked by over-representation among stalls, then by
    /// stalls. Shares are of the selected groups' stalls and completed requests: asked about
    /// one port, the answer is about that port's traffic.
    pub fn report(&self, select: impl Fn(&WhyKey) -> bool) -> Vec<WhyRow> {
        let share = |part: u64, whole: u64| {
            if whole == 0 {
                0.0
            } else {
                part as f64 / whole as f64
            }
        };
        let ms = |micros: Option<u64>| micros.map(|us| us as f64 / 1000.0);
        let selected: Vec<(&WhyKey, &Group)> =
            self.groups.iter().filter(|(key, _)| select(key)).collect();
        let stalls = selected.iter().map(|(_, g)| g.stalls).sum();
        let completed = selected.iter().map(|(_, g)| g.completed).sum();
        let mut rows: Vec<WhyRow> = selected
            .into_iter()
            .map(|(key, group)| {
                let stall_share = share(group.stalls, stalls);
                let completed_share = share(group.completed, completed);
                WhyRow {
                    key: key.clone(),
                    stalls: group.stalls,
                    stall_share,
                    completed: group.completed,
                    completed_share,
                    p50_ms: ms(group.latency.quantile(0.5)),
                    p99_ms: ms(group.latency.quantile(0.99)),
                    over_representation: stall_share - completed_share,
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            b.over_representation
                .total_cmp(&a.over_representation)
                .then(b.stalls.cmp(&a.stalls))
                .then(b.completed.cmp(&a.completed))
        });
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(signature: &str) -> WhyKey {
        WhyKey {
            executable: "shop".into(),
            role: "server".into(),
            endpoint: ":8080".into(),
            signature: signature.into(),
        }
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn the_path_that_stalls_ranks_first() {
        let mut why = Why::new();
        let mut sock = 0;
        for i in 0..1000u64 {
            sock += 1;
            let signature = if i % 2 == 0 {
                "GET /cart"
            } else {
                "GET /products"
            };
            why.request_started(sock, key(signature), i * 10 * MS);
            why.exchange_completed(sock, i * 10 * MS + (3 + i % 5) * MS);
        }
        for _ in 0..30 {
            sock += 1;
            why.stalled(sock, key("GET /coupon/apply"));
        }
        why.request_started(9999, key("GET /coupon/apply"), 0);
        why.exchange_completed(9999, 40 * MS);
        let rows = why.report(|_| true);
        assert_eq!(rows[0].key.signature, "GET /coupon/apply");
        assert_eq!(rows[0].stalls, 30);
        assert!((rows[0].stall_share - 1.0).abs() < 1e-9);
        assert_eq!(rows[0].completed, 1);
        assert!(rows[0].completed_share < 0.002);
        // 40 ms falls in the [32, 40) ms bucket's neighbour: within 19 %.
        let p99 = rows[0].p99_ms.unwrap();
        assert!((32.0..=40.0).contains(&p99), "{p99}");
        assert!(rows[1].over_representation < 0.0);
    }

    #[test]
    fn histogram_quantiles_are_close() {
        let mut histogram = Histogram::default();
        for us in 1..=10_000u64 {
            histogram.record(us);
        }
        let p50 = histogram.quantile(0.5).unwrap() as f64;
        assert!((p50 - 5000.0).abs() / 5000.0 < 0.1, "{p50}");
        let p99 = histogram.quantile(0.99).unwrap() as f64;
        assert!((p99 - 9900.0).abs() / 9900.0 < 0.1, "{p99}");
        assert_eq!(Histogram::default().quantile(0.5), None);
        histogram.record(u64::MAX);
        assert_eq!(histogram.quantile(1.0), Some(u64::MAX));
    }

    #[test]
    fn alike_latencies_give_their_value_not_their_bucket_floor() {
        let mut histogram = Histogram::default();
        for _ in 0..100 {
            histogram.record(300_000);
        }
        assert_eq!(histogram.quantile(0.5), Some(300_000));
        assert_eq!(histogram.quantile(0.99), Some(300_000));
        // Two clusters: each quantile stays within the cluster it falls in.
        for _ in 0..100 {
            histogram.record(10_000);
        }
        let p25 = histogram.quantile(0.25).unwrap() as f64;
        assert!((p25 - 10_000.0).abs() / 10_000.0 < 0.1, "{p25}");
    }

    #[test]
    fn memory_is_bounded() {
        let mut why = Why::new();
        for i in 0..(MAX_GROUPS as u64 + 100) {
            why.stalled(i, key(&format!("GET /users/{i}")));
        }
        assert_eq!(why.groups.len(), MAX_GROUPS + 1);
        let other = why
            .report(|_| true)
            .into_iter()
            .find(|r| r.key.signature == OTHER)
            .unwrap();
        assert_eq!(other.stalls, 100);
        assert_eq!(why.losses(), (100, 0));

        // Overflow groups are bounded too, whatever the number of endpoints.
        for i in 0..10_000u64 {
            let mut k = key(&format!("GET /x/{i}"));
            k.endpoint = format!("10.0.{}.{}:80", i / 256, i % 256);
            why.stalled(i, k);
        }
        assert!(why.groups.len() <= MAX_GROUPS + MAX_OTHER_GROUPS + 1);
        assert_eq!(why.losses().0, 10_100);
        assert!(why.report(|_| true).iter().any(|r| r.key.endpoint == "*"));

        // Samples awaiting completion are bounded; closes free them.
        for sock in 0..(MAX_IN_FLIGHT as u64 + 10) {
            why.request_started(sock, key("GET /a"), 0);
        }
        assert_eq!(why.in_flight.len(), MAX_IN_FLIGHT);
        assert_eq!(why.losses().1, 10);
    }

    #[test]
    fn closed_connections_do_not_leave_samples_behind() {
        let mut why = Why::new();
        why.request_started(1, key("GET /a"), 0);
        why.forget(1);
        why.exchange_completed(1, 5 * MS);
        assert!(why.report(|_| true).is_empty());
    }

    #[test]
    fn shares_are_of_the_selected_groups() {
        let mut why = Why::new();
        let on = |endpoint: &str, signature: &str| WhyKey {
            endpoint: endpoint.into(),
            ..key(signature)
        };
        why.stalled(1, on(":80", "GET /a"));
        why.stalled(2, on(":81", "GET /b"));
        why.stalled(3, on(":81", "GET /b"));
        why.request_started(4, on(":80", "GET /c"), 0);
        why.exchange_completed(4, 1_000_000);
        let rows = why.report(|key| key.endpoint == ":80");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].key.signature, "GET /a");
        assert_eq!(rows[0].stall_share, 1.0, "the only stall on :80");
        assert_eq!(rows[1].completed_share, 1.0);
        let all = why.report(|_| true);
        let a = all.iter().find(|r| r.key.signature == "GET /a").unwrap();
        assert!((a.stall_share - 1.0 / 3.0).abs() < 1e-9);
    }
}
