//! WASM plugins speaking the proxy-wasm ABI (a v0.2.1 subset, docs/plugins.md), run by wasmer.
//!
//! ```text
//! plugins/*.wasm ─► sha256 checked ─► engine::compile (Cranelift + metering, memory cap,
//!                   imports checked; cached by sha256) ─► Plugin ─► PluginUse (plugin + config)
//! request:  filters ─► Rhai on_request ─► on_request: each plugin's on_request_headers, in
//!           order, on the headers as the policy left them
//!           body: PluginRun::request_body ─► BodyFilter (on_request_body, per chunk, in order)
//! response: PluginRun::on_response: on_response_headers, in reverse order ─► Rhai on_response
//!           body: PluginRun::into_response_body ─► BodyFilter (on_response_body, reverse order)
//! end:      PluginRun dropped (with the response body, when a plugin reads it)
//!           ─► on_log, on_done, on_delete
//! ```
//!
//! Whether a plugin exports a body callback is read once, when it is compiled: a route whose
//! plugins do not read bodies streams them exactly as a route without plugins.
//!
//! Every call into a plugin gets a fresh instruction budget (`max_instructions`), which the host
//! calls it makes draw on by the bytes they move (`meter`); its memory cannot grow past
//! `max_memory`. Instances live per worker thread, one per plugin use. After
//! any failure the next request gets a fresh one; the other requests with contexts in the
//! failed instance go on in it until they end (a context whose call failed is not called
//! again), so one request's trap does not fail its neighbours. A failing plugin
//! answers 500 (`fail_closed`, the default) or is skipped (`fail_open`); both are logged and
//! counted in `rustygate_plugin_errors_total{plugin,reason}`.
//!
//! This module owns the plugin lifecycle; it does not know about actix or sockets.

mod abi;
mod body;
mod engine;
mod headers;
mod host;
mod log;
mod meter;
mod response;

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Weak};

use actix_http::header as ax;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use prometheus::{IntCounterVec, Opts};

pub use body::{BodyFilter, BodyStop};
pub use engine::{CompileError, PAGE, is_cached};
use headers::Headers;
pub use host::VmError;
use host::{Props, PropsOf, ResponseHead, ResponseView, Vm};
pub use response::ResponseFields;

use crate::decide::Incoming;
use crate::policy::ClientHeaders;
use crate::wire::StaticResponse;
use crate::wire::headers::HeaderSink;

/// Default instruction budget of one call into a plugin.
pub const DEFAULT_MAX_INSTRUCTIONS: u64 = 10_000_000;
/// Default cap on a plugin instance's memory.
pub const DEFAULT_MAX_MEMORY: u64 = 16 * 1024 * 1024;

