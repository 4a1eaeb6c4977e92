//! The config loader and compiler on arbitrary config repos, through the same entry point as
//! `rustygate validate` (`compile::compile_dir`).
//!
//! An input is a config repo in one text: lines `#>>> <repo-relative path>` start a file, and
//! whatever comes before the first one is `gateway.toml`. For example:
//!
//! ```text
//! [defaults]
//! timeout = "5s"
//! #>>> routes/a.toml
//! [[route]]
//! path = "/api"
//! upstream = "u"
//! #>>> upstreams/u.toml
//! [upstream.u]
//! targets = ["http://127.0.0.1:1"]
//! ```
//!
//! Paths are kept inside a scratch directory (no `..`, no absolute paths, at most 16 files), so
//! policy scripts and CA bundles the config names can be part of the input. Secrets are not
//! resolved (`validate --no-env`), so no environment variable or file outside the repo is read.
//!
//! Checked: compile never panics; a snapshot exists exactly when there is no error; every
//! diagnostic points into a file it read, at char boundaries; every rendering works; every
//! HMAC JWT provider a valid config builds verifies a token without panicking; every timeout
//! it holds can be added to `Instant::now()`.
#![no_main]

use std::path::{Component, Path, PathBuf};

use jsonwebtoken::Algorithm;
use libfuzzer_sys::fuzz_target;
use rustygate::compile::{CompileOptions, compile_dir};
use rustygate::filters::jwt::{JwtProvider, Keys};

const MAX_FILES: usize = 16;
const HEADER: &[u8] = b"#>>> ";

/// One scratch directory per process, emptied before each input.
fn scratch() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(
        || match tempfile::Builder::new().prefix("rg-fuzz-cfg").tempdir() {
            Ok(d) => d,
            Err(e) => panic!("no scratch directory: {e}"),
        },
    )
    .path()
}

/// A repo-relative path made safe to write under the scratch directory.
fn safe_path(name: &[u8]) -> Option<PathBuf> {
    let name = std::str::from_utf8(name).ok()?.trim();
    let rel = Path::new(name);
    let ok = !name.is_empty()
        && name.len() < 100
        && rel.components().count() <= 4
        && rel.components().all(|c| matches!(c, Component::Normal(_)));
    // Rebuilt from its components: `a/.` is `a`, and writing to `a/.` would fail.
    ok.then(|| rel.components().collect())
}

/// Splits an input into (path, contents) pairs.
fn files(data: &[u8]) -> Vec<(PathBuf, &[u8])> {
    let mut out = Vec::new();
    let mut name = PathBuf::from("gateway.toml");
    let mut start = 0;
    let mut line_start = 0;
    while line_start <= data.len() {
        let line_end = data[line_start..]
            .iter()
            .position(|&c| c == b'\n')
            .map_or(data.len(), |i| line_start + i);
        let line = &data[line_start..line_end];
        if let Some(next) = line.strip_prefix(HEADER).and_then(safe_path) {
            out.push((std::mem::replace(&mut name, next), &data[start..line_start]));
            start = (line_end + 1).min(data.len());
        }
        line_start = line_end + 1;
    }
    out.push((name, &data[start..]));
    out.truncate(MAX_FILES);
    out
}

