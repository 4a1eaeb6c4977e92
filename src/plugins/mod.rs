//! WASM plugins speaking the proxy-wasm ABI (a v0.2.1 subset, docs/plugins.md), run by wasmer.
//!
//! ```text
//! plugins/*.wasm ─► sha256 checked ─► engine::compile (Cranelift + metering, memory cap,
//!                   imports checked; cached by sha256) ─► Plugin ─► PluginUse (plugin + config)
//! request:  filters ─► on_request: each plugin's on_request_headers, in order ─► Rhai policy
//!           body: PluginRun::request_body ─► BodyFilter (on_request_body, per chunk, in order)
//! response: Rhai on_response ─► PluginRun::on_response: on_response_headers, in reverse order
//!           body: PluginRun::into_response_body ─► BodyFilter (on_response_body, reverse order)
//! end:      PluginRun dropped (with the response body, when a plugin reads it)
//!           ─► on_log, on_done, on_delete
//! ```
//!
//! Whether a plugin exports a body callback is read once, when it is compiled: a route whose
//! plugins do not read bodies streams them exactly as a route without plugins.
//!
//! Every call into a plugin gets a fresh instruction budget (`max_instructions`); its memory
//! cannot grow past `max_memory`. Instances live per worker thread, one per plugin use, and
//! are dropped after any failure, so the next request gets a fresh one. A failing plugin
//! answers 500 (`fail_closed`, the default) or is skipped (`fail_open`); both are logged and
//! counted in `rustygate_plugin_errors_total{plugin,reason}`.
//!
//! This module owns the plugin lifecycle; it does not know about actix or sockets.

mod abi;
mod body;
mod engine;
mod host;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Weak};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use prometheus::{IntCounterVec, Opts};

pub use body::{BodyFilter, BodyStop};
pub use engine::{CompileError, PAGE, is_cached};
pub use host::VmError;
use host::{CallData, Props, Vm};

use crate::decide::Incoming;
use crate::policy::ClientHeaders;
use crate::wire::StaticResponse;

/// Default instruction budget of one call into a plugin.
pub const DEFAULT_MAX_INSTRUCTIONS: u64 = 10_000_000;
/// Default cap on a plugin instance's memory.
pub const DEFAULT_MAX_MEMORY: u64 = 16 * 1024 * 1024;

/// `rustygate_plugin_errors_total{plugin,reason}`: plugin calls that trapped, ran over a limit
/// or did something unsupported (reason: instructions, memory, trap, refused, pause).
pub static ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "rustygate_plugin_errors_total",
            "Plugin calls that failed, by plugin and reason (instructions, memory, trap, refused, pause).",
        ),
        &["plugin", "reason"],
    )
    .unwrap_or_else(|_| unreachable!("constant metric definition"))
});

/// What happens to a request when one of its plugins fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// 500 with a JSON error and the request id.
    FailClosed,
    /// The request goes on without the plugin's changes; the failure is logged and counted.
    FailOpen,
}

/// Per-call limits of a plugin.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_instructions: u64,
    pub max_memory: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_instructions: DEFAULT_MAX_INSTRUCTIONS,
            max_memory: DEFAULT_MAX_MEMORY,
        }
    }
}

/// A compiled plugin, as `[plugin.<name>]` declares it.
pub struct Plugin {
    pub name: Arc<str>,
    /// Repo-relative path of the `.wasm` file.
    pub path: String,
    /// Hex sha256 of the file, as pinned in the config.
    pub sha256: String,
    pub on_error: OnError,
    pub limits: Limits,
    compiled: Arc<engine::Compiled>,
}

impl Plugin {
    /// Compiles (or takes from the cache) a module whose sha256 the caller checked.
    pub fn compile(
        name: &str,
        path: &str,
        bytes: &[u8],
        sha256: &str,
        on_error: OnError,
        limits: Limits,
    ) -> Result<Plugin, CompileError> {
        let compiled = engine::compile(bytes, sha256, limits.max_memory)?;
        Ok(Plugin {
            name: Arc::from(name),
            path: path.to_owned(),
            sha256: sha256.to_owned(),
            on_error,
            limits,
            compiled,
        })
    }

    /// Whether it exports `proxy_on_request_body` (checked when compiled).
    pub fn reads_request_bodies(&self) -> bool {
        self.compiled.request_body
    }

    /// Whether it exports `proxy_on_response_body` (checked when compiled).
    pub fn reads_response_bodies(&self) -> bool {
        self.compiled.response_body
    }
}

