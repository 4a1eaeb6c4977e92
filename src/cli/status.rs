//! `rustygate status`: what a running gateway serves, from its admin listener's `/status`, and
//! whether that is in agreement (exit 0), not (1), or cannot be told (2).

use rustygate::config::diag::printable;
use serde_json::Value;
use std::fmt::Write as _;
use std::process::ExitCode;

use super::admin_http::{self, AdminUrl};
use super::{StatusFormat, Stream, emit};

/// `rustygate status`: one GET of the admin listener's `/status`.
pub(crate) fn status(admin: &str, fleet: bool, format: StatusFormat) -> ExitCode {
    let path = if fleet {
        "/status?fleet=true"
    } else {
        "/status"
    };
    let body = match AdminUrl::parse(admin).and_then(|url| admin_http::get(&url, path)) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {admin}: {e}");
            return ExitCode::from(2);
        }
    };
    let v: Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {admin}{path} did not answer JSON: {e}");
            return ExitCode::from(2);
        }
    };
    // Whatever answers JSON is not a gateway's status: a field the verdict rests on that is
    // missing or of another type means the verdict cannot be given, not "in agreement".
    let wrong = unreadable(&v, fleet);
    if !wrong.is_empty() {
        eprintln!(
            "error: {admin}{path} did not answer a RustyGate status, so agreement cannot be \
             told: {}",
            wrong.join("; ")
        );
        return ExitCode::from(2);
    }
    // What the gateway says comes from its config repo (file names, messages): printed
    // through `printable`, as `validate` prints it.
    let str_of = |v: &serde_json::Value| printable(v.as_str().unwrap_or("-")).into_owned();
    let last_ok = v["attempted"]["ok"].as_bool() == Some(true);
    // Serving the cached mirror, or the last fetch failed: the remote may have moved on.
    let stale = v["stale"].as_bool() == Some(true);
    let fetch_error = v["last_fetch_error"].as_str().filter(|e| !e.is_empty());
    // With --fleet: `Some(agree)`, or `None` when the view could not be read (the store did
    // not answer), which is not agreement. No fleet at all (no store) has nothing to disagree.
    let agree = match &v["fleet"] {
        _ if !fleet => Some(true),
        serde_json::Value::Null => Some(true),
        f => f["agree"].as_bool(),
    };
    let mut o = String::new();
    match format {
        StatusFormat::Json => {
            let _ = writeln!(
                o,
                "{}",
                serde_json::to_string_pretty(&v).unwrap_or_default()
            );
        }
        StatusFormat::Human => {
            if let Some(r) = v["replica"].as_str() {
                let _ = writeln!(o, "replica    {}", printable(r));
            }
            let _ = writeln!(
                o,
                "applied    {} (loaded {})",
                str_of(&v["version"]),
                str_of(&v["loaded_at"])
            );
            let _ = writeln!(
                o,
                "attempted  {} {}",
                str_of(&v["attempted"]["sha"]),
                if last_ok { "ok" } else { "FAILED" }
            );
            // Why it failed: the first errors, located when the commit did not compile.
            let errors = v["attempted"]["errors"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for e in errors.iter().take(3) {
                let at = match (e["file"].as_str(), e["line"].as_u64(), e["column"].as_u64()) {
                    (Some(f), Some(l), Some(c)) => format!(
                        "{}:{l}:{c}: ",
                        rustygate::config::diag::line_start_safe(&printable(f))
                    ),
                    _ => String::new(),
                };
                let _ = writeln!(o, "  {at}{}", str_of(&e["message"]));
            }
            // `/status` keeps the first errors of a version with many, and their total.
            let total = v["attempted"]["errors_total"]
                .as_u64()
                .map_or(errors.len(), |n| n as usize)
                .max(errors.len());
            if total > 3 {
                let _ = writeln!(o, "  ... and {} more", total - 3);
            }
            if stale {
                let _ = writeln!(
                    o,
                    "stale      serving the commit cached from an earlier run: the config repo \
                     could not be fetched"
                );
            }
            if let Some(e) = fetch_error {
                let _ = writeln!(o, "fetch      FAILED: {}", printable(e));
            }
            if fleet {
                let f = &v["fleet"];
                if f.is_null() {
                    let _ = writeln!(o, "fleet      none: the gateway has no [rate_limit_store]");
                } else if let Some(e) = f["error"].as_str() {
                    let _ = writeln!(o, "fleet      unknown: {}", printable(e));
                } else {
                    let replicas = f["replicas"].as_array().cloned().unwrap_or_default();
                    let shas = f["shas"].as_object().map_or(0, |m| m.len());
                    let _ = writeln!(
                        o,
                        "fleet      {} replica(s), {shas} commit(s): {}",
                        replicas.len(),
                        match agree {
                            Some(true) => "in agreement",
                            Some(false) => "NOT in agreement",
                            None => "agreement unknown",
                        }
                    );
                    for r in &replicas {
                        let stale = match (r["stale"].as_bool(), r["heartbeat_age_ms"].as_u64()) {
                            (Some(true), Some(ms)) => {
                                format!("  STALE (no heartbeat for {}s)", ms / 1000)
                            }
                            (Some(true), None) => "  STALE".to_owned(),
                            _ => String::new(),
                        };
                        let _ = writeln!(
                            o,
                            "  {:<30} applied {}  attempted {} {}  loaded {}{stale}",
                            str_of(&r["replica"]),
                            str_of(&r["applied"]),
                            str_of(&r["attempted"]),
                            if r["ok"].as_bool() == Some(true) {
                                "ok"
                            } else {
                                "FAILED"
                            },
                            str_of(&r["loaded_at"]),
                        );
                    }
                }
            }
        }
    }
    if let Err(code) = emit(&[(Stream::Stdout, &o)]) {
        return code;
    }
    match agree {
        // Cannot tell, like an admin listener that did not answer.
        None => ExitCode::from(2),
        Some(agree) if last_ok && agree && !stale && fetch_error.is_none() => ExitCode::SUCCESS,
        Some(_) => ExitCode::from(1),
    }
}

