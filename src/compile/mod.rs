//! The one compiler: raw config → [`Snapshot`], collecting every diagnostic on the way.
//!
//! ```text
//! config repo dir
//!   └─ config::load_dir ───────► RawConfig     (TOML parsed, spans kept, schema errors collected)
//!        └─ compile::compile ──► Snapshot      (names resolved, units parsed, secrets read,
//!                                               router built, conflicts found) + Diagnostics
//!             └─ SnapshotStore::publish        (served; never mutated again)
//! ```
//!
//! `rustygate validate`, `rustygate test`, `rustygate plan` and `rustygate serve` all call
//! [`compile`]: there is no second checker that could drift from what the server accepts.

mod auth;
mod edge;
mod gateway;
mod listeners;
mod plugins;
mod policies;
mod routes;
mod secrets;
mod store;
mod tls;
mod trace_config;
mod upstreams;

/// Route and upstream names are plain: the access log writes them without escaping, and its
/// tests check that against this rule.
#[cfg(test)]
pub(crate) use upstreams::valid_name;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::config::files::{FileError, FileKind, read_in_repo};
use crate::config::{
    Diagnostic, Diagnostics, FileId, LoadError, RawConfig, SourceFiles, Spanned, Unloaded, load_dir,
};
use crate::snapshot::{ConfigVersion, Snapshot};
use crate::upstream::Upstream;

/// Defaults used when neither the route, its upstream nor `gateway.toml` sets a value.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_BODY_SIZE: u64 = 10 * 1024 * 1024;
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a WebSocket tunnel may be silent both ways before it is closed.
pub const DEFAULT_WEBSOCKET_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// The longest duration a config may give: added to the clock at request time, a longer one
/// could overflow it (`Instant + d` panics) — and no timeout, interval or leeway needs more.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Knobs that change what compile checks, not what the config means.
#[derive(Debug, Clone, Default)]
pub struct CompileOptions {
    /// Resolve secret references (env vars, files). `validate --no-env` turns this off.
    pub resolve_secrets: bool,
    /// The version id to stamp (a commit SHA); a content hash when `None`.
    pub version_id: Option<String>,
    /// Where the config came from, for `/status` and logs.
    pub source: String,
    /// Directories `{ file = ... }` secrets may be read from, besides
    /// [`crate::config::files::DEFAULT_SECRET_ROOTS`] (`--secret-root`).
    pub secret_roots: Vec<std::path::PathBuf>,
}

/// What compiling produced: a snapshot when there were no errors, and every diagnostic.
pub struct Compiled {
    pub snapshot: Option<Snapshot>,
    pub diagnostics: Diagnostics,
    pub files: SourceFiles,
    /// A hash of everything the compile read: every file (TOML, policies, certificates) and
    /// the resolved secret values. Equal inputs, equal id; any edit, a new id.
    pub inputs_id: String,
}

/// Loads and compiles a config directory.
pub fn compile_dir(dir: &Path, opts: &CompileOptions) -> Result<Compiled, LoadError> {
    let raw = load_dir(dir)?;
    Ok(compile(raw, opts))
}

