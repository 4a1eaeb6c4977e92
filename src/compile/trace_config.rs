//! `[tracing]` of gateway.toml and routes' `tracing` key → [`TraceConfig`] / [`RouteTrace`].

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};

use super::Cx;
use super::secrets::resolve_secret;
use crate::config::raw::{GatewayFile, ValueSource};
use crate::config::raw_tracing::{RawCompression, RawRouteTracing, RawTracing};
use crate::config::{Diagnostic, FileId, Spanned};
use crate::router::PathPattern;
use crate::telemetry::trace::propagation::{NAMES, Propagators};
use crate::telemetry::trace::{Compression, ExportConfig, RouteTrace, TraceConfig};

pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_ENDPOINT: &str = "http://localhost:4318/v1/traces";

/// The standard `OTEL_*` variables the unset keys default to.
#[derive(Debug, Default, Clone)]
pub(crate) struct OtelEnv {
    pub traces_endpoint: Option<String>,
    pub endpoint: Option<String>,
    pub service_name: Option<String>,
    pub sampler: Option<String>,
    pub sampler_arg: Option<String>,
    pub traces_compression: Option<String>,
    pub compression: Option<String>,
}

impl OtelEnv {
    fn from_process() -> OtelEnv {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        OtelEnv {
            traces_endpoint: var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            endpoint: var("OTEL_EXPORTER_OTLP_ENDPOINT"),
            service_name: var("OTEL_SERVICE_NAME"),
            sampler: var("OTEL_TRACES_SAMPLER"),
            sampler_arg: var("OTEL_TRACES_SAMPLER_ARG"),
            traces_compression: var("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"),
            compression: var("OTEL_EXPORTER_OTLP_COMPRESSION"),
        }
    }

    fn endpoint(&self) -> String {
        match (&self.traces_endpoint, &self.endpoint) {
            (Some(t), _) => t.clone(),
            (None, Some(base)) => format!("{}/v1/traces", base.trim_end_matches('/')),
            (None, None) => DEFAULT_ENDPOINT.to_owned(),
        }
    }

    /// `OTEL_EXPORTER_OTLP_TRACES_COMPRESSION`, else `OTEL_EXPORTER_OTLP_COMPRESSION`: the
    /// variable's name and value when it is set.
    fn compression(&self) -> Option<(&'static str, &str)> {
        match (&self.traces_compression, &self.compression) {
            (Some(t), _) => Some(("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", t)),
            (None, Some(c)) => Some(("OTEL_EXPORTER_OTLP_COMPRESSION", c)),
            (None, None) => None,
        }
    }

    /// The ratio of `OTEL_TRACES_SAMPLER=traceidratio|parentbased_traceidratio`, or of
    /// `always_on`/`always_off`.
    fn ratio(&self) -> Option<f64> {
        match self.sampler.as_deref()? {
            "always_on" | "parentbased_always_on" => Some(1.0),
            "always_off" | "parentbased_always_off" => Some(0.0),
            "traceidratio" | "parentbased_traceidratio" => self
                .sampler_arg
                .as_deref()
                .and_then(|a| a.trim().parse::<f64>().ok())
                .filter(|r| (0.0..=1.0).contains(r)),
            _ => None,
        }
    }
}

pub(crate) fn compile_tracing(
    cx: &mut Cx<'_>,
    gateway: Option<&(FileId, GatewayFile)>,
) -> Option<Arc<TraceConfig>> {
    let (file, g) = gateway?;
    let raw = g.tracing.as_ref()?;
    compile_with(cx, *file, raw, &OtelEnv::from_process())
}