/// How a field of `/status` is checked.
type Check = fn(&Value) -> bool;
/// A field (JSON pointer), whether it must be there, its check, and what it should be.
type Field = (&'static str, bool, Check, &'static str);

/// What is wrong with a `/status` answer for `status` to judge it: each field its verdict
/// rests on (and each it prints) that is missing or of another type. Empty when readable.
fn unreadable(v: &Value, fleet: bool) -> Vec<String> {
    fn kind(v: &Value) -> &'static str {
        match v {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "a list",
            Value::Object(_) => "an object",
        }
    }
    let mut wrong = Vec::new();
    if !v.is_object() {
        wrong.push(format!("the answer is {}, not an object", kind(v)));
        return wrong;
    }
    let string_or_null: Check = |x| x.is_string() || x.is_null();
    let mut fields: Vec<Field> = vec![
        ("/version", true, Value::is_string, "a string"),
        ("/loaded_at", false, Value::is_string, "a string"),
        ("/replica", false, Value::is_string, "a string"),
        ("/attempted", true, Value::is_object, "an object"),
        ("/stale", true, Value::is_boolean, "true or false"),
        (
            "/last_fetch_error",
            true,
            string_or_null,
            "a string or null",
        ),
    ];
    if v["attempted"].is_object() {
        fields.extend([
            (
                "/attempted/ok",
                true,
                Value::is_boolean as Check,
                "true or false",
            ),
            ("/attempted/sha", false, string_or_null, "a string or null"),
            ("/attempted/errors", false, Value::is_array, "a list"),
            ("/attempted/errors_total", false, Value::is_u64, "a count"),
        ]);
    }
    if fleet {
        fields.push((
            "/fleet",
            true,
            |x| x.is_null() || x.is_object(),
            "an object or null",
        ));
    }
    // A view the store gave (not its `error`): the verdict rests on it.
    if fleet && v["fleet"].is_object() && v["fleet"]["error"].is_null() {
        fields.extend([
            (
                "/fleet/agree",
                true,
                Value::is_boolean as Check,
                "true or false",
            ),
            ("/fleet/replicas", true, Value::is_array, "a list"),
        ]);
    }
    for (field, required, accepted, what) in fields {
        let name = field.trim_start_matches('/').replace('/', ".");
        match v.pointer(field) {
            None if required => wrong.push(format!("`{name}` is missing")),
            Some(x) if !accepted(x) => wrong.push(format!("`{name}` is {}, not {what}", kind(x))),
            _ => {}
        }
    }
    wrong
}
