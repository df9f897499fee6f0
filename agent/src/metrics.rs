//! Prometheus metrics of the agent, served with its probes on `--http-addr` at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// `2xx` … `5xx`, or the error kind when there was no answer.
    pub class: String,
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    pub attempts: Family<ClassLabels, Counter>,
    pub attempt_seconds: Histogram,
    pub in_flight: Gauge,
    pub connected: Gauge,
    pub unreported: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let attempts = Family::<ClassLabels, Counter>::default();
        let attempt_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 15));
        let (in_flight, connected, unreported) = (Gauge::default(), Gauge::default(), Gauge::default());
        let mut r = Registry::with_prefix("herald_agent");
        r.register("attempts", "Attempts sent, by HTTP status class or error kind", attempts.clone());
        r.register("attempt_duration_seconds", "How long attempts took", attempt_seconds.clone());
        r.register("in_flight", "Attempts in flight now", in_flight.clone());
        r.register("connected", "1 while a session with a control plane is open", connected.clone());
        r.register("unreported_results", "Results waiting for the next session", unreported.clone());
        Metrics { registry: r, attempts, attempt_seconds, in_flight, connected, unreported }
    }
}

impl Metrics {
    /// Records one finished attempt.
    pub fn attempt(&self, result: &herald_shared::proto::AttemptResult) {
        if result.not_sent {
            return;
        }
        let kind = herald_shared::proto::ErrorKind::try_from(result.error_kind).unwrap_or_default();
        let class = herald_shared::attempt_class(result.status, kind);
        self.attempts.get_or_create(&ClassLabels { class }).inc();
        let d = result.duration.unwrap_or_default();
        self.attempt_seconds.observe(d.seconds as f64 + f64::from(d.nanos) / 1e9);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
