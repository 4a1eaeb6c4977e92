//! Rendering a test run: `cargo test`-like text for people, one JSON object for tools.
//!
//! Case names, file names and what a case got come from the config repo: the text prints them
//! [`printable`], and never at the start of a line, where a CI runner would read a name such
//! as `::error::...` as a command of its own.

use std::fmt::Write as _;

use serde_json::json;

use super::Report;
use crate::config::diag::printable;

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
        let _ = writeln!(out, "test {} ... {verdict}", printable(&c.name));
    }
    let failed: Vec<_> = r.cases.iter().filter(|c| !c.passed()).collect();
    if !failed.is_empty() {
        out.push_str("\nfailures:\n");
        for c in &failed {
            let _ = writeln!(
                out,
                "\n---- {} ({}) ----",
                printable(&c.name),
                printable(&c.location)
            );
            let checks: Vec<_> = c.mismatches.iter().map(|m| printable(&m.check)).collect();
            let width = checks.iter().map(|c| c.chars().count()).max().unwrap_or(0);
            for (m, check) in c.mismatches.iter().zip(&checks) {
                let _ = writeln!(
                    out,
                    "  {check:width$}  expected {}\n  {:width$}       got {}",
                    printable(&m.expected),
                    "",
                    printable(&m.got)
                );
            }
            if let Some(p) = &c.outcome.policy_error {
                let _ = writeln!(out, "  note: {}", printable(p));
            }
            if let Some(n) = &c.outcome.note {
                let _ = writeln!(out, "  note: {}", printable(n));
            }
        }
        // Each case by where it is written, then its name: a line that began with the name
        // would begin with whatever the fixture's author put there.
        out.push_str("\nfailures:\n");
        for c in &failed {
            let _ = writeln!(
                out,
                "    {}: {}",
                printable(&c.location),
                printable(&c.name)
            );
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