/// A plugin with the configuration a route (or the gateway) gives it. Routes that give the
/// same plugin the same configuration share one.
pub struct PluginUse {
    pub plugin: Arc<Plugin>,
    /// What `proxy_on_configure` reads: a string as written, anything else as JSON.
    pub config: Bytes,
}

impl PluginUse {
    /// Instantiates and configures the plugin once, as a worker would: `validate` reports a
    /// plugin that refuses its configuration or traps at start-up.
    pub fn check(&self) -> Result<(), VmError> {
        Vm::new(self).map(drop)
    }
}

/// The plugins of a route, in the order they run on requests.
pub type RoutePlugins = Arc<[Arc<PluginUse>]>;

// ---- instances per worker thread ------------------------------------------------------------

/// Instances a worker keeps at most; past this an arbitrary one goes (a repo with many distinct
/// plugin configurations does not pin one instance each forever).
const MAX_INSTANCES_PER_THREAD: usize = 256;

struct Slot {
    owner: Weak<PluginUse>,
    vm: Vm,
    generation: u64,
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static INSTANCES: RefCell<HashMap<usize, Slot>> = RefCell::new(HashMap::new());
}

/// Runs `f` on this thread's instance of `u`: a new one when there is none (`generation`
/// `None`), or only the one of that generation. An instance that fails is dropped.
fn with_vm<R>(
    u: &Arc<PluginUse>,
    generation: Option<u64>,
    f: impl FnOnce(&mut Vm) -> Result<R, VmError>,
) -> Result<(R, u64), VmError> {
    let key = Arc::as_ptr(u) as usize;
    INSTANCES.with(|cell| {
        let mut map = cell.borrow_mut();
        let live = map
            .get(&key)
            .is_some_and(|s| s.owner.upgrade().is_some_and(|o| Arc::ptr_eq(&o, u)));
        if !live {
            map.remove(&key);
            if generation.is_some() {
                return Err(VmError::Refused("the instance was replaced".into()));
            }
            // Instances of plugin uses no snapshot holds any more (an earlier config) go now:
            // a worker never keeps one per reload.
            map.retain(|_, s| s.owner.strong_count() > 0);
            if map.len() >= MAX_INSTANCES_PER_THREAD
                && let Some(k) = map.keys().next().copied()
            {
                map.remove(&k);
            }
            let vm = Vm::new(u)?;
            map.insert(
                key,
                Slot {
                    owner: Arc::downgrade(u),
                    vm,
                    generation: GENERATION.fetch_add(1, Ordering::Relaxed),
                },
            );
        }
        let Some(slot) = map.get_mut(&key) else {
            return Err(VmError::Refused("no instance".into()));
        };
        if generation.is_some_and(|g| g != slot.generation) {
            return Err(VmError::Refused("the instance was replaced".into()));
        }
        let g = slot.generation;
        match f(&mut slot.vm) {
            Ok(r) => Ok((r, g)),
            Err(e) => {
                // A trapped instance may be in any state: the next request gets a new one.
                map.remove(&key);
                Err(e)
            }
        }
    })
}

// ---- one request ----------------------------------------------------------------------------

/// The facts about a request the plugins may read (`proxy_get_property`): the request as
/// decisions see it, its route and the config version serving it.
pub struct RequestInfo<'a> {
    pub incoming: &'a Incoming<'a>,
    pub route: &'a str,
    pub config_sha: &'a str,
}

/// A plugin whose context for this request exists.
struct Active {
    plugin: Arc<PluginUse>,
    generation: u64,
    ctx: i32,
}

/// The plugins of one request: their contexts, and the request headers as they left them.
pub struct PluginRun {
    active: Vec<Active>,
    /// The client's headers as the plugins got them, and as they left them (the same until a
    /// plugin changes them: each call shares them, and a change copies them).
    original: Arc<abi::Pairs>,
    headers: Arc<abi::Pairs>,
    props: Arc<Props>,
    /// Set when the contexts are finished, for a request body still on its way.
    closed: Arc<AtomicBool>,
}

/// What the plugins decided about a request or a response.
pub enum Outcome {
    Continue,
    /// A plugin answered itself (`proxy_send_local_response`).
    Respond(StaticResponse),
    /// A `fail_closed` plugin failed: the client gets a 500.
    Failed,
}

