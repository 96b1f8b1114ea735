//! The rules of `--config` applied to stalls before they are reported, and the stall metrics
//! that follow what is reported.
//!
//! The kernel and the tracker run at one threshold, the smallest of `--stall-after` and every
//! rule's `stall_after`. A stall found at that threshold is then, by the first rule that
//! matches it (or none):
//! - ignored (`ignore = true`): counted, never emitted nor listed, its diagnosis stopped;
//! - deferred, when its threshold (the rule's, else `--stall-after`) is not reached yet: its
//!   `stall.start` (with the diagnosis kept up to date) is held until it is, and dropped,
//!   counted, if the stall ends first;
//! - reported, with the rule's severity.
//!
//! Decisions are made once per stall, when it starts: a reload applies to later stalls.
use std::collections::HashMap;

use anyhow::{bail, Result};
use stalltrace_core::{
    diagnosis::Diagnosis,
    tracker::{
        model::{StallKind, UnixInfo},
        ConnRef, Detail, Event,
    },
};

use crate::{
    config::{Annotation, Rules, Subject},
    sinks::metrics::{Metrics, StallLabels},
};

/// What became of a stall the rules have seen.
enum Open {
    Reported {
        annotation: Annotation,
        labels: StallLabels,
        kind: StallKind,
        /// Start of the stall's quiet stretch (CLOCK_MONOTONIC ns).
        quiet_since_ns: u64,
    },
    Ignored,
    Deferred {
        start: Event,
        due_ns: u64,
        annotation: Annotation,
        labels: StallLabels,
    },
}

/// What the rules make of a stall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Ignore,
    /// Not past its threshold: held this much longer (ns).
    Hold {
        for_ns: u64,
    },
    Report,
}

pub(super) struct Policy {
    rules: Rules,
    /// The threshold of stalls no rule sets one for (`--stall-after`), ns.
    default_ns: u64,
    /// The threshold loaded into the kernel and the tracker (the smallest of all), ns.
    kernel_ns: u64,
    open: HashMap<u64, Open>,
    /// Stalls ignored by a rule, since start.
    pub(super) ignored: u64,
    /// Quiet stretches that ended before their rule's threshold, since start.
    pub(super) below_rule: u64,
    /// Connections whose stall was just ignored: their diagnosis is to be stopped.
    pub(super) stop_diagnosing: Vec<u64>,
}

impl Policy {
    /// `kernel_ns` must be at most `default_ns` and every rule's threshold.
    pub(super) fn new(rules: Rules, default_ns: u64, kernel_ns: u64) -> Self {
        Self {
            rules,
            default_ns,
            kernel_ns,
            open: HashMap::new(),
            ignored: 0,
            below_rule: 0,
            stop_diagnosing: Vec::new(),
        }
    }

    /// Puts `rules` and the default threshold in force for the stalls that start from now on;
    /// refused if a threshold is below the one running in the kernel (that needs a restart).
    pub(super) fn replace(&mut self, rules: Rules, default_ns: u64) -> Result<()> {
        let lowest = rules
            .min_stall_after()
            .map_or(default_ns, |d| (d.as_nanos() as u64).min(default_ns));
        if lowest < self.kernel_ns {
            bail!(
                "a stall_after of {} is below the threshold the kernel runs with ({}): \
                 restart the daemon to lower it",
                stalltrace_core::duration::format_millis(lowest / 1_000_000),
                stalltrace_core::duration::format_millis(self.kernel_ns / 1_000_000),
            );
        }
        self.rules = rules;
        self.default_ns = default_ns;
        Ok(())
    }

    pub(super) fn rules(&self) -> &Rules {
        &self.rules
    }

    pub(super) fn default_ns(&self) -> u64 {
        self.default_ns
    }

    /// Whether the stall open on connection `id` is kept out of listings (ignored, or not
    /// past its rule's threshold yet).
    pub(super) fn hides(&self, id: u64) -> bool {
        matches!(
            self.open.get(&id),
            Some(Open::Ignored | Open::Deferred { .. })
        )
    }

