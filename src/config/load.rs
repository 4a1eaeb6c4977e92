//! Reading a config repo directory into raw config, with a diagnostic for every file that does
//! not parse and every table that does not fit the schema. Nothing here checks meaning.

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::diag::{Diagnostic, Diagnostics, FileId, SourceFiles};
use super::files::{FileError, FileKind, read_in_repo, read_toml_dir};
use super::raw::{GatewayFile, RawRoute, RawUpstream};
use super::spanned::Spanned;

/// Everything read from a config repo, before compilation.
#[derive(Default)]
pub struct RawConfig {
    /// The repo root on disk (policy paths are relative to it).
    pub root: PathBuf,
    pub files: SourceFiles,
    pub gateway: Option<(FileId, GatewayFile)>,
    /// The routes of each routes file that loaded, in file order. Kept per file so that the
    /// compiler can free each file's routes once it has compiled them.
    pub routes: Vec<(FileId, Vec<RawRoute>)>,
    /// Upstreams with the span of their name key.
    pub upstreams: Vec<(FileId, Spanned<String>, RawUpstream)>,
    /// Names from tables that did not load, so compile can skip knock-on diagnostics.
    pub unloaded: Unloaded,
    pub diagnostics: Diagnostics,
}

/// Names seen in tables that failed to load (a syntax error in their file, or a table that does
/// not fit the schema). That failure is already an error; these let the compiler avoid piling
/// misleading ones on top: "unknown upstream `orders`" when `[upstream.orders]` has a typo, or
/// "upstream `orders` is not used" when the route using it has one.
#[derive(Debug, Default)]
pub struct Unloaded {
    /// Upstreams that are defined but did not load.
    pub upstreams: HashSet<String>,
    /// Upstreams named by routes that did not load.
    pub route_upstreams: HashSet<String>,
    /// gateway.toml is there but did not load: what it declares (listeners among them) is
    /// unknown.
    pub gateway: bool,
    /// `[plugin.<name>]`, `[auth.<name>]` and `[cors.<name>]` of a gateway.toml that did not
    /// load: a route naming one gets no "unknown plugin" (auth provider, CORS preset) on top.
    pub plugins: HashSet<String>,
    pub auth: HashSet<String>,
    pub cors: HashSet<String>,
}