/// `rustygate_plugin_errors_total{plugin,reason}`: plugin calls that trapped, ran over a limit
/// or did something unsupported (reason: instructions, memory, time, trap, refused, pause).
pub static ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(
        Opts::new(
            "rustygate_plugin_errors_total",
            "Plugin calls that failed, by plugin and reason (instructions, memory, time, trap, refused, pause).",
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
    /// Held by each request with a context in this instance (`Active::_lease`).
    lease: Arc<()>,
}

/// An instance that failed while other requests had contexts in it: kept for them (their
/// contexts finish, or fail by their own calls), never given to a new request.
struct Retired {
    key: usize,
    slot: Slot,
    /// Contexts whose call failed: not called again.
    failed: Vec<i32>,
}

/// Failed instances a worker keeps at most for the requests still in them; past this the
/// oldest goes (its requests' next calls fail as `refused`). Each may hold `max_memory`.
const MAX_RETIRED_PER_THREAD: usize = 8;

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// The instances by the address of their `PluginUse`; foldhash, not SipHash, per call.
type Instances = crate::util::FastMap<usize, Slot>;

#[derive(Default)]
struct Worker {
    current: Instances,
    retired: Vec<Retired>,
}

thread_local! {
    static INSTANCES: RefCell<Worker> = RefCell::new(Worker::default());
}

/// What a call into an instance gives back besides its result: the instance's generation.
type Called<R> = Result<(R, u64), VmError>;

/// Runs `f` on this thread's instance of `u`: for a new request (`at` `None`) the current one,
/// made when there is none; for a context (`at`: generation and context id) the instance that
/// context lives in, current or retired. An instance that fails is no longer given to new
/// requests; it is kept (retired) while other requests have contexts in it. `f` also gets the
/// instance's lease: a new request's context takes one (`Active::_lease`); the later calls into
/// that context, which already hold it, leave it alone.
fn with_vm<R>(
    u: &Arc<PluginUse>,
    at: Option<(u64, i32)>,
    f: impl FnOnce(&mut Vm, &Arc<()>) -> Result<R, VmError>,
) -> Called<R> {
    let key = Arc::as_ptr(u) as usize;
    INSTANCES.with(|cell| {
        let mut worker = cell.borrow_mut();
        let Worker { current, retired } = &mut *worker;
        if !retired.is_empty() {
            retired.retain(|r| Arc::strong_count(&r.slot.lease) > 1);
        }
        // The slot's `Weak` keeps its `PluginUse`'s allocation: no other one can be at the
        // same address while it exists, so the same address is the same plugin use.
        // The current instance's generation, when there is one for `u`.
        let live = current
            .get(&key)
            .filter(|s| std::ptr::eq(s.owner.as_ptr(), Arc::as_ptr(u)))
            .map(|s| s.generation);
        if let Some((generation, ctx)) = at
            && live != Some(generation)
        {
            let replaced = || VmError::Refused("the instance was replaced".into());
            let Some(r) = retired
                .iter_mut()
                .find(|r| r.key == key && r.slot.generation == generation)
            else {
                return Err(replaced());
            };
            if r.failed.contains(&ctx) {
                return Err(replaced());
            }
            return match f(&mut r.slot.vm, &r.slot.lease) {
                Ok(out) => Ok((out, generation)),
                Err(e) => {
                    r.failed.push(ctx);
                    Err(e)
                }
            };
        }
        if live.is_none() {
            current.remove(&key);
            // Instances of plugin uses no snapshot holds any more (an earlier config) go now:
            // a worker never keeps one per reload.
            current.retain(|_, s| s.owner.strong_count() > 0);
            if current.len() >= MAX_INSTANCES_PER_THREAD
                && let Some(k) = current.keys().next().copied()
            {
                current.remove(&k);
            }
            let vm = Vm::new(u)?;
            current.insert(
                key,
                Slot {
                    owner: Arc::downgrade(u),
                    vm,
                    generation: GENERATION.fetch_add(1, Ordering::Relaxed),
                    lease: Arc::new(()),
                },
            );
        }
        let Some(slot) = current.get_mut(&key) else {
            return Err(VmError::Refused("no instance".into()));
        };
        let g = slot.generation;
        match f(&mut slot.vm, &slot.lease) {
            Ok(r) => Ok((r, g)),
            Err(e) => {
                // A trapped instance may be in any state: the next request gets a new one;
                // requests with contexts in it keep it until they end.
                if let Some(slot) = current.remove(&key)
                    && Arc::strong_count(&slot.lease) > 1
                {
                    if retired.len() >= MAX_RETIRED_PER_THREAD {
                        retired.remove(0);
                    }
                    retired.push(Retired {
                        key,
                        slot,
                        failed: at.map(|(_, ctx)| ctx).into_iter().collect(),
                    });
                }
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
    /// Keeps the instance the context lives in, should it fail for another request.
    _lease: Arc<()>,
}

/// The plugins of one request: their contexts, and the request headers as they left them.
pub struct PluginRun {
    active: Vec<Active>,
    /// The client's headers as the plugins left them, with the names they changed and the
    /// values those had (shared with each later call).
    headers: Arc<Headers>,
    /// The request's properties; they also tell a request body still on its way when the
    /// contexts are finished.
    props: Arc<Props>,
}

/// What `PluginRun::headers` holds while a plugin that may change them in place has them.
static LENT: LazyLock<Arc<Headers>> = LazyLock::new(Arc::default);

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

/// Runs each plugin's `on_request_headers` on the client's headers, in order. Their map is
/// made in `client`'s buffers (room for a usual edit is worth leaving in them).
pub fn on_request(
    plugins: &[Arc<PluginUse>],
    info: &RequestInfo<'_>,
    client: ClientHeaders,
) -> (PluginRun, Outcome) {
    let inc = info.incoming;
    let path: &[&[u8]] = match inc.query {
        Some(q) => &[inc.path.as_bytes(), b"?", q.as_bytes()],
        None => &[inc.path.as_bytes()],
    };
    let headers = Headers::with_pseudo(
        &[
            (":method", &[inc.method.as_bytes()]),
            (":path", path),
            (":authority", &[inc.host.as_bytes()]),
        ],
        client.into_parts(),
    );
    let headers = Arc::new(headers);
    let props = Arc::new(Props::new(&PropsOf {
        method: inc.method,
        url_path: inc.path,
        query: inc.query,
        host: inc.host,
        source: inc.client_ip,
        route: info.route,
        config_sha: info.config_sha,
    }));
    let mut run = PluginRun {
        active: Vec::with_capacity(plugins.len()),
        headers,
        props,
    };
    for u in plugins {
        // The plugin changes the headers in place, unless its changes might have to be undone:
        // it fails open, or earlier plugins' contexts would see them (`on_log` after it failed
        // closed). Then it shares them, and its first change copies them.
        let shared = u.plugin.on_error == OnError::FailOpen || !run.active.is_empty();
        let request = if shared {
            Arc::clone(&run.headers)
        } else {
            std::mem::replace(&mut run.headers, Arc::clone(&LENT))
        };
        let props = &run.props;
        let called = with_vm(u, None, |vm, lease| {
            let ctx = vm.create_context()?;
            let out = vm.in_call(|vm| {
                let d = vm.data();
                d.request = Some(request);
                d.request_writable = true;
                d.props = Some(Arc::clone(props));
                let action = vm.on_headers(true, ctx)?;
                let d = vm.data();
                let local = d.local.take();
                if local.is_none() && action != abi::ACTION_CONTINUE {
                    return Err(VmError::Refused(
                        "paused the request (Action::Pause), which RustyGate does not support"
                            .into(),
                    ));
                }
                Ok((ctx, d.request.take(), local))
            })?;
            // This request's context now lives in the instance.
            Ok((out, Arc::clone(lease)))
        });
        match called {
            Ok((((ctx, request, local), lease), generation)) => {
                run.active.push(Active {
                    plugin: Arc::clone(u),
                    generation,
                    ctx,
                    _lease: lease,
                });
                if let Some(h) = request {
                    run.headers = h;
                }
                if let Some(local) = local {
                    return (run, Outcome::Respond(local_response(*local)));
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
            .filter(|a| a.plugin.plugin.reads_request_bodies());
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
        headers: impl Into<ResponseFields>,
    ) -> Result<BodyFilter, PluginRun> {
        let readers = self
            .active
            .iter()
            .rev()
            .filter(|a| a.plugin.plugin.reads_response_bodies());
        let Some(filter) = BodyFilter::new(&self, false, readers, limit) else {
            return Err(self);
        };
        let seen = Arc::new(ResponseHead {
            status,
            headers: headers.into(),
        });
        Ok(filter.owning(self, seen))
    }

    /// The request headers as the plugins left them, for the policy.
    pub fn client_headers(&self) -> ClientHeaders {
        self.headers
            .iter()
            .filter(|(n, _)| !n.starts_with(':'))
            .collect()
    }

    /// Makes the plugins' header changes on the headers going upstream: headers they removed
    /// are removed, headers whose values they changed or added are set to their values. Only
    /// the names they changed are looked at, and only those whose values are not the client's:
    /// a plugin that "replaces" a header with the client's value leaves what the gateway set.
    /// `upstream` is an `http` 1.x map or the list an HTTP/1.1 head is written from.
    pub fn apply_edits(&self, upstream: &mut impl HeaderSink) {
        let h = &self.headers;
        for name in h.changed() {
            // Usually a name the client did not send: then it changed when it has values now,
            // and the scan that finds them is the one that sets them.
            let mut now = h.values(name).peekable();
            let unchanged = if h.values_before(name).next().is_none() {
                now.peek().is_none()
            } else {
                h.values(name).eq(h.values_before(name))
            };
            if unchanged {
                continue;
            }
            let Some(n) = headers::header_name(name) else {
                continue;
            };
            let mut values = now.filter_map(|v| HeaderValue::from_bytes(v).ok());
            match (values.next(), values.next()) {
                (None, _) => upstream.remove(&n),
                // One value (the usual): the name moves into the map, not copied.
                (Some(v), None) => upstream.insert(n, v),
                (Some(first), Some(second)) => {
                    upstream.remove(&n);
                    for v in [first, second].into_iter().chain(values) {
                        upstream.append(n.clone(), v);
                    }
                }
            }
        }
    }

    /// Runs `on_response_headers` of each plugin, in reverse order, on the status and headers
    /// the client would get, changing the headers in place (a plugin that fails open has its
    /// changes undone).
    pub fn on_response(&self, route: &str, status: u16, headers: &mut HeaderMap) -> Outcome {
        let mut fields = ResponseFields::Map(std::mem::take(headers));
        let out = self.on_response_fields(route, status, &mut fields);
        if let ResponseFields::Map(m) = fields {
            *headers = m;
        }
        out
    }

    /// [`PluginRun::on_response`] on a head in the client side's types, as a list.
    pub fn on_response_list(
        &self,
        route: &str,
        status: u16,
        fields: &mut Vec<(ax::HeaderName, ax::HeaderValue)>,
    ) -> Outcome {
        let mut list = ResponseFields::List(std::mem::take(fields));
        let out = self.on_response_fields(route, status, &mut list);
        if let ResponseFields::List(l) = list {
            *fields = l;
        }
        out
    }

    /// [`PluginRun::on_response`] on either shape of the response's fields.
    fn on_response_fields(
        &self,
        route: &str,
        status: u16,
        headers: &mut ResponseFields,
    ) -> Outcome {
        for a in self.active.iter().rev() {
            // The headers go into the call (and come back) only when the instance is there.
            let called = with_vm(&a.plugin, Some((a.generation, a.ctx)), |vm, _| {
                vm.in_call(|vm| {
                    let d = vm.data();
                    d.request = Some(Arc::clone(&self.headers));
                    d.response = ResponseView::Edit {
                        status,
                        headers: std::mem::take(headers),
                    };
                    d.props = Some(Arc::clone(&self.props));
                    let action = vm.on_headers(false, a.ctx);
                    let d = vm.data();
                    if let ResponseView::Edit { headers: h, .. } = std::mem::take(&mut d.response) {
                        *headers = h;
                    }
                    let local = d.local.take();
                    let out = action.and_then(|action| {
                        if local.is_none() && action != abi::ACTION_CONTINUE {
                            return Err(VmError::Refused(
                                "paused the response (Action::Pause), which RustyGate does not \
                                 support"
                                    .into(),
                            ));
                        }
                        Ok(local)
                    });
                    if out.is_err() {
                        vm.undo(headers);
                    }
                    out
                })
            });
            match called {
                Ok((Some(local), _)) => return Outcome::Respond(local_response(*local)),
                Ok((None, _)) => {}
                Err(e) => {
                    if let Outcome::Failed = failed(&a.plugin, route, "on_response_headers", &e) {
                        return Outcome::Failed;
                    }
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
        self.props.close();
        for a in &self.active {
            if let Err(e) = with_vm(&a.plugin, Some((a.generation, a.ctx)), |vm, _| {
                vm.in_call(|vm| {
                    let d = vm.data();
                    d.request = Some(Arc::clone(&self.headers));
                    d.props = Some(Arc::clone(&self.props));
                    vm.finish(a.ctx)
                })
            }) && !matches!(&e, VmError::Refused(m) if m.contains("replaced"))
            {
                failed(&a.plugin, self.props.route(), "on_log", &e);
            }
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod body_tests;

#[cfg(test)]
mod host_tests;