/// A plugin call that failed: logged, counted; what it means for the request depends on
/// `on_error`.
fn failed(u: &PluginUse, route: &str, hook: &str, e: &VmError) -> Outcome {
    let p = &u.plugin;
    ERRORS
        .with_label_values(&[p.name.as_ref(), e.reason()])
        .inc();
    tracing::warn!(
        plugin = p.name.as_ref(),
        route,
        hook,
        reason = e.reason(),
        error = %e,
        on_error = if p.on_error == OnError::FailOpen { "fail_open" } else { "fail_closed" },
        "plugin failed"
    );
    match p.on_error {
        OnError::FailClosed => Outcome::Failed,
        OnError::FailOpen => Outcome::Continue,
    }
}

/// Runs each plugin's `on_request_headers` on the client's headers, in order.
pub fn on_request(
    plugins: &[Arc<PluginUse>],
    info: &RequestInfo<'_>,
    client: &ClientHeaders,
) -> (PluginRun, Outcome) {
    let inc = info.incoming;
    let path = match inc.query {
        Some(q) => format!("{}?{q}", inc.path),
        None => inc.path.to_owned(),
    };
    let mut headers: abi::Pairs = vec![
        (":method".into(), inc.method.as_bytes().to_vec()),
        (":path".into(), path.as_bytes().to_vec()),
        (":authority".into(), inc.host.as_bytes().to_vec()),
    ];
    headers.extend(
        client
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.to_vec())),
    );
    let headers = Arc::new(headers);
    let props = Arc::new(Props {
        method: inc.method.to_owned(),
        path,
        url_path: inc.path.to_owned(),
        query: inc.query.unwrap_or("").to_owned(),
        host: inc.host.to_owned(),
        source_address: inc.client_ip.to_string(),
        route: info.route.to_owned(),
        config_sha: info.config_sha.to_owned(),
    });
    let mut run = PluginRun {
        active: Vec::with_capacity(plugins.len()),
        original: Arc::clone(&headers),
        headers,
        props,
        closed: Arc::new(AtomicBool::new(false)),
    };
    for u in plugins {
        let data = CallData {
            request: Some(Arc::clone(&run.headers)),
            request_writable: true,
            props: Some(Arc::clone(&run.props)),
            ..CallData::default()
        };
        let called = with_vm(u, None, |vm| {
            let ctx = vm.create_context()?;
            let (data, action) = vm.on_headers(true, ctx, data);
            let action = action?;
            if data.local.is_none() && action != abi::ACTION_CONTINUE {
                return Err(VmError::Refused(
                    "paused the request (Action::Pause), which RustyGate does not support".into(),
                ));
            }
            Ok((ctx, data))
        });
        match called {
            Ok(((ctx, data), generation)) => {
                run.active.push(Active {
                    plugin: Arc::clone(u),
                    generation,
                    ctx,
                });
                if let Some(h) = data.request {
                    run.headers = h;
                }
                if let Some(local) = data.local {
                    return (run, Outcome::Respond(local_response(local)));
                }
            }
            Err(e) => {
                if let Outcome::Failed = failed(u, info.route, "on_request_headers", &e) {
                    return (run, Outcome::Failed);
                }
            }
        }
    }
    (run, Outcome::Continue)
}

fn local_response(l: host::LocalResponse) -> StaticResponse {
    StaticResponse {
        status: l.status,
        headers: l
            .headers
            .into_iter()
            .filter_map(|(n, v)| {
                Some((
                    HeaderName::from_bytes(n.as_bytes()).ok()?,
                    HeaderValue::from_bytes(&v).ok()?,
                ))
            })
            .collect(),
        body: Bytes::from(l.body),
    }
}

impl PluginRun {
    /// The request body's way through the plugins that read it, in order; `None` when none
    /// does (the body then streams as it would without plugins). `limit` bounds what a plugin
    /// may hold.
    pub fn request_body(&self, limit: u64) -> Option<BodyFilter> {
        let readers = self
            .active
            .iter()
            .filter(|a| a.plugin.plugin.reads_request_bodies())
            .collect();
        BodyFilter::new(self, true, readers, limit)
    }

    /// Whether a plugin of this exchange reads the response body.
    pub fn reads_response_body(&self) -> bool {
        self.active
            .iter()
            .any(|a| a.plugin.plugin.reads_response_bodies())
    }