impl Unloaded {
    /// Records the names a gateway.toml that did not load declares.
    fn gateway_names(&mut self, table: &DeTable<'_>) {
        self.gateway = true;
        for (key, names) in [
            ("plugin", &mut self.plugins),
            ("auth", &mut self.auth),
            ("cors", &mut self.cors),
        ] {
            if let Some(DeValue::Table(entries)) = table.get(key).map(|v| v.get_ref()) {
                names.extend(entries.keys().map(|k| k.get_ref().to_string()));
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("config directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
}

/// Reads `gateway.toml`, `routes/*.toml` and `upstreams/*.toml` under `root`, in name order.
/// Only a root that is not a readable directory is an `Err`; every problem inside it (a file that
/// leads out of the repo, is not a regular file, is too large or does not parse) is a diagnostic.
/// Files are read through [`super::files`], the one reader for everything a config names.
pub fn load_dir(root: &Path) -> Result<RawConfig, LoadError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LoadError::Io { path, source }
    };
    let meta = std::fs::metadata(root).map_err(io(root))?;
    if !meta.is_dir() {
        return Err(LoadError::NotADirectory(root.to_path_buf()));
    }
    // Every path check compares against the resolved root, so a repo reached through a symlink
    // (`/etc/rustygate/config -> /srv/config`) works, and a link inside it cannot lead out.
    let root = std::fs::canonicalize(root).map_err(io(root))?;
    let mut cfg = RawConfig {
        root: root.clone(),
        ..RawConfig::default()
    };

    let gateway = read_in_repo(&root, Path::new("gateway.toml"), FileKind::Config);
    match gateway {
        Err(FileError::NotFound) => {}
        text => {
            if let Some(id) = add_file(&mut cfg.files, &mut cfg.diagnostics, "gateway.toml", text) {
                load_gateway(&mut cfg, id);
            }
        }
    }
    for (dir, kind) in [("routes", Kind::Routes), ("upstreams", Kind::Upstreams)] {
        for f in read_toml_dir(&root, dir) {
            let Some(id) = add_file(&mut cfg.files, &mut cfg.diagnostics, &f.name, f.text) else {
                continue;
            };
            match kind {
                Kind::Routes => load_routes(&mut cfg, id),
                Kind::Upstreams => load_upstreams(&mut cfg, id),
            }
        }
    }
    Ok(cfg)
}

/// Adds a file that was read to `files`; for one that was refused, adds an empty entry under its
/// name and reports the refusal there (`routes/a.toml:1:1`), so the diagnostic is located
/// without showing a byte of what the path leads to. A file that is not UTF-8 is reported at its
/// first invalid byte: the entry is blank lines up to it.
pub(crate) fn add_file(
    files: &mut SourceFiles,
    diags: &mut Diagnostics,
    name: &str,
    text: Result<String, FileError>,
) -> Option<FileId> {
    match text {
        Ok(text) => Some(files.add(name, text)),
        Err(e) => {
            let blank = match e {
                FileError::NotUtf8 { line, column } => {
                    "\n".repeat(line - 1) + " ".repeat(column - 1).as_str()
                }
                _ => String::new(),
            };
            let at = blank.len();
            let id = files.add(name, blank);
            diags.push(
                Diagnostic::error(e.code(), format!("`{name}` {e}"))
                    .at(id, at..at, e.label())
                    .help(e.help()),
            );
            None
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Routes,
    Upstreams,
}

/// Parses a file, reporting every syntax error in file order. `Err` holds what the parser
/// recovered when the file has any: good enough to learn names from, not to load.
fn parse<'a>(
    files: &'a SourceFiles,
    id: FileId,
    diags: &mut Diagnostics,
) -> Result<toml::Spanned<DeTable<'a>>, toml::Spanned<DeTable<'a>>> {
    let (table, mut errors) = DeTable::parse_recoverable(files.source(id));
    if errors.is_empty() {
        return Ok(table);
    }
    errors.sort_by_key(|e| e.span().map(|s| (s.start, s.end)));
    for e in errors {
        let span = e.span().unwrap_or(0..0);
        diags.push(
            Diagnostic::error(
                "toml-syntax",
                format!("invalid TOML: {}", e.message().trim()),
            )
            .at(id, span, "here"),
        );
    }
    Err(table)
}

/// Deserialises one TOML value into `T`, turning a serde error into a located diagnostic about
/// `what()` (called only then: a file of thousands of routes should not format a name for each).
fn decode<T: for<'de> Deserialize<'de>>(
    value: toml::Spanned<DeValue<'_>>,
    id: FileId,
    what: impl FnOnce() -> String,
    diags: &mut Diagnostics,
) -> Option<T> {
    let whole = value.span();
    match T::deserialize(ValueDeserializer::from(value)) {
        Ok(v) => Some(v),
        Err(e) => {
            diags.push(serde_diagnostic(&e, id, whole, &what()));
            None
        }
    }
}

/// Classifies a deserialisation error by its message: serde gives no structured kind.
pub(crate) fn serde_diagnostic(
    e: &toml::de::Error,
    id: FileId,
    whole: std::ops::Range<usize>,
    what: &str,
) -> Diagnostic {
    let msg = e.message().trim();
    let (code, label) = if msg.starts_with("unknown field") {
        ("unknown-key", "unknown key")
    } else if msg.starts_with("invalid type") {
        ("wrong-type", "wrong type")
    } else if msg.starts_with("missing field") {
        ("missing-key", "required key missing")
    } else {
        ("invalid-value", "invalid value")
    };
    Diagnostic::error(code, format!("{msg} in {what}")).at(id, e.span().unwrap_or(whole), label)
}

fn load_gateway(cfg: &mut RawConfig, id: FileId) {
    let table = match parse(&cfg.files, id, &mut cfg.diagnostics) {
        Ok(t) => t,
        Err(partial) => {
            cfg.unloaded.gateway_names(partial.get_ref());
            return;
        }
    };
    // Read before the table is consumed: should it not decode, what it declares is unknown.
    let mut declared = Unloaded::default();
    declared.gateway_names(table.get_ref());
    let span = table.span();
    let value = toml::Spanned::new(span, DeValue::Table(table.into_inner()));
    match decode::<GatewayFile>(value, id, || "gateway.toml".into(), &mut cfg.diagnostics) {
        Some(g) => cfg.gateway = Some((id, g)),
        None => {
            cfg.unloaded.gateway = true;
            cfg.unloaded.plugins = declared.plugins;
            cfg.unloaded.auth = declared.auth;
            cfg.unloaded.cors = declared.cors;
        }
    }
}

fn load_routes(cfg: &mut RawConfig, id: FileId) {
    let table = match parse(&cfg.files, id, &mut cfg.diagnostics) {
        Ok(t) => t,
        Err(partial) => {
            let items = partial.get_ref().get("route").map(|v| v.get_ref());
            if let Some(DeValue::Array(items)) = items {
                let names = items.iter().filter_map(|i| str_key(i, "upstream"));
                cfg.unloaded
                    .route_upstreams
                    .extend(names.map(Cow::into_owned));
            }
            return;
        }
    };
    let mut routes = Vec::new();
    for (key, value) in table.into_inner() {
        if key.get_ref().as_ref() != "route" {
            cfg.diagnostics.push(
                Diagnostic::error(
                    "unknown-key",
                    format!("unknown key `{}` in a routes file", key.get_ref()),
                )
                .at(id, key.span(), "unknown key")
                .help("a routes file holds only `[[route]]` tables"),
            );
            continue;
        }
        let span = value.span();
        let DeValue::Array(items) = value.into_inner() else {
            cfg.diagnostics.push(
                Diagnostic::error("wrong-type", "`route` must be an array of tables")
                    .at(id, span, "not an array")
                    .help("write each route as `[[route]]`"),
            );
            continue;
        };
        routes.reserve(items.len());
        for item in items {
            // Borrowed from the file's text (owned only when written with escapes), so reading
            // them costs nothing unless the route fails to load.
            let name = str_key(&item, "name");
            let upstream = str_key(&item, "upstream");
            let what = || match name {
                Some(n) => format!("route `{n}`"),
                None => "a route".into(),
            };
            match decode::<RawRoute>(item, id, what, &mut cfg.diagnostics) {
                Some(r) => routes.push(r),
                None => cfg
                    .unloaded
                    .route_upstreams
                    .extend(upstream.map(Cow::into_owned)),
            }
        }
    }
    if !routes.is_empty() {
        cfg.routes.push((id, routes));
    }
}

/// A string value of a table, read before (or without) deserialising the table.
fn str_key<'i>(item: &toml::Spanned<DeValue<'i>>, key: &str) -> Option<Cow<'i, str>> {
    match item.get_ref().as_table()?.get(key)?.get_ref() {
        DeValue::String(s) => Some(s.clone()),
        _ => None,
    }
}

fn load_upstreams(cfg: &mut RawConfig, id: FileId) {
    let table = match parse(&cfg.files, id, &mut cfg.diagnostics) {
        Ok(t) => t,
        Err(partial) => {
            if let Some(DeValue::Table(entries)) =
                partial.get_ref().get("upstream").map(|v| v.get_ref())
            {
                let names = entries.keys().map(|k| k.get_ref().to_string());
                cfg.unloaded.upstreams.extend(names);
            }
            return;
        }
    };
    for (key, value) in table.into_inner() {
        if key.get_ref().as_ref() != "upstream" {
            cfg.diagnostics.push(
                Diagnostic::error(
                    "unknown-key",
                    format!("unknown key `{}` in an upstreams file", key.get_ref()),
                )
                .at(id, key.span(), "unknown key")
                .help("an upstreams file holds only `[upstream.<name>]` tables"),
            );
            continue;
        }
        let span = value.span();
        let DeValue::Table(entries) = value.into_inner() else {
            cfg.diagnostics.push(
                Diagnostic::error(
                    "wrong-type",
                    "`upstream` must be a table of named upstreams",
                )
                .at(id, span, "not a table")
                .help("write each upstream as `[upstream.<name>]`"),
            );
            continue;
        };
        for (name, body) in entries {
            let name = Spanned::new(name.get_ref().to_string(), name.span());
            let what = || format!("upstream `{}`", name.get());
            match decode::<RawUpstream>(body, id, what, &mut cfg.diagnostics) {
                Some(u) => cfg.upstreams.push((id, name, u)),
                None => {
                    cfg.unloaded.upstreams.insert(name.into_inner());
                }
            }
        }
    }
}
