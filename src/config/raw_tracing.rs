//! The raw shape of `[tracing]` in gateway.toml and of a route's `tracing` key.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::Spanned;
use super::raw::{DurationText, ValueSource};

/// `[tracing]`: OpenTelemetry spans for each request and upstream attempt, exported over
/// OTLP/HTTP (protobuf). Absent: no spans, no trace ids in logs, `traceparent` passed through
/// untouched. `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_ENDPOINT`,
/// `OTEL_EXPORTER_OTLP_TRACES_COMPRESSION`, `OTEL_EXPORTER_OTLP_COMPRESSION`,
/// `OTEL_SERVICE_NAME` and `OTEL_TRACES_SAMPLER_ARG` give the defaults of the unset keys.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    /// Default true when the table is present.
    pub enabled: Option<bool>,
    /// OTLP/HTTP traces URL. Default: `$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
    /// `$OTEL_EXPORTER_OTLP_ENDPOINT` + "/v1/traces", else "http://localhost:4318/v1/traces".
    pub endpoint: Option<Spanned<String>>,
    /// Headers sent with every export (e.g. an API key): a string or a secret reference.
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<ValueSource>>,
    /// Longest one export may take (default "10s"); the exporter never holds up a request.
    pub timeout: Option<Spanned<DurationText>>,
    /// Body encoding of the exports: "gzip" (`Content-Encoding: gzip`) or "none". Default:
    /// `$OTEL_EXPORTER_OTLP_TRACES_COMPRESSION`, else `$OTEL_EXPORTER_OTLP_COMPRESSION`, else
    /// "none".
    pub compression: Option<RawCompression>,
    /// Share of new traces recorded, 0.0 to 1.0 (default 1.0; 0.05 is a common production
    /// value). Request ids and trace ids are logged for every request either way.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sample_ratio: Option<Spanned<f64>>,
    /// Whether the `sampled` flag of a client's `traceparent` decides (default false: a client
    /// cannot make the gateway record its requests; its trace id is continued either way).
    pub trust_incoming_sampled: Option<bool>,
    /// Context formats read from clients and written to upstreams: "tracecontext", "baggage",
    /// "b3" (single header), "b3multi". Default ["tracecontext", "baggage"].
    pub propagators: Option<Spanned<Vec<Spanned<String>>>>,
    /// `service.name` of the spans (default `$OTEL_SERVICE_NAME`, else "rustygate").
    pub service_name: Option<Spanned<String>>,
}

/// `[tracing] compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RawCompression {
    Gzip,
    None,
}

/// A route's `tracing`: `false` never records the route's requests (health checks); a table
/// sets its own ratio, or records the query string.
#[derive(Debug, Clone, PartialEq, JsonSchema)]
#[serde(untagged)]
pub enum RawRouteTracing {
    Enabled(bool),
    Settings(RawRouteTracingTable),
}

/// The table form of a route's `tracing`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRouteTracingTable {
    /// Overrides `[tracing] sample_ratio` for this route.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sample_ratio: Option<f64>,
    /// Record the query string as `url.query` (default false: it often carries tokens).
    #[serde(default)]
    pub record_query: bool,
}

// By hand, like `ValueSource`, so that a mistyped key gets a precise error.
impl<'de> Deserialize<'de> for RawRouteTracing {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawRouteTracing;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("true, false or `{ sample_ratio = 0.1, record_query = false }`")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawRouteTracing, E> {
                Ok(RawRouteTracing::Enabled(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawRouteTracing, A::Error> {
                RawRouteTracingTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawRouteTracing::Settings)
            }
        }
        deserializer.deserialize_any(V)
    }
}
