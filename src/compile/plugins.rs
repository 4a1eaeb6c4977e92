//! `[plugin.<name>]` and `plugins = [...]`: each `.wasm` file read from the repo, checked
//! against its pinned sha256, compiled once (or taken from the cache when its bytes did not
//! change since the last snapshot), and each (plugin, config) pair started once so that a
//! plugin refusing its configuration is a `validate` error, not a 500 at the first request.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::{Cx, did_you_mean};
use crate::config::files::{FileError, FileKind, read_bytes_in_repo};
use crate::config::raw::{GatewayFile, RawOnError, RawPlugin, RawPluginUse};
use crate::config::{Diagnostic, FileId, Spanned};
use crate::plugins::{self, Limits, OnError, Plugin, PluginUse, RoutePlugins};

/// Plugins for one compile.
#[derive(Default)]
pub(crate) struct Plugins {
    /// By name; `None` when the plugin failed (reported once, not at every use).
    declared: HashMap<String, Option<Arc<Plugin>>>,
    /// (plugin, configuration) pairs already started: routes giving the same plugin the same
    /// configuration share one instance per worker.
    uses: HashMap<(String, Vec<u8>), Option<Arc<PluginUse>>>,
    /// The gateway's `plugins`, run on every route first.
    global: Vec<Arc<PluginUse>>,
    used: HashSet<String>,
    /// Where each plugin is declared, for the unused warning.
    spans: BTreeMap<String, (FileId, std::ops::Range<usize>)>,
}

/// Reads and compiles every `[plugin.<name>]`, then the gateway's `plugins`.
pub(crate) fn compile_plugins(cx: &mut Cx<'_>, gateway: Option<&(FileId, GatewayFile)>) {
    let Some((file, g)) = gateway else {
        return;
    };
    for (name, raw) in &g.plugin {
        let plugin = load(cx, *file, name, raw);
        cx.plugins
            .declared
            .insert(name.clone(), plugin.map(Arc::new));
        cx.plugins.spans.insert(name.clone(), (*file, raw.span()));
    }
    let global: Vec<_> = g
        .plugins
        .iter()
        .filter_map(|u| resolve(cx, *file, u))
        .collect();
    cx.plugins.global = global;
}

/// The plugins a route runs: the gateway's, then its own.
pub(crate) fn route_plugins(
    cx: &mut Cx<'_>,
    file: FileId,
    uses: Option<&Vec<Spanned<RawPluginUse>>>,
) -> RoutePlugins {
    let mut out = cx.plugins.global.clone();
    for u in uses.into_iter().flatten() {
        if let Some(p) = resolve(cx, file, u) {
            out.push(p);
        }
    }
    Arc::from(out)
}

/// Warns about declared plugins no route runs.
pub(crate) fn warn_unused(cx: &mut Cx<'_>) {
    let unused: Vec<_> = cx
        .plugins
        .spans
        .iter()
        .filter(|(n, _)| !cx.plugins.used.contains(*n))
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect();
    for (name, (file, span)) in unused {
        cx.push(
            Diagnostic::warning("unused-plugin", format!("plugin `{name}` is not used"))
                .at(file, span, "declared here")
                .help("add it to a route's `plugins`, or to `plugins` in gateway.toml"),
        );
    }
}

fn load(cx: &mut Cx<'_>, file: FileId, name: &str, raw: &Spanned<RawPlugin>) -> Option<Plugin> {
    let errors_before = cx.diags.error_count();
    let pinned = raw.sha256.trim().to_ascii_lowercase();
    if pinned.len() != 64 || !pinned.bytes().all(|b| b.is_ascii_hexdigit()) {
        cx.push(
            Diagnostic::error(
                "invalid-sha256",
                format!("`sha256` of plugin `{name}` is not 64 hex digits"),
            )
            .at(file, raw.sha256.span(), "not a sha256")
            .help("pin the file's digest: `sha256sum plugins/<name>.wasm`"),
        );
    }
    let limits = limits(cx, file, raw);
    let on_error = match raw.on_error {
        RawOnError::FailClosed => OnError::FailClosed,
        RawOnError::FailOpen => OnError::FailOpen,
    };
    let bytes = read(cx, file, &raw.file)?;
    let actual = hex::encode(Sha256::digest(&bytes));
    // The module is not a source file: its digest joins the compile's inputs id (with the
    // secrets' digests), so that a reload notices a changed module even under an unchanged pin.
    cx.secrets.update(b"plugin\0");
    cx.secrets.update(actual.as_bytes());
    if cx.diags.error_count() > errors_before {
        return None;
    }
    if actual != pinned {
        cx.push(
            Diagnostic::error(
                "plugin-sha256-mismatch",
                format!(
                    "plugin file `{}` has sha256 {actual}, not the pinned {pinned}",
                    raw.file.get()
                ),
            )
            .at(file, raw.sha256.span(), "pinned here")
            .also(file, raw.file.span(), "this file")
            .help("if the new file is the one you want, pin its sha256"),
        );
        return None;
    }
    match Plugin::compile(name, raw.file.get(), &bytes, &actual, on_error, limits) {
        Ok(p) => Some(p),
        Err(e) => {
            cx.push(
                Diagnostic::error(
                    "invalid-plugin",
                    format!("plugin `{name}` (`{}`) {e}", raw.file.get()),
                )
                .at(file, raw.file.span(), "this module")
                .help(
                    "plugins are proxy-wasm modules; docs/plugins.md lists what RustyGate provides",
                ),
            );
            None
        }
    }
}

