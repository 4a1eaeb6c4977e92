//! `rustygate test`: the config repo's `tests/*.toml` fixtures, run in-process against the
//! snapshot the real compiler builds, without a network.
//!
//! ```text
//! repo dir ──► compile::compile_dir ──► Snapshot ─┐
//! tests/*.toml ──► fixture::load (spans) ──► Case ┴─► exchange::run ──► Outcome ──► check ──► Report
//! ```
//! A fixture problem is a located diagnostic like a config problem; a case that runs either
//! passes or fails with expected-vs-got for every check that did not hold.

pub mod exchange;
pub mod fixture;
mod report;

use std::path::{Path, PathBuf};

use http::HeaderMap;

use crate::compile::{CompileOptions, compile_dir};
use crate::config::{Diagnostics, SourceFiles};
pub use exchange::{Outcome, UpstreamRequest};
pub use fixture::{Case, HeaderExpect, TestsFile, TraceIdCheck, TraceIdExpect};

/// What `rustygate test` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct TestOptions {
    pub dir: PathBuf,
    /// Run only cases whose name (or file) contains this.
    pub filter: Option<String>,
    /// Resolve secret references (`--env`); off by default so CI needs no secrets.
    pub resolve_secrets: bool,
    /// Extra directories `{ file = ... }` secrets may be read from (`--secret-root`).
    pub secret_roots: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TestError {
    #[error(transparent)]
    Load(#[from] crate::config::LoadError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One check that did not hold.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Mismatch {
    /// What was checked: `status`, `upstream header x-tenant`, ...
    pub check: String,
    pub expected: String,
    pub got: String,
}

/// A case that ran.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    /// `tests/x.toml:12:1`.
    pub location: String,
    pub outcome: Outcome,
    pub mismatches: Vec<Mismatch>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// The result of a run: the repo's diagnostics (errors mean nothing ran) and every case's result.
pub struct Report {
    pub dir: PathBuf,
    pub diagnostics: Diagnostics,
    pub files: SourceFiles,
    pub cases: Vec<CaseResult>,
    pub filtered_out: usize,
}

impl Report {
    /// The config or a fixture has errors: nothing was run.
    pub fn invalid(&self) -> bool {
        self.diagnostics.has_errors()
    }

    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.passed()).count()
    }

    pub fn failed(&self) -> usize {
        self.cases.len() - self.passed()
    }

    /// `cargo test`-like text (diagnostics are rendered separately, see [`Report::diagnostics`]).
    pub fn render_human(&self) -> String {
        report::human(self)
    }

    pub fn to_json(&self) -> serde_json::Value {
        report::json(self)
    }
}

/// Compiles the repo at `opts.dir`, loads its fixtures and runs the ones the filter selects.
pub fn run(opts: &TestOptions) -> Result<Report, TestError> {
    let compile_opts = CompileOptions {
        resolve_secrets: opts.resolve_secrets,
        version_id: None,
        source: opts.dir.display().to_string(),
        secret_roots: opts.secret_roots.clone(),
    };
    let compiled = compile_dir(&opts.dir, &compile_opts)?;
    let (mut diagnostics, mut files) = (compiled.diagnostics, compiled.files);
    let cases = fixture::load(&opts.dir, &mut files, &mut diagnostics);
    let mut report = Report {
        dir: opts.dir.clone(),
        diagnostics,
        files,
        cases: Vec::new(),
        filtered_out: 0,
    };
    let Some(snapshot) = compiled.snapshot else {
        return Ok(report);
    };
    if report.invalid() {
        return Ok(report);
    }
    for case in &cases {
        let file = report.files.name(case.file);
        if let Some(f) = &opts.filter
            && !case.name.contains(f.as_str())
            && !file.contains(f.as_str())
        {
            report.filtered_out += 1;
            continue;
        }
        let (line, col) = report.files.line_col(case.file, case.span.start);
        let outcome = exchange::run(&snapshot, case);
        report.cases.push(CaseResult {
            name: case.name.clone(),
            location: format!("{file}:{line}:{col}"),
            mismatches: check(case, &outcome),
            outcome,
        });
    }
    Ok(report)
}

/// Convenience for callers that only have a path.
pub fn run_dir(dir: &Path) -> Result<Report, TestError> {
    run(&TestOptions {
        dir: dir.to_path_buf(),
        ..TestOptions::default()
    })
}

fn quoted(s: Option<&str>) -> String {
    match s {
        Some(s) => format!("{s:?}"),
        None => "(none)".into(),
    }
}

