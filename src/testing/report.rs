//! Rendering a test run: `cargo test`-like text for people, one JSON object for tools.

use std::fmt::Write as _;

use serde_json::json;

use super::Report;

pub(super) fn human(r: &Report) -> String {
    let mut out = String::new();
    let n = r.cases.len();
    let _ = writeln!(
        out,
        "\nrunning {n} test{} from {}",
        if n == 1 { "" } else { "s" },
        r.dir.display()
    );
    for c in &r.cases {
        let verdict = if c.passed() { "ok" } else { "FAILED" };
        let _ = writeln!(out, "test {} ... {verdict}", c.name);
    }
    let failed: Vec<_> = r.cases.iter().filter(|c| !c.passed()).collect();
    if !failed.is_empty() {
        out.push_str("\nfailures:\n");
        for c in &failed {
            let _ = writeln!(out, "\n---- {} ({}) ----", c.name, c.location);
            let width = c
                .mismatches
                .iter()
                .map(|m| m.check.len())
                .max()
                .unwrap_or(0);
            for m in &c.mismatches {
                let _ = writeln!(
                    out,
                    "  {:width$}  expected {}\n  {:width$}       got {}",
                    m.check, m.expected, "", m.got
                );
            }
            if let Some(p) = &c.outcome.policy_error {
                let _ = writeln!(out, "  note: {p}");
            }
            if let Some(n) = &c.outcome.note {
                let _ = writeln!(out, "  note: {n}");
            }
        }
        out.push_str("\nfailures:\n");
        for c in &failed {
            let _ = writeln!(out, "    {}", c.name);
        }
    }
    let _ = writeln!(
        out,
        "\ntest result: {}. {} passed; {} failed; {} filtered out",
        if failed.is_empty() { "ok" } else { "FAILED" },
        r.passed(),
        r.failed(),
        r.filtered_out
    );
    out
}

pub(super) fn json(r: &Report) -> serde_json::Value {
    let cases: Vec<_> = r
        .cases
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "location": c.location,
                "ok": c.passed(),
                "mismatches": c.mismatches,
                "got": c.outcome,
            })
        })
        .collect();
    json!({
        "dir": r.dir.display().to_string(),
        "ok": !r.invalid() && r.failed() == 0,
        "passed": r.passed(),
        "failed": r.failed(),
        "filtered_out": r.filtered_out,
        "diagnostics": r.diagnostics.to_json(&r.files),
        "cases": cases,
    })
}