/// Compiles raw config into a snapshot. All checks run, whatever failed before them.
pub fn compile(mut raw: RawConfig, opts: &CompileOptions) -> Compiled {
    let mut cx = Cx {
        diags: std::mem::take(&mut raw.diagnostics),
        opts,
        root: &raw.root,
        unloaded: &raw.unloaded,
        files: std::mem::take(&mut raw.files),
        policies: policies::Policies::new(Default::default()),
        plugins: plugins::Plugins::default(),
        secrets: Sha256::new(),
    };
    let defaults = gateway::compile_defaults(&mut cx, raw.gateway.as_ref());
    cx.policies = policies::Policies::new(policies::limits(&mut cx, raw.gateway.as_ref()));
    let upstreams = upstreams::compile_upstreams(&mut cx, &raw.upstreams, &defaults);
    let edge = edge::compile_edge_defaults(&mut cx, raw.gateway.as_ref());
    let edge_store = edge.store.spec.clone();
    let providers = auth::compile_providers(&mut cx, raw.gateway.as_ref());
    plugins::compile_plugins(&mut cx, raw.gateway.as_ref());
    let mut routes = routes::compile_routes(
        &mut cx,
        std::mem::take(&mut raw.routes),
        &upstreams,
        &defaults,
        &edge,
        &providers,
    );
    // Almost always an accident (a merge that dropped `routes/`, a moved directory, a wrong
    // `--subdir`): served, every request would be a 404. Only when nothing failed to load, or
    // the routes may simply be in a file that did not parse.
    if routes.routes.is_empty() && !cx.diags.has_errors() {
        cx.push(
            Diagnostic::warning(
                "no-routes",
                "the config has no routes: served, it would answer every request 404",
            )
            .help(
                "routes are `[[route]]` tables in routes/*.toml; if the config moved, check \
                 --repo and --subdir",
            )
            .help(
                "a running gateway does not swap a config with routes for one without, unless \
                 the reload is forced (POST /admin/reload?force=true)",
            ),
        );
    }
    let mut used = routes.used_upstreams;
    used.extend(cx.policies.used_upstreams.iter().cloned());
    upstreams::warn_unused(&mut cx, &raw.upstreams, &used);
    plugins::warn_unused(&mut cx);
    let listeners = listeners::compile_listeners(&mut cx, raw.gateway.as_ref());
    // A listener with `client_auth` that did not compile (or a gateway.toml that did not load)
    // has its own error already: "no listener verifies one" would contradict the file.
    let client_auth_declared = cx.unloaded.gateway
        || raw.gateway.as_ref().is_some_and(|(_, g)| {
            g.listener
                .iter()
                .any(|l| l.tls.as_ref().is_some_and(|t| t.client_auth.is_some()))
        });
    if !client_auth_declared
        && !listeners
            .iter()
            .any(|l| l.tls.as_ref().is_some_and(|t| t.client_auth))
    {
        for (file, span) in &routes.client_cert_required {
            cx.push(
                Diagnostic::error(
                    "no-client-auth",
                    "the route requires a client certificate, but no listener verifies one",
                )
                .at(*file, span.clone(), "no listener has `client_auth`")
                .help("add `client_auth = { ca = { file = \"...\" } }` to a TLS listener's `tls` in gateway.toml"),
            );
        }
    }
    let tracing = trace_config::compile_tracing(&mut cx, raw.gateway.as_ref(), &routes.routes);

    let Cx {
        diags: diagnostics,
        files,
        secrets,
        ..
    } = cx;
    let inputs_id = inputs_hash(&files, secrets);
    let id = opts.version_id.clone().unwrap_or_else(|| inputs_id.clone());
    let version: Arc<str> = Arc::from(id.as_str());
    for r in &mut routes.routes {
        // Made by `routes::compile` just before, shared with nothing yet.
        if let Some(record) = Arc::get_mut(&mut r.record) {
            record.version = Arc::clone(&version);
        }
    }
    let snapshot = (!diagnostics.has_errors()).then(|| Snapshot {
        version: ConfigVersion {
            id,
            source: opts.source.clone(),
            loaded_at: SystemTime::now(),
            commit: None,
            reference: None,
        },
        router: routes.router,
        routes: routes.routes,
        upstreams: upstreams.into_values().map(|(_, u)| u).collect(),
        client_ip: defaults.client_ip,
        limits: defaults.limits,
        allow_underscores: defaults.allow_underscores,
        paths: defaults.paths,
        listeners,
        tracing,
        rate_limit_store: edge_store,
        warnings: diagnostics.warning_count(),
        live: crate::snapshot::Live::new(),
    });
    Compiled {
        snapshot,
        diagnostics,
        files,
        inputs_id,
    }
}

