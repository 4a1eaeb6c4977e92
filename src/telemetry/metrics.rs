//! Prometheus metrics, served on the admin listener at `/metrics`.
//!
//! One registry per gateway process (not global), so tests can run several gateways at once.

use prometheus::{Encoder, Gauge, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    /// `rustygate_config_reloads_total{result="success|failure"}`
    pub config_reloads: IntCounterVec,
    /// Unix time of the last successful reload.
    pub config_last_success: Gauge,
    /// `rustygate_config_info{sha}` = 1 for the config being served.
    pub config_info: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "rustygate_config_reloads_total",
                "Config reload attempts, by result.",
            ),
            &["result"],
        )
        .unwrap_or_else(|_| unreachable_metric());
        let config_last_success = Gauge::new(
            "rustygate_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config reload.",
        )
        .unwrap_or_else(|_| unreachable_metric());
        let config_info = IntGaugeVec::new(
            Opts::new(
                "rustygate_config_info",
                "The config version being served (value 1).",
            ),
            &["sha"],
        )
        .unwrap_or_else(|_| unreachable_metric());
        for c in [
            Box::new(config_reloads.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(config_last_success.clone()),
            Box::new(config_info.clone()),
        ] {
            let _ = registry.register(c);
        }
        // Both series exist from the start, so rate() and alerts work before the first failure.
        config_reloads.with_label_values(&["success"]);
        config_reloads.with_label_values(&["failure"]);
        Metrics {
            registry,
            config_reloads,
            config_last_success,
            config_info,
        }
    }

    /// Records a successful reload to `sha` (replacing the previous info series).
    pub fn reload_succeeded(&self, previous: Option<&str>, sha: &str, at_unix: f64) {
        self.config_reloads.with_label_values(&["success"]).inc();
        self.config_last_success.set(at_unix);
        if let Some(prev) = previous.filter(|p| *p != sha) {
            let _ = self.config_info.remove_label_values(&[prev]);
        }
        self.config_info.with_label_values(&[sha]).set(1);
    }

    pub fn reload_failed(&self) {
        self.config_reloads.with_label_values(&["failure"]).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Metric definitions above are constants; prometheus only rejects invalid names.
#[cold]
fn unreachable_metric<T>() -> T {
    panic!("invalid built-in metric definition")
}