pub(crate) fn compile_with(
    cx: &mut Cx<'_>,
    file: FileId,
    raw: &Spanned<RawTracing>,
    env: &OtelEnv,
) -> Option<Arc<TraceConfig>> {
    if raw.enabled == Some(false) {
        return None;
    }
    let endpoint_text = raw
        .endpoint
        .as_ref()
        .map_or_else(|| env.endpoint(), |e| e.get().clone());
    let span = raw
        .endpoint
        .as_ref()
        .map_or_else(|| raw.span(), Spanned::span);
    let endpoint = match endpoint_text.parse::<http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some() => {
            Some(u)
        }
        _ => {
            cx.push(
                Diagnostic::error(
                    "invalid-tracing",
                    format!("`{endpoint_text}` is not an http(s) URL for the OTLP collector"),
                )
                .at(file, span, "not an http(s) URL")
                .help("write the full traces URL, e.g. \"http://otel-collector:4318/v1/traces\""),
            );
            None
        }
    };
    let sample_ratio = match &raw.sample_ratio {
        Some(r) => ratio(cx, file, r)?,
        None => env.ratio().unwrap_or(1.0),
    };
    let timeout = raw
        .timeout
        .as_ref()
        .and_then(|t| cx.duration(file, t))
        .unwrap_or(DEFAULT_EXPORT_TIMEOUT);
    let compression = match (raw.compression, env.compression()) {
        (Some(RawCompression::Gzip), _) => Compression::Gzip,
        (Some(RawCompression::None), _) | (None, None) => Compression::None,
        (None, Some((var, value))) => Compression::from_name(value).unwrap_or_else(|| {
            // The OpenTelemetry SDKs ignore an unknown value too; a warning says so.
            cx.push(
                Diagnostic::warning(
                    "invalid-tracing",
                    format!("{var}=`{value}` is not a compression the exporter knows; exporting uncompressed"),
                )
                .at(file, raw.span(), "in this [tracing]")
                .help(format!("set {var} to \"gzip\" or \"none\", or `compression` here")),
            );
            Compression::None
        }),
    };
    let propagators = match &raw.propagators {
        None => Propagators::default(),
        Some(list) => match Propagators::from_names(list.iter().map(|n| n.get().as_str())) {
            Ok(p) => p,
            Err(bad) => {
                let at = list
                    .iter()
                    .find(|n| n.get() == bad)
                    .map_or_else(|| list.span(), Spanned::span);
                let mut d =
                    Diagnostic::error("invalid-tracing", format!("unknown propagator `{bad}`"))
                        .at(file, at, "unknown propagator")
                        .help(format!("choose from {}", NAMES.join(", ")));
                if let Some(m) = super::did_you_mean(bad, NAMES.into_iter()) {
                    d = d.help(format!("did you mean `{m}`?"));
                }
                cx.push(d);
                return None;
            }
        },
    };
    let mut headers = Vec::new();
    for (name, value) in &raw.headers {
        let Ok(hn) = HeaderName::from_bytes(name.as_bytes()) else {
            cx.push(
                Diagnostic::error(
                    "invalid-header",
                    format!("`{name}` is not a valid header name"),
                )
                .at(file, value.span(), "for this header"),
            );
            continue;
        };
        let text = match value.get() {
            ValueSource::Literal(s) => Some(s.clone()),
            ValueSource::Secret(s) => resolve_secret(cx, file, value.span(), s),
        };
        let Some(text) = text else { continue };
        match HeaderValue::from_str(&text) {
            Ok(mut v) => {
                v.set_sensitive(matches!(value.get(), ValueSource::Secret(_)));
                headers.push((hn, v));
            }
            Err(_) => cx.push(
                Diagnostic::error(
                    "invalid-header",
                    format!("the value for header `{name}` is not a valid header value"),
                )
                .at(file, value.span(), "invalid value"),
            ),
        }
    }
    let service_name = raw
        .service_name
        .as_ref()
        .map(|s| s.get().clone())
        .or_else(|| env.service_name.clone())
        .unwrap_or_else(|| "rustygate".to_owned());
    Some(Arc::new(TraceConfig {
        export: Arc::new(ExportConfig {
            endpoint: endpoint?,
            headers,
            timeout,
            resource: vec![
                ("service.name".to_owned(), service_name),
                (
                    "service.version".to_owned(),
                    env!("CARGO_PKG_VERSION").to_owned(),
                ),
            ],
            compression,
        }),
        sample_ratio,
        trust_incoming_sampled: raw.trust_incoming_sampled.unwrap_or(false),
        propagators,
    }))
}

fn ratio(cx: &mut Cx<'_>, file: FileId, r: &Spanned<f64>) -> Option<f64> {
    let v = *r.get();
    if (0.0..=1.0).contains(&v) {
        return Some(v);
    }
    cx.push(
        Diagnostic::error(
            "invalid-tracing",
            "`sample_ratio` must be between 0.0 and 1.0",
        )
        .at(file, r.span(), "out of range")
        .help("0.05 records one request in twenty; 0 records none"),
    );
    None
}

/// A route's settings; `path` gives `http.route`.
pub(crate) fn route_trace(
    cx: &mut Cx<'_>,
    file: FileId,
    raw: Option<&Spanned<RawRouteTracing>>,
    path: &PathPattern,
) -> RouteTrace {
    let http_route: Arc<str> = match path {
        PathPattern::Exact(p) => Arc::from(p.as_str()),
        PathPattern::Prefix(p) if p == "/" => Arc::from("/*"),
        PathPattern::Prefix(p) => Arc::from(format!("{p}/*")),
    };
    let mut out = RouteTrace {
        http_route,
        ..RouteTrace::default()
    };
    match raw.map(|r| (r.get(), r.span())) {
        None => {}
        Some((RawRouteTracing::Enabled(on), _)) => out.enabled = *on,
        Some((RawRouteTracing::Settings(t), span)) => {
            if let Some(r) = t.sample_ratio {
                out.sample_ratio = ratio(cx, file, &Spanned::new(r, span));
            }
            out.record_query = t.record_query;
        }
    }
    out
}