    /// The response body's way through the plugins that read it, in reverse order, seeing
    /// `status` and `headers` as the client gets them. The filter owns this run: the contexts
    /// end (`on_log` …) when the body does. `Err` gives the run back when no plugin reads it.
    pub fn into_response_body(
        self,
        limit: u64,
        status: u16,
        headers: &HeaderMap,
    ) -> Result<BodyFilter, PluginRun> {
        let readers = self
            .active
            .iter()
            .rev()
            .filter(|a| a.plugin.plugin.reads_response_bodies())
            .collect();
        let Some(filter) = BodyFilter::new(&self, false, readers, limit) else {
            return Err(self);
        };
        let mut pairs: abi::Pairs = Vec::with_capacity(headers.len() + 1);
        pairs.push((":status".into(), status.to_string().into_bytes()));
        pairs.extend(
            headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec())),
        );
        Ok(filter.owning(self, pairs))
    }

    /// The request headers as the plugins left them, for the policy.
    pub fn client_headers(&self) -> ClientHeaders {
        self.headers
            .iter()
            .filter(|(n, _)| !n.starts_with(':'))
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect()
    }

    /// Makes the plugins' header changes on the headers going upstream: headers they removed
    /// are removed, headers whose values they changed or added are set to their values.
    pub fn apply_edits(&self, upstream: &mut HeaderMap) {
        if Arc::ptr_eq(&self.headers, &self.original) || self.headers == self.original {
            return;
        }
        let values = |pairs: &abi::Pairs, name: &str| -> Vec<Vec<u8>> {
            pairs
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .collect()
        };
        let mut names: Vec<&str> = self
            .original
            .iter()
            .chain(self.headers.iter())
            .map(|(n, _)| n.as_str())
            .filter(|n| !n.starts_with(':'))
            .collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            let now = values(&self.headers, name);
            if now == values(&self.original, name) {
                continue;
            }
            let Ok(h) = HeaderName::from_bytes(name.as_bytes()) else {
                continue;
            };
            upstream.remove(&h);
            for v in now {
                if let Ok(v) = HeaderValue::from_bytes(&v) {
                    upstream.append(h.clone(), v);
                }
            }
        }
    }

    /// Runs `on_response_headers` of each plugin, in reverse order, on the status and headers
    /// the client would get, changing the headers in place.
    pub fn on_response(&self, route: &str, status: u16, headers: &mut HeaderMap) -> Outcome {
        if self.active.is_empty() {
            return Outcome::Continue;
        }
        let mut pairs: abi::Pairs = Vec::with_capacity(headers.len() + 1);
        pairs.push((":status".into(), status.to_string().into_bytes()));
        pairs.extend(
            headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec())),
        );
        let mut pairs = Arc::new(pairs);
        let before = Arc::clone(&pairs);
        for a in self.active.iter().rev() {
            let data = CallData {
                request: Some(Arc::clone(&self.headers)),
                response: Some(Arc::clone(&pairs)),
                response_writable: true,
                props: Some(Arc::clone(&self.props)),
                ..CallData::default()
            };
            let called = with_vm(&a.plugin, Some(a.generation), |vm| {
                let (data, action) = vm.on_headers(false, a.ctx, data);
                let action = action?;
                if data.local.is_none() && action != abi::ACTION_CONTINUE {
                    return Err(VmError::Refused(
                        "paused the response (Action::Pause), which RustyGate does not support"
                            .into(),
                    ));
                }
                Ok(data)
            });
            match called {
                Ok((data, _)) => {
                    if let Some(local) = data.local {
                        return Outcome::Respond(local_response(local));
                    }
                    if let Some(r) = data.response {
                        pairs = r;
                    }
                }
                Err(e) => {
                    if let Outcome::Failed = failed(&a.plugin, route, "on_response_headers", &e) {
                        return Outcome::Failed;
                    }
                }
            }
        }
        // A plugin that changed nothing left the very same headers.
        if !Arc::ptr_eq(&pairs, &before) && pairs != before {
            drop(before);
            let pairs = Arc::try_unwrap(pairs).unwrap_or_else(|shared| (*shared).clone());
            headers.clear();
            for (n, v) in pairs.into_iter().filter(|(n, _)| !n.starts_with(':')) {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(n.as_bytes()),
                    HeaderValue::from_bytes(&v),
                ) {
                    headers.append(n, v);
                }
            }
        }
        Outcome::Continue
    }
}

impl Drop for PluginRun {
    /// `on_log`, `on_done`, `on_delete` for each context, in request order. Failures here can
    /// no longer change the response: they are logged and counted.
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
        for a in &self.active {
            let data = CallData {
                request: Some(Arc::clone(&self.headers)),
                props: Some(Arc::clone(&self.props)),
                ..CallData::default()
            };
            if let Err(e) = with_vm(&a.plugin, Some(a.generation), |vm| vm.finish(a.ctx, data))
                && !matches!(&e, VmError::Refused(m) if m.contains("replaced"))
            {
                failed(&a.plugin, &self.props.route, "on_log", &e);
            }
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod body_tests;