fn write_repo(root: &Path, files: &[(PathBuf, &[u8])]) -> std::io::Result<()> {
    for entry in std::fs::read_dir(root)? {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    for (rel, text) in files {
        let path = root.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // A later file under a name already used as a directory (or the reverse) is dropped.
        if path.is_dir() {
            continue;
        }
        std::fs::write(&path, text)?;
    }
    Ok(())
}

/// Request handling adds configured durations to `Instant::now()`, which panics past the
/// platform's range: a config that compiles must not hold such a duration.
fn check_durations(what: &str, durations: impl Iterator<Item = std::time::Duration>) {
    let now = std::time::Instant::now();
    for d in durations {
        assert!(
            now.checked_add(d).is_some(),
            "{what}: a duration of {}s compiled, but `Instant::now() + it` panics",
            d.as_secs()
        );
    }
}

/// A provider the config compiled must survive a token it accepts: its settings (leeway,
/// algorithms, issuers, audiences) reach the verifier's arithmetic only here. Unresolved HMAC
/// secrets are empty, so the target can sign; other keys and JWKS URLs (no network) are skipped.
fn verify_with(provider: &JwtProvider) {
    let Keys::Static(keys) = &provider.keys else {
        return;
    };
    let v = &provider.validation;
    let hmac = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
    let Some(alg) = v.algorithms.iter().find(|a| hmac.contains(a)) else {
        return;
    };
    if keys.is_empty() {
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut claims = serde_json::json!({"exp": now + 60, "nbf": now, "iat": now, "sub": "fuzz"});
    if let Some(iss) = v.iss.as_ref().and_then(|i| i.iter().next()) {
        claims["iss"] = iss.clone().into();
    }
    if let Some(aud) = v.aud.as_ref().and_then(|a| a.iter().next()) {
        claims["aud"] = aud.clone().into();
    }
    let Ok(token) = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(*alg),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b""),
    ) else {
        return;
    };
    RT.with(|rt| {
        let _ = rt.block_on(provider.verify(&token));
    });
}

thread_local! {
    static RT: tokio::runtime::Runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        Err(e) => panic!("no runtime: {e}"),
    };
}

fuzz_target!(|data: &[u8]| {
    let root = scratch();
    let files = files(data);
    if write_repo(root, &files).is_err() {
        // Names that clash (a file where another needs a directory): not the compiler's input.
        return;
    }
    let opts = CompileOptions {
        resolve_secrets: false,
        version_id: None,
        source: "fuzz".into(),
        ..CompileOptions::default()
    };
    // `Err` is an unreadable directory or a file that is not UTF-8: a clean refusal.
    let Ok(compiled) = compile_dir(root, &opts) else {
        return;
    };
    let errors = compiled.diagnostics.has_errors();
    assert_eq!(
        compiled.snapshot.is_some(),
        !errors,
        "a snapshot must exist exactly when there is no error"
    );
    for d in compiled.diagnostics.iter() {
        for label in d.primary.iter().chain(d.secondary.iter()) {
            assert!(
                label.file < compiled.files.len(),
                "[{}] {}: label in file #{} of {}",
                d.code,
                d.message,
                label.file,
                compiled.files.len()
            );
            let source = compiled.files.source(label.file);
            let span = &label.span;
            assert!(
                span.start <= span.end
                    && span.end <= source.len()
                    && source.is_char_boundary(span.start)
                    && source.is_char_boundary(span.end),
                "[{}] {}: span {span:?} outside {} ({} bytes)",
                d.code,
                d.message,
                compiled.files.name(label.file),
                source.len()
            );
        }
    }
    let _ = compiled.diagnostics.render_human(&compiled.files);
    let _ = compiled.diagnostics.render_short(&compiled.files);
    let _ = compiled.diagnostics.to_json(&compiled.files);
    if let Some(snapshot) = compiled.snapshot {
        for path in ["/", "/api", "/api/x/y", "/orders/1"] {
            if let Some(m) = snapshot.router.lookup("a.example", "GET", path) {
                assert!(m.route < snapshot.routes.len(), "route id out of range");
            }
        }
        for route in &snapshot.routes {
            let durations = [
                Some(route.timeout),
                route.connect_timeout,
                route.total_timeout,
            ];
            check_durations(&route.name, durations.into_iter().flatten());
            if let Some(auth) = &route.auth {
                verify_with(&auth.provider);
            }
        }
        for u in &snapshot.upstreams {
            let durations = [
                Some(u.connect_timeout),
                u.timeout,
                u.total_timeout,
                Some(u.idle_timeout),
            ];
            check_durations(&u.name, durations.into_iter().flatten());
        }
    }
});
