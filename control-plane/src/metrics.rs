//! Prometheus metrics of the control plane, served on `--http-addr` at `/metrics`.
//!
//! Counters and the attempt histogram are updated where things happen (publish, results, lease
//! expiry); the queue's depth and the oldest pending delivery's age are read from the database
//! when Prometheus scrapes, and the connected agents from the dispatcher. Webhook labels are
//! bounded: the first [`WEBHOOK_LABELS`] webhooks seen get their own series, the rest share
//! `webhook="other"`.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Webhooks that get a series of their own in `herald_attempts_total`.
pub const WEBHOOK_LABELS: usize = 100;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    succeeded,
    retrying,
    failed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub webhook: String,
    /// `2xx`, `3xx`, `4xx`, `5xx`, or the error kind when there was no answer (`timeout`, …).
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reason {
    /// The lease outlived the webhook's timeout plus `--lease-grace`.
    expired,
    /// The agent holding it disconnected.
    agent_left,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: Reason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Via {
    /// Leased by a claim of the dispatch loop.
    claim,
    /// Leased in the publish's own transaction, to an agent waiting for work.
    publish,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ViaLabels {
    pub via: Via,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Source {
    /// The envelope cache the publish filled.
    cache,
    /// Read back from the events table.
    database,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: Source,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ZoneLabels {
    pub zone: String,
}

/// Every metric the control plane exports.
pub struct Metrics {
    registry: Registry,
    pub events_published: Counter,
    pub deliveries: Family<OutcomeLabels, Counter>,
    pub attempts: Family<AttemptLabels, Counter>,
    pub attempt_seconds: Histogram,
    pub leases_reclaimed: Family<ReasonLabels, Counter>,
    pub jobs_sent: Family<ViaLabels, Counter>,
    pub envelopes: Family<SourceLabels, Counter>,
    pub queue_depth: Family<StatusLabels, Gauge>,
    pub oldest_pending_seconds: Gauge,
    pub agents_connected: Family<ZoneLabels, Gauge>,
    labelled_webhooks: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(crate::store::writer::Commits::default())
    }
}

impl Metrics {
    /// The metrics, with the writer's commit counters among them.
    pub fn new(commits: crate::store::writer::Commits) -> Self {
        let events_published = Counter::default();
        let deliveries = Family::<OutcomeLabels, Counter>::default();
        let attempts = Family::<AttemptLabels, Counter>::default();
        // 5 ms to about 80 s.
        let attempt_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 15));
        let leases_reclaimed = Family::<ReasonLabels, Counter>::default();
        let jobs_sent = Family::<ViaLabels, Counter>::default();
        let envelopes = Family::<SourceLabels, Counter>::default();
        let queue_depth = Family::<StatusLabels, Gauge>::default();
        let oldest_pending_seconds = Gauge::default();
        let agents_connected = Family::<ZoneLabels, Gauge>::default();
        let mut r = Registry::with_prefix("herald");
        r.register(
            "events_published",
            "Events acknowledged by PublishEvent(s), idempotent repeats included",
            events_published.clone(),
        );
        r.register("deliveries", "Attempt results applied, by what they made of the delivery", deliveries.clone());
        r.register("attempts", "Attempts by webhook and HTTP status class or error kind", attempts.clone());
        r.register("attempt_duration_seconds", "How long attempts took, as agents measured", attempt_seconds.clone());
        r.register("leases_reclaimed", "Leases taken back to dispatch again, by reason", leases_reclaimed.clone());
        r.register(
            "jobs_sent",
            "Jobs sent to agents, by how they were leased: by a claim, or as they were published",
            jobs_sent.clone(),
        );
        r.register(
            "event_envelopes",
            "Event envelopes that jobs were built from, by where they came from: the cache of published events, or the database",
            envelopes.clone(),
        );
        r.register("queue_depth", "Deliveries not yet final, by status", queue_depth.clone());
        r.register(
            "oldest_pending_age_seconds",
            "How long the oldest delivery that is due has waited to be sent",
            oldest_pending_seconds.clone(),
        );
        r.register(
            "agents_connected",
            "Agent sessions open on this control plane, by zone (0 for zones webhooks name)",
            agents_connected.clone(),
        );
        r.register(
            "db_commits",
            "Write transactions committed: durable ones waited for the disk (fsync), relaxed ones did not",
            commits,
        );
        // Both reasons are exported from the start, at 0, so that alerts can use them.
        for reason in [Reason::expired, Reason::agent_left] {
            leases_reclaimed.get_or_create(&ReasonLabels { reason }).inc_by(0);
        }
        for via in [Via::claim, Via::publish] {
            jobs_sent.get_or_create(&ViaLabels { via }).inc_by(0);
        }
        for source in [Source::cache, Source::database] {
            envelopes.get_or_create(&SourceLabels { source }).inc_by(0);
        }
        Metrics {
            registry: r,
            events_published,
            deliveries,
            attempts,
            attempt_seconds,
            leases_reclaimed,
            jobs_sent,
            envelopes,
            queue_depth,
            oldest_pending_seconds,
            agents_connected,
            labelled_webhooks: Mutex::new(HashSet::new()),
        }
    }

    /// The label for `webhook`: its id while fewer than [`WEBHOOK_LABELS`] have one, else `other`.
    pub fn webhook_label(&self, webhook: &str) -> String {
        let mut seen = self.labelled_webhooks.lock().expect("metrics lock");
        if seen.contains(webhook) || (seen.len() < WEBHOOK_LABELS && seen.insert(webhook.to_owned())) {
            webhook.to_owned()
        } else {
            "other".to_owned()
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_labels_are_bounded() {
        let m = Metrics::default();
        for i in 0..WEBHOOK_LABELS {
            assert_eq!(m.webhook_label(&format!("wh_{i}")), format!("wh_{i}"));
        }
        assert_eq!(m.webhook_label("wh_one_too_many"), "other");
        assert_eq!(m.webhook_label("wh_7"), "wh_7", "a labelled webhook keeps its label");
    }

    #[test]
    fn the_exposition_names_every_family() {
        let text = Metrics::default().encode();
        for name in ["herald_events_published_total", "herald_leases_reclaimed_total{reason=\"expired\"} 0"] {
            assert!(text.contains(name), "{name} in {text}");
        }
    }
}