/// Shared compile state.
pub(crate) struct Cx<'a> {
    pub diags: Diagnostics,
    pub opts: &'a CompileOptions,
    pub root: &'a Path,
    /// Names from tables that failed to load: their error is reported, not its knock-on effects.
    pub unloaded: &'a Unloaded,
    /// Every file read, the TOML files and the policy scripts compile reads.
    pub files: SourceFiles,
    pub policies: policies::Policies,
    pub plugins: plugins::Plugins,
    /// The resolved secret values, hashed (never kept): part of [`Compiled::inputs_id`].
    pub secrets: Sha256,
}

impl Cx<'_> {
    pub fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    /// Parses a duration field, reporting a located error.
    pub fn duration(
        &mut self,
        file: FileId,
        v: &Spanned<crate::config::raw::DurationText>,
    ) -> Option<Duration> {
        match crate::config::units::parse_duration(&v.0) {
            Ok(d) if d > MAX_DURATION => {
                self.push(
                    Diagnostic::error(
                        "invalid-duration",
                        "a duration longer than 365 days is not allowed",
                    )
                    .at(file, v.span(), "too long")
                    .help("timeouts, intervals and leeways this long would overflow the clock"),
                );
                None
            }
            Ok(d) if d.is_zero() => {
                self.push(
                    Diagnostic::error("invalid-duration", "a duration of zero is not allowed").at(
                        file,
                        v.span(),
                        "zero",
                    ),
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.push(Diagnostic::error("invalid-duration", e).at(
                    file,
                    v.span(),
                    "not a duration",
                ));
                None
            }
        }
    }

    /// Reads a file the config names by a path relative to the repo root (a policy script, a
    /// CA bundle) through [`crate::config::files`]: inside the repo after symlinks, a regular
    /// file, within `kind`'s size cap. Anything else is a located error at the path in the
    /// config; nothing of a file outside the repo is read. `what` names the kind of file in
    /// messages, `example` is a path to suggest.
    pub fn read_repo_file(
        &mut self,
        file: FileId,
        p: &Spanned<String>,
        kind: FileKind,
        what: &str,
        example: &str,
    ) -> Option<String> {
        match read_in_repo(self.root, Path::new(p.get()), kind) {
            Ok(s) => Some(s),
            Err(e) => {
                let help = match e {
                    FileError::NotFound
                    | FileError::Absolute
                    | FileError::ParentDir
                    | FileError::OutsideRepo => format!(
                        "paths are relative to the config repo root and stay inside it, e.g. \"{example}\""
                    ),
                    _ => "a file the config names is a regular file inside the config repo"
                        .to_owned(),
                };
                self.push(
                    Diagnostic::error(e.code(), format!("{what} file `{}` {e}", p.get()))
                        .at(file, p.span(), e.label())
                        .help(help),
                );
                None
            }
        }
    }

    /// Parses a size field, reporting a located error.
    pub fn size(&mut self, file: FileId, v: &Spanned<crate::config::raw::SizeText>) -> Option<u64> {
        match crate::config::units::parse_size(&v.0) {
            Ok(n) => Some(n),
            Err(e) => {
                self.push(Diagnostic::error("invalid-size", e).at(file, v.span(), "not a size"));
                None
            }
        }
    }
}

/// Compiled upstreams by name, with where each was defined.
pub(crate) type UpstreamTable = HashMap<String, ((FileId, std::ops::Range<usize>), Arc<Upstream>)>;

/// [`Compiled::inputs_id`]: the files' names and contents, then the secrets' digest.
fn inputs_hash(files: &SourceFiles, secrets: Sha256) -> String {
    let mut h = Sha256::new();
    for id in 0..files.len() {
        h.update(files.name(id).as_bytes());
        h.update([0]);
        h.update(files.source(id).as_bytes());
        h.update([0]);
    }
    h.update(secrets.finalize());
    format!("sha256:{}", &hex::encode(h.finalize())[..12])
}

/// The closest candidate to `name`, if it is close enough to be a likely typo.
pub(crate) fn did_you_mean<'a>(
    name: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .map(|c| (strsim::jaro_winkler(name, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}