/// Every expectation of `case` that `got` does not meet.
pub fn check(case: &Case, got: &Outcome) -> Vec<Mismatch> {
    let e = &case.expect;
    let mut out = Vec::new();
    let mut miss = |check: &str, expected: String, got: String| {
        out.push(Mismatch {
            check: check.to_owned(),
            expected,
            got,
        });
    };
    let answered = || match &got.policy_error {
        Some(_) => format!("not forwarded: the policy failed ({})", got.status),
        None => format!("not forwarded: the gateway answered {}", got.status),
    };
    if let Some(s) = e.status
        && s != got.status
    {
        miss("status", s.to_string(), got.status.to_string());
    }
    if e.no_route && got.route.is_some() {
        miss("route", "no route".into(), quoted(got.route.as_deref()));
    }
    if let Some(r) = &e.route
        && got.route.as_deref() != Some(r.as_str())
    {
        let g = got
            .route
            .as_deref()
            .map(|r| format!("{r:?}"))
            .unwrap_or_else(|| "no route".into());
        miss("route", format!("{r:?}"), g);
    }
    let sent = got.upstream_request.as_ref();
    let sent_or = |f: &dyn Fn(&UpstreamRequest) -> String| sent.map(f).unwrap_or_else(answered);
    if let Some(u) = &e.upstream
        && sent.map(|s| s.upstream.as_str()) != Some(u.as_str())
    {
        miss(
            "upstream",
            format!("{u:?}"),
            sent_or(&|s| format!("{:?}", s.upstream)),
        );
    }
    if let Some(p) = &e.upstream_path
        && sent.map(|s| s.path.as_str()) != Some(p.as_str())
    {
        miss(
            "upstream_path",
            format!("{p:?}"),
            sent_or(&|s| format!("{:?}", s.path)),
        );
    }
    if let Some(q) = &e.upstream_query {
        let want = (!q.is_empty()).then_some(q.as_str());
        if sent.is_none_or(|s| s.query.as_deref() != want) {
            miss(
                "upstream_query",
                quoted(want),
                sent_or(&|s| quoted(s.query.as_deref())),
            );
        }
    }
    for (name, want) in &e.headers {
        let what = format!("upstream header `{name}`");
        match sent {
            Some(s) => {
                if let Some((x, g)) = header_mismatch(&s.headers, name, want) {
                    miss(&what, x, g);
                }
            }
            None => miss(&what, describe(want), answered()),
        }
    }
    for (name, want) in &e.response_headers {
        if let Some((x, g)) = header_mismatch(&got.response_headers, name, want) {
            miss(&format!("response header `{name}`"), x, g);
        }
    }
    if let Some(want) = &e.upstream_trace_id {
        let check = "upstream_trace_id";
        let expected = match want {
            TraceIdCheck::Is(id) => format!("{id:?} in the upstream's traceparent"),
            TraceIdCheck::IsNot(id) => format!("a trace id other than the client's {id:?}"),
        };
        match sent {
            None => miss(check, expected, answered()),
            Some(s) => {
                let tp = s.headers.get("traceparent");
                let got = tp
                    .and_then(|v| crate::telemetry::trace::propagation::traceparent(v.as_bytes()))
                    .map(|p| String::from_utf8_lossy(&p.trace_id.hex()).into_owned());
                let ok = match (want, &got) {
                    (TraceIdCheck::Is(id), Some(g)) => g == id,
                    (TraceIdCheck::IsNot(id), Some(g)) => g != id,
                    (TraceIdCheck::Is(_), None) => false,
                    (TraceIdCheck::IsNot(_), None) => true,
                };
                if !ok {
                    let got = match tp {
                        Some(v) => {
                            format!("traceparent {:?}", String::from_utf8_lossy(v.as_bytes()))
                        }
                        None => "no traceparent".to_owned(),
                    };
                    miss(check, expected, got);
                }
            }
        }
    }
    if let Some(text) = &e.body_contains
        && !got.body.contains(text.as_str())
    {
        miss(
            "body_contains",
            format!("{text:?}"),
            format!("{:?}", truncate(&got.body, 200)),
        );
    }
    out
}

fn describe(want: &HeaderExpect) -> String {
    match want {
        HeaderExpect::Equals(v) => format!("{v:?}"),
        HeaderExpect::Present(true) => "present".into(),
        HeaderExpect::Present(false) => "absent".into(),
    }
}

fn header_mismatch(
    h: &HeaderMap,
    name: &http::HeaderName,
    want: &HeaderExpect,
) -> Option<(String, String)> {
    let values: Vec<String> = h
        .get_all(name)
        .iter()
        .map(|v| format!("{:?}", String::from_utf8_lossy(v.as_bytes())))
        .collect();
    let got = if values.is_empty() {
        "absent".to_owned()
    } else {
        values.join(", ")
    };
    let ok = match want {
        HeaderExpect::Equals(v) => {
            // One value, or all values joined the way a client would read them.
            let joined: Vec<&str> = h
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            !joined.is_empty() && joined.join(", ") == *v
        }
        HeaderExpect::Present(p) => *p != values.is_empty(),
    };
    (!ok).then(|| (describe(want), got))
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}