fn read(cx: &mut Cx<'_>, file: FileId, p: &Spanned<String>) -> Option<Vec<u8>> {
    match read_bytes_in_repo(cx.root, Path::new(p.get()), FileKind::Plugin) {
        Ok(b) => Some(b),
        Err(e) => {
            let help = match e {
                FileError::NotFound
                | FileError::Absolute
                | FileError::ParentDir
                | FileError::OutsideRepo => {
                    "paths are relative to the config repo root and stay inside it, e.g. \"plugins/tag.wasm\""
                }
                _ => "a file the config names is a regular file inside the config repo",
            };
            cx.push(
                Diagnostic::error(e.code(), format!("plugin file `{}` {e}", p.get()))
                    .at(file, p.span(), e.label())
                    .help(help),
            );
            None
        }
    }
}

fn limits(cx: &mut Cx<'_>, file: FileId, raw: &RawPlugin) -> Limits {
    let mut out = Limits::default();
    if let Some(v) = &raw.max_instructions {
        if *v.get() == 0 {
            cx.push(
                Diagnostic::error("invalid-value", "`max_instructions` must be at least 1")
                    .at(file, v.span(), "zero")
                    .help("plugins always run bounded"),
            );
        } else {
            out.max_instructions = *v.get();
        }
    }
    if let Some(v) = &raw.max_memory
        && let Some(n) = cx.size(file, v)
    {
        if !(plugins::PAGE..=4 * 1024 * 1024 * 1024).contains(&n) {
            cx.push(
                Diagnostic::error(
                    "invalid-value",
                    "`max_memory` must be between 64KiB (one WebAssembly page) and 4GiB",
                )
                .at(file, v.span(), "out of range"),
            );
        } else {
            out.max_memory = n / plugins::PAGE * plugins::PAGE;
        }
    }
    out
}

/// A plugin use: the declared plugin with its configuration, started once per distinct pair.
fn resolve(cx: &mut Cx<'_>, file: FileId, u: &Spanned<RawPluginUse>) -> Option<Arc<PluginUse>> {
    let name = u.name.get();
    cx.plugins.used.insert(name.clone());
    let plugin = match cx.plugins.declared.get(name) {
        Some(p) => p.clone()?,
        // Declared in a gateway.toml that did not load: that error is reported already.
        None if cx.unloaded.plugins.contains(name) => return None,
        None => {
            let mut d = Diagnostic::error("unknown-plugin", format!("unknown plugin `{name}`"))
                .at(file, u.name.span(), "no `[plugin.<name>]` with this name")
                .help("declare it in gateway.toml: `[plugin.NAME] file = \"plugins/NAME.wasm\"`, `sha256 = \"...\"`");
            if let Some(s) = did_you_mean(name, cx.plugins.declared.keys().map(String::as_str)) {
                d = d.help(format!("did you mean `{s}`?"));
            }
            cx.push(d);
            return None;
        }
    };
    let config: Vec<u8> = match u.config.as_ref().map(|c| c.get()) {
        None => Vec::new(),
        Some(serde_json::Value::String(s)) => s.as_bytes().to_vec(),
        Some(v) => v.to_string().into_bytes(),
    };
    let key = (name.clone(), config);
    if let Some(done) = cx.plugins.uses.get(&key) {
        return done.clone();
    }
    let made = Arc::new(PluginUse {
        plugin,
        config: bytes::Bytes::from(key.1.clone()),
    });
    let checked = match made.check() {
        Ok(()) => Some(made),
        Err(e) => {
            let span = u.config.as_ref().map_or(u.span(), |c| c.span());
            cx.push(
                Diagnostic::error(
                    "plugin-start-failed",
                    format!("plugin `{name}` failed to start with this configuration: {e}"),
                )
                .at(file, span, "configured here"),
            );
            None
        }
    };
    cx.plugins.uses.insert(key, checked.clone());
    checked
}