    /// What `conns` and `show` call a connection whose open stall the rules keep out of
    /// listings: `ignored`, or `active` (a request outstanding, not past its rule's threshold).
    pub(super) fn shown_as(&self, id: u64) -> Option<&'static str> {
        match self.open.get(&id) {
            Some(Open::Ignored) => Some("ignored"),
            Some(Open::Deferred { .. }) => Some("active"),
            _ => None,
        }
    }

    /// The rule's additions to the open stall of connection `id`.
    pub(super) fn annotation(&self, id: u64) -> Option<&Annotation> {
        match self.open.get(&id) {
            Some(Open::Reported { annotation, .. }) => Some(annotation),
            _ => None,
        }
    }

    /// Stalls held back until their rule's threshold, and ignored stalls, open now.
    pub(super) fn counts(&self) -> (usize, usize) {
        let deferred = self
            .open
            .values()
            .filter(|o| matches!(o, Open::Deferred { .. }))
            .count();
        let ignored = self
            .open
            .values()
            .filter(|o| matches!(o, Open::Ignored))
            .count();
        (deferred, ignored)
    }

    /// What the rules make of a stall starting on `conn`, quiet for `quiet_ms`, whose
    /// diagnosis so far is `diagnosis` (its request, its executable); with what the matching
    /// rule adds to its events.
    pub(super) fn decide(
        &self,
        conn: &ConnRef,
        diagnosis: Option<&Diagnosis>,
        quiet_ms: u64,
    ) -> (Verdict, Annotation) {
        let request = diagnosis
            .and_then(|d| d.request.as_ref())
            .map(|r| r.signature.as_str());
        let comm = conn.owner.comm.as_str();
        let decision = self.rules.decide(&Subject {
            transport: conn.endpoints.transport,
            comm: &comm,
            local_port: conn.endpoints.local_port,
            peer: conn.endpoints.peer,
            peer_port: conn.endpoints.peer_port,
            path: conn.unix.as_deref().map(UnixInfo::path),
            request,
            exe: diagnosis.and_then(|d| d.executable_path.as_deref()),
            cgroup: diagnosis.and_then(|d| d.cgroup_path.as_deref()),
        });
        let annotation = Annotation {
            severity: decision.severity,
            rule: decision.rule.map(|i| self.rules.rules[i].name.clone()),
        };
        let threshold_ns = decision.stall_after_ns.unwrap_or(self.default_ns);
        let quiet_ns = quiet_ms.saturating_mul(1_000_000);
        // Compared in whole ms, as `quiet_ms` is: a stall the tracker found at this very
        // threshold (quiet_ms rounded down) is past it.
        let verdict = if decision.ignore {
            Verdict::Ignore
        } else if quiet_ms < threshold_ns / 1_000_000 {
            Verdict::Hold {
                for_ns: threshold_ns - quiet_ns,
            }
        } else {
            Verdict::Report
        };
        (verdict, annotation)
    }

    /// Applies the rules to `events` in order: returns those to report, each with its
    /// annotation; counts them in `metrics`.
    pub(super) fn filter(
        &mut self,
        events: Vec<Event>,
        metrics: &mut Metrics,
    ) -> Vec<(Event, Option<Annotation>)> {
        let mut out = Vec::with_capacity(events.len());
        for mut event in events {
            let id = event.conn.id;
            let pass = match &mut event.detail {
                Detail::StallStart {
                    kind,
                    quiet_ms,
                    diagnosis,
                    ..
                } => {
                    let quiet_since_ns = quiet_since(event.at_ns, *quiet_ms);
                    if let Some(Open::Reported { labels, .. }) = self.open.get(&id) {
                        // A deferred stall released.
                        metrics.stall_started(labels);
                        true
                    } else {
                        let labels = metrics.stall_labels(*kind, &event.conn);
                        let (verdict, annotation) =
                            self.decide(&event.conn, diagnosis.as_deref(), *quiet_ms);
                        if verdict == Verdict::Ignore {
                            self.ignored += 1;
                            metrics.stall_ignored(&labels);
                            self.stop_diagnosing.push(id);
                            self.open.insert(id, Open::Ignored);
                            false
                        } else if let Verdict::Hold { for_ns } = verdict {
                            let due_ns = event.at_ns + for_ns;
                            self.open.insert(
                                id,
                                Open::Deferred {
                                    start: event.clone(),
                                    due_ns,
                                    annotation,
                                    labels,
                                },
                            );
                            false
                        } else {
                            metrics.stall_started(&labels);
                            self.reported(id, *kind, quiet_since_ns, annotation, labels);
                            true
                        }
                    }
                }
                Detail::StallUpdate { diagnosis, .. } => match self.open.get_mut(&id) {
                    Some(Open::Ignored) => false,
                    Some(Open::Deferred { start, .. }) => {
                        // The held start is reported with the latest diagnosis.
                        if let Detail::StallStart {
                            diagnosis: held, ..
                        } = &mut start.detail
                        {
                            *held = Some(diagnosis.clone());
                        }
                        false
                    }
                    _ => true,
                },
                Detail::StallEnd {
                    duration_ms,
                    resolution,
                    ..
                } => match self.open.remove(&id) {
                    Some(Open::Ignored) => false,
                    Some(Open::Deferred { labels, .. }) => {
                        self.below_rule += 1;
                        metrics.stall_below_rule(&labels);
                        false
                    }
                    Some(Open::Reported {
                        labels, annotation, ..
                    }) => {
                        metrics.stall_ended(&labels, *resolution, *duration_ms);
                        out.push((event, Some(annotation)));
                        continue;
                    }
                    None => true,
                },
                Detail::Close(_) => {
                    // Every stall ends before its connection closes; nothing is left open.
                    if let Some(Open::Reported { labels, .. }) = self.open.remove(&id) {
                        metrics.stall_ended(
                            &labels,
                            stalltrace_core::tracker::model::Resolution::Closed,
                            0,
                        );
                    }
                    true
                }
                Detail::Open { .. } => true,
            };
            if pass {
                let annotation = self.annotation(id).cloned();
                out.push((event, annotation));
            }
        }
        for (event, _) in &out {
            metrics.event(event_name(&event.detail));
        }
        out
    }

    /// Records the stall open on connection `id` as reported.
    fn reported(
        &mut self,
        id: u64,
        kind: StallKind,
        quiet_since_ns: u64,
        annotation: Annotation,
        labels: StallLabels,
    ) {
        let open = Open::Reported {
            annotation,
            labels,
            kind,
            quiet_since_ns,
        };
        self.open.insert(id, open);
    }

    /// How long the oldest reported stall of each kind has been quiet, as of `now` (s; 0 when
    /// none is open).
    pub(super) fn oldest(&self, now: u64) -> [(StallKind, f64); StallKind::ALL.len()] {
        let mut oldest = StallKind::ALL.map(|kind| (kind, 0.0));
        for open in self.open.values() {
            if let Open::Reported {
                kind,
                quiet_since_ns,
                ..
            } = open
            {
                let age = now.saturating_sub(*quiet_since_ns) as f64 / 1e9;
                for (k, max) in &mut oldest {
                    if k == kind && age > *max {
                        *max = age;
                    }
                }
            }
        }
        oldest
    }

    /// The held starts whose threshold has come, as of `now`: reported from now on.
    pub(super) fn release_due(&mut self, now: u64) -> Vec<Event> {
        let mut due: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, open)| matches!(open, Open::Deferred { due_ns, .. } if *due_ns <= now))
            .map(|(id, _)| *id)
            .collect();
        due.sort_unstable();
        let mut released = Vec::with_capacity(due.len());
        for id in due {
            let Some(Open::Deferred {
                mut start,
                annotation,
                labels,
                ..
            }) = self.open.remove(&id)
            else {
                continue;
            };
            let Detail::StallStart { quiet_ms, kind, .. } = &mut start.detail else {
                continue;
            };
            let quiet_since_ns = quiet_since(start.at_ns, *quiet_ms);
            *quiet_ms = now.saturating_sub(quiet_since_ns) / 1_000_000;
            let kind = *kind;
            start.at_ns = now;
            self.reported(id, kind, quiet_since_ns, annotation, labels);
            released.push(start);
        }
        released
    }
}

/// When the quiet stretch of a stall reported at `at_ns`, quiet for `quiet_ms`, began.
fn quiet_since(at_ns: u64, quiet_ms: u64) -> u64 {
    at_ns.saturating_sub(quiet_ms.saturating_mul(1_000_000))
}

/// The `event` field of an event.
fn event_name(detail: &Detail) -> &'static str {
    match detail {
        Detail::Open { .. } => "conn.open",
        Detail::Close(_) => "conn.close",
        Detail::StallStart { .. } => "stall.start",
        Detail::StallUpdate { .. } => "stall.update",
        Detail::StallEnd { .. } => "stall.end",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Severity};
    use stalltrace_core::tracker::model::{Comm, Endpoints, Owner, Resolution, Role, Transport};

    const MS: u64 = 1_000_000;

    fn event(id: u64, comm: &str, at_ms: u64, detail: Detail) -> Event {
        Event {
            at_ns: at_ms * MS,
            conn: ConnRef {
                id,
                role: Role::Client,
                owner: Owner {
                    pid: 5,
                    tid: 5,
                    comm: Comm::new(comm),
                    cgroup_id: 0,
                },
                endpoints: Endpoints {
                    transport: Transport::Tcp,
                    local: "127.0.0.1".parse().unwrap(),
                    local_port: 40000,
                    peer: "127.0.0.1".parse().unwrap(),
                    peer_port: 6379,
                    netns: 0,
                },
                unix: None,
            },
            detail,
        }
    }

    fn start(id: u64, comm: &str, at_ms: u64, quiet_ms: u64) -> Event {
        event(
            id,
            comm,
            at_ms,
            Detail::StallStart {
                kind: StallKind::AwaitingResponse,
                quiet_ms,
                diagnosis: None,
                http2_stream: None,
            },
        )
    }

    fn end(id: u64, at_ms: u64, duration_ms: u64) -> Event {
        event(
            id,
            "x",
            at_ms,
            Detail::StallEnd {
                kind: StallKind::AwaitingResponse,
                duration_ms,
                resolution: Resolution::Response,
                retries: 0,
                http2_stream: None,
                http2_late_streams: 0,
                http2_reset_by: None,
            },
        )
    }

    /// Rules: `worker` stalls after 10 s, `poller` ignored, `db` after 1 s with severity;
    /// default 2 s; the kernel runs at 1 s.
    fn policy() -> Policy {
        let rules = config::parse(
            "[[rule]]\ncomm = \"worker\"\nstall_after = \"10s\"\n\
             [[rule]]\ncomm = \"poller\"\nignore = true\n\
             [[rule]]\nname = \"db\"\ncomm = \"db\"\nstall_after = \"1s\"\nseverity = \"critical\"\n",
        )
        .unwrap()
        .rules;
        Policy::new(rules, 2000 * MS, 1000 * MS)
    }

    #[test]
    fn stalls_wait_for_their_rules_threshold() {
        let mut policy = policy();
        let mut metrics = Metrics::new(&[], 4096);
        // Found at the kernel's 1 s: db is due (1 s), the worker and a default stall are not.
        let out = policy.filter(
            vec![
                start(1, "db", 1000, 1000),
                start(2, "worker", 1000, 1000),
                start(3, "app", 1000, 1000),
            ],
            &mut metrics,
        );
        assert_eq!(out.len(), 1);
        let annotation = out[0].1.clone().unwrap();
        assert_eq!(annotation.severity, Some(Severity::Critical));
        assert_eq!(annotation.rule.as_deref(), Some("db"));
        assert!(policy.hides(2) && policy.hides(3) && !policy.hides(1));
        // At 2 s the default stall is due, with its quiet time then.
        let released = policy.release_due(2000 * MS);
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].conn.id, 3);
        assert!(matches!(
            released[0].detail,
            Detail::StallStart { quiet_ms: 2000, .. }
        ));
        assert_eq!(policy.filter(released, &mut metrics).len(), 1);
        assert!(!policy.hides(3));
        // Stalls 1 and 3 have been quiet since 0 s: 3 s at 3 s.
        assert_eq!(
            policy.oldest(3000 * MS)[1],
            (StallKind::AwaitingResponse, 3.0)
        );
        assert_eq!(policy.oldest(3000 * MS)[0].1, 0.0);
        // The worker answers at 5 s: never reported, counted.
        assert!(policy
            .filter(vec![end(2, 5000, 5000)], &mut metrics)
            .is_empty());
        assert_eq!(policy.below_rule, 1);
        assert!(policy.release_due(60_000 * MS).is_empty());
        // Reported stalls' ends are reported, with the rule's annotation.
        let ends = policy.filter(vec![end(1, 6000, 6000), end(3, 6000, 6000)], &mut metrics);
        assert_eq!(ends.len(), 2);
        assert_eq!(
            ends[0].1.as_ref().unwrap().severity,
            Some(Severity::Critical)
        );
        let text = metrics.encode();
        assert!(
            text.contains("stalltrace_stalls_open{kind=\"awaiting_response\",transport=\"tcp\"} 0"),
            "{text}"
        );
        assert!(
            text.contains(
                "stalltrace_stalls_started_total{kind=\"awaiting_response\",transport=\"tcp\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("stalltrace_stalls_below_rule_threshold_total{kind=\"awaiting_response\",transport=\"tcp\"} 1"), "{text}");
    }

    #[test]
    fn a_stall_found_at_a_fractional_threshold_is_past_it() {
        // 1.5 ms: the tracker reports quiet_ms 1; held, its immediate end would drop it.
        let mut policy = Policy::new(Rules::default(), 1_500_000, 1_500_000);
        let mut metrics = Metrics::new(&[], 4096);
        let out = policy.filter(vec![start(7, "app", 10, 1), end(7, 10, 1)], &mut metrics);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn ignored_stalls_are_counted_not_reported() {
        let mut policy = policy();
        let mut metrics = Metrics::new(&[], 4096);
        assert!(policy
            .filter(vec![start(4, "poller", 1000, 3000)], &mut metrics)
            .is_empty());
        assert_eq!(policy.stop_diagnosing, vec![4]);
        assert!(policy.hides(4));
        assert_eq!(policy.counts(), (0, 1));
        let update = event(
            4,
            "poller",
            2000,
            Detail::StallUpdate {
                kind: StallKind::AwaitingResponse,
                quiet_ms: 4000,
                diagnosis: Box::default(),
                http2_stream: None,
            },
        );
        assert!(policy
            .filter(vec![update, end(4, 9000, 9000)], &mut metrics)
            .is_empty());
        assert_eq!(policy.ignored, 1);
        assert!(!policy.hides(4));
        assert!(metrics.encode().contains(
            "stalltrace_stalls_ignored_total{kind=\"awaiting_response\",transport=\"tcp\"} 1"
        ));
    }

    #[test]
    fn reloads_cannot_go_below_the_kernels_threshold() {
        let mut policy = policy();
        let lower = config::parse("[[rule]]\ncomm = \"a\"\nstall_after = \"500ms\"\n")
            .unwrap()
            .rules;
        let err = policy.replace(lower, 2000 * MS).unwrap_err().to_string();
        assert!(err.contains("restart"), "{err}");
        assert_eq!(policy.rules().rules.len(), 3, "the rules in force are kept");
        policy.replace(Rules::default(), 5000 * MS).unwrap();
        assert_eq!(policy.default_ns(), 5000 * MS);
    }
}
