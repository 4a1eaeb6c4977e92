//! The host side of the ABI: the functions a plugin imports, and [`Vm`], one instance of a
//! plugin with its store, that calls the plugin's callbacks each under a fresh instruction
//! budget.
//!
//! What a callback may see lives in [`CallData`], set in the instance's environment for the
//! length of one call ([`Vm::in_call`]) and cleared after it: the host functions never see
//! another request's headers, and nothing of a request outlives its calls inside the instance's
//! host state.

use std::sync::Arc;

use wasmer::{FunctionEnv, Global, Instance, Memory, RuntimeError, Store, TypedFunction, Value};

use super::PluginUse;
use super::abi::{self, Pairs};
use super::engine::PAGE;
use super::headers::Headers;
use super::meter::{self, Meter, Stop};
use super::response::{self, ResponseFields, Undo};
use imports::imports;

mod imports;
mod maps;
mod memory;

/// What the current callback may read and change.
#[derive(Default)]
pub(crate) struct CallData {
    /// Request headers, pseudo-headers (`:method`, `:path`, `:authority`) first. Shared
    /// with the exchange, copied only when a plugin changes them.
    pub request: Option<Arc<Headers>>,
    pub request_writable: bool,
    /// Response headers, `:status` first.
    pub response: ResponseView,
    /// Set by `proxy_send_local_response` (boxed: rare, and this moves in and out of calls).
    pub local: Option<Box<LocalResponse>>,
    pub props: Option<Arc<Props>>,
    /// The body buffer of a body callback.
    pub body: Option<BodyView>,
}

/// The response's status and headers as a callback sees them.
#[derive(Default)]
pub(crate) enum ResponseView {
    #[default]
    None,
    /// A response headers callback: the headers the client gets, changed in place.
    Edit {
        status: u16,
        headers: ResponseFields,
    },
    /// A response body callback: the headers the client got.
    Seen(Arc<ResponseHead>),
}

/// A response's status and headers, as its body callbacks see them.
pub(crate) struct ResponseHead {
    pub status: u16,
    pub headers: ResponseFields,
}

/// The body a body callback sees (`HTTP_REQUEST_BODY` or `HTTP_RESPONSE_BODY`): what the host
/// holds for it, as the plugin has left it so far.
pub(crate) struct BodyView {
    /// Which buffer this is (`abi::buffer`).
    pub id: i32,
    pub data: bytes::Bytes,
    /// Whether `proxy_set_buffer_bytes` changed it.
    pub edited: bool,
    /// The most it may hold after a change (the route's body limit).
    pub limit: usize,
}

/// A response the plugin answers with instead of the upstream's.
#[derive(Debug, Clone)]
pub struct LocalResponse {
    pub status: u16,
    pub headers: Pairs,
    pub body: Vec<u8>,
}

/// The attributes `proxy_get_property` serves (docs/plugins.md), in one buffer; the client's
/// address is written out only when a plugin asks for it.
#[derive(Debug, Default)]
pub struct Props {
    /// The method, the path (without its query), the query, the host, the route and the
    /// config SHA, one after the other.
    text: String,
    ends: [usize; 6],
    /// Whether the request has a query (`request.path` ends with `?` for an empty one).
    has_query: bool,
    source: Option<std::net::IpAddr>,
    /// Set when the exchange's contexts are finished, for a request body still on its way
    /// (here, not in an allocation of its own: whatever holds the properties needs this).
    closed: std::sync::atomic::AtomicBool,
}

/// What a request's properties are made of.
pub struct PropsOf<'a> {
    pub method: &'a str,
    pub url_path: &'a str,
    pub query: Option<&'a str>,
    pub host: &'a str,
    pub source: std::net::IpAddr,
    pub route: &'a str,
    pub config_sha: &'a str,
}

impl Props {
    pub fn new(p: &PropsOf<'_>) -> Props {
        let parts = [
            p.method,
            p.url_path,
            p.query.unwrap_or(""),
            p.host,
            p.route,
            p.config_sha,
        ];
        let mut text = String::with_capacity(parts.iter().map(|s| s.len()).sum());
        let mut ends = [0; 6];
        for (end, part) in ends.iter_mut().zip(parts) {
            text.push_str(part);
            *end = text.len();
        }
        Props {
            text,
            ends,
            has_query: p.query.is_some(),
            source: Some(p.source),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Marks the exchange's contexts finished.
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether the exchange's contexts are finished: no call may follow.
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    fn part(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.text.get(start..self.ends[i]).unwrap_or("")
    }

    pub fn method(&self) -> &str {
        self.part(0)
    }

    pub fn url_path(&self) -> &str {
        self.part(1)
    }

    /// The query, `None` when the request has none.
    pub fn query(&self) -> Option<&str> {
        self.has_query.then(|| self.part(2))
    }

    pub fn host(&self) -> &str {
        self.part(3)
    }

    pub fn route(&self) -> &str {
        self.part(4)
    }

    fn get(&self, path: &str, plugin: &str) -> Option<Vec<u8>> {
        let s = match path {
            "request.method" => self.method(),
            "request.path" => {
                // Path and query, as `request.path` is in Envoy.
                let mut v = self.url_path().as_bytes().to_vec();
                if let Some(q) = self.query() {
                    v.push(b'?');
                    v.extend_from_slice(q.as_bytes());
                }
                return Some(v);
            }
            "request.url_path" => self.url_path(),
            "request.query" => self.part(2),
            "request.host" => self.host(),
            "source.address" => return Some(self.source?.to_string().into_bytes()),
            "rustygate.route" | "route_name" => self.route(),
            "rustygate.config_sha" => self.part(5),
            "plugin_name" => plugin,
            _ => return None,
        };
        Some(s.as_bytes().to_vec())
    }
}

/// The host state an instance's imports share.
pub(crate) struct HostState {
    memory: Option<Memory>,
    alloc: Option<TypedFunction<i32, i32>>,
    plugin: Arc<str>,
    config: bytes::Bytes,
    pub call: CallData,
    /// What the current call's changes to the response headers replaced, recorded only for a
    /// `fail_open` plugin (undone should the call fail); kept for its allocation.
    pub undo: Option<Undo>,
    /// Host calls read names and values into this, kept for its allocation.
    scratch: Vec<u8>,
    /// What the host work of the current call has cost it.
    meter: Meter,
}

/// Why a call into a plugin failed; `reason()` is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("ran over its instruction budget (max_instructions = {0})")]
    Instructions(u64),
    #[error("ran out of memory (max_memory = {0} bytes)")]
    Memory(u64),
    #[error("kept the host busy for more than {0:?} in one call")]
    Time(std::time::Duration),
    #[error("trapped: {0}")]
    Trap(String),
    #[error("{0}")]
    Refused(String),
}

impl VmError {
    pub fn reason(&self) -> &'static str {
        match self {
            VmError::Instructions(_) => "instructions",
            VmError::Memory(_) => "memory",
            VmError::Time(_) => "time",
            VmError::Trap(_) => "trap",
            VmError::Refused(_) => "refused",
        }
    }
}

type Cb1 = TypedFunction<i32, ()>;
type Cb2 = TypedFunction<(i32, i32), i32>;
type Cb3 = TypedFunction<(i32, i32, i32), i32>;

/// The plugin's callbacks the host calls; each may be missing.
struct Callbacks {
    context_create: TypedFunction<(i32, i32), ()>,
    vm_start: Option<Cb2>,
    configure: Option<Cb2>,
    request_headers: Option<Cb3>,
    response_headers: Option<Cb3>,
    request_body: Option<Cb3>,
    response_body: Option<Cb3>,
    log: Option<Cb1>,
    done: Option<TypedFunction<i32, i32>>,
    delete: Option<Cb1>,
}

/// The root context every instance configures (one plugin configuration per instance).
pub const ROOT_CONTEXT: i32 = 1;

/// One instance of a plugin, owned by one worker thread.
pub(crate) struct Vm {
    store: Store,
    env: FunctionEnv<HostState>,
    remaining: Global,
    exhausted: Global,
    memory: Memory,
    cb: Callbacks,
    max_instructions: u64,
    max_memory: u64,
    next_context: i32,
    /// A call failed: the metering's `exhausted` flag may be set and is cleared before the next.
    failed: bool,
}

impl Vm {
    /// Instantiates the plugin and runs its start-up: `_initialize`, the root context,
    /// `proxy_on_vm_start`, `proxy_on_configure` with the plugin configuration.
    pub fn new(u: &PluginUse) -> Result<Vm, VmError> {
        let p = &u.plugin;
        let mut store = Store::new(p.compiled.engine.clone());
        let env = FunctionEnv::new(
            &mut store,
            HostState {
                memory: None,
                alloc: None,
                plugin: Arc::clone(&p.name),
                config: u.config.clone(),
                call: CallData::default(),
                undo: (p.on_error == super::OnError::FailOpen).then(Undo::new),
                scratch: Vec::new(),
                meter: Meter::new(meter::call_time(p.limits.max_instructions)),
            },
        );
        let imports = imports(&mut store, &env, &p.compiled.module);
        let instance = Instance::new(&mut store, &p.compiled.module, &imports)
            .map_err(|e| VmError::Refused(format!("could not be instantiated: {e}")))?;
        let ex = &instance.exports;
        let missing = |what: &str| VmError::Refused(format!("does not export `{what}`"));
        let memory = ex
            .get_memory("memory")
            .map_err(|_| missing("memory"))?
            .clone();
        let alloc = ex
            .get_typed_function::<i32, i32>(&store, "proxy_on_memory_allocate")
            .or_else(|_| ex.get_typed_function::<i32, i32>(&store, "malloc"))
            .map_err(|_| missing("proxy_on_memory_allocate"))?;
        let global = |name: &str| {
            ex.get_global(name)
                .cloned()
                .map_err(|_| VmError::Refused("was not compiled with metering".into()))
        };
        let (remaining, exhausted) = (
            global("wasmer_metering_remaining_points")?,
            global("wasmer_metering_points_exhausted")?,
        );
        let t2 = |n: &str| ex.get_typed_function::<(i32, i32), i32>(&store, n).ok();
        let t3 = |n: &str| {
            ex.get_typed_function::<(i32, i32, i32), i32>(&store, n)
                .ok()
        };
        let t1 = |n: &str| ex.get_typed_function::<i32, ()>(&store, n).ok();
        let cb = Callbacks {
            context_create: ex
                .get_typed_function(&store, "proxy_on_context_create")
                .map_err(|_| missing("proxy_on_context_create(i32, i32)"))?,
            vm_start: t2("proxy_on_vm_start"),
            configure: t2("proxy_on_configure"),
            request_headers: t3("proxy_on_request_headers"),
            response_headers: t3("proxy_on_response_headers"),
            request_body: t3("proxy_on_request_body"),
            response_body: t3("proxy_on_response_body"),
            log: t1("proxy_on_log"),
            done: ex.get_typed_function(&store, "proxy_on_done").ok(),
            delete: t1("proxy_on_delete"),
        };
        let init = ex
            .get_typed_function::<(), ()>(&store, "_initialize")
            .or_else(|_| ex.get_typed_function::<(), ()>(&store, "_start"))
            .ok();
        {
            let s = env.as_mut(&mut store);
            s.memory = Some(memory.clone());
            s.alloc = Some(alloc);
            s.meter.attach(remaining.clone(), exhausted.clone());
        }
        let mut vm = Vm {
            store,
            env,
            remaining,
            exhausted,
            memory,
            cb,
            max_instructions: p.limits.max_instructions,
            max_memory: p.limits.max_memory,
            next_context: ROOT_CONTEXT + 1,
            failed: false,
        };
        if let Some(init) = init {
            vm.call(|s, _| init.call(s))?;
        }
        vm.call(|s, cb| cb.context_create.call(s, ROOT_CONTEXT, 0))?;
        if let Some(f) = vm.cb.vm_start.clone()
            && vm.call(|s, _| f.call(s, ROOT_CONTEXT, 0))? == 0
        {
            return Err(VmError::Refused("proxy_on_vm_start returned false".into()));
        }
        let size = u.config.len() as i32;
        if let Some(f) = vm.cb.configure.clone()
            && vm.call(|s, _| f.call(s, ROOT_CONTEXT, size))? == 0
        {
            return Err(VmError::Refused(
                "proxy_on_configure returned false: the plugin refused its `config`".into(),
            ));
        }
        Ok(vm)
    }

    /// Runs `f` with a fresh instruction budget (which host calls draw on too), telling a
    /// budget, time or memory failure from another trap.
    fn call<R>(
        &mut self,
        f: impl FnOnce(&mut Store, &Callbacks) -> Result<R, RuntimeError>,
    ) -> Result<R, VmError> {
        let budget = Value::I64(self.max_instructions.min(i64::MAX as u64) as i64);
        self.remaining
            .set(&mut self.store, budget)
            .and_then(|()| {
                // Only a failed call can have left it set.
                if self.failed {
                    self.exhausted.set(&mut self.store, Value::I32(0))
                } else {
                    Ok(())
                }
            })
            .map_err(|e| VmError::Trap(format!("could not set the budget: {e}")))?;
        self.env.as_mut(&mut self.store).meter.begin();
        match f(&mut self.store, &self.cb) {
            Ok(r) => Ok(r),
            Err(e) => {
                self.failed = true;
                let meter = &self.env.as_ref(&self.store).meter;
                if let Some(Stop::Time) = meter.stopped() {
                    Err(VmError::Time(meter::call_time(self.max_instructions)))
                } else if matches!(self.exhausted.get(&mut self.store), Value::I32(n) if n != 0) {
                    Err(VmError::Instructions(self.max_instructions))
                } else if self.memory.view(&self.store).data_size() + PAGE > self.max_memory {
                    Err(VmError::Memory(self.max_memory))
                } else {
                    Err(VmError::Trap(e.message()))
                }
            }
        }
    }

    /// A new HTTP context under the root context.
    pub fn create_context(&mut self) -> Result<i32, VmError> {
        let id = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(ROOT_CONTEXT + 1);
        self.call(|s, cb| cb.context_create.call(s, id, ROOT_CONTEXT))?;
        Ok(id)
    }

    /// What the next callback sees, set in place (nothing is moved in and out of a call),
    /// and what it changed, read after it. Only inside [`Vm::in_call`].
    pub fn data(&mut self) -> &mut CallData {
        &mut self.env.as_mut(&mut self.store).call
    }

    /// Runs `f`, which sets [`Vm::data`], calls callbacks and reads what they changed; then
    /// clears the data, so that nothing of a request outlives its calls in the instance.
    pub fn in_call<R>(&mut self, f: impl FnOnce(&mut Vm) -> R) -> R {
        let out = f(self);
        let state = self.env.as_mut(&mut self.store);
        state.call = CallData::default();
        if let Some(u) = &mut state.undo {
            u.clear();
        }
        out
    }

    /// Calls `on_request_headers` or `on_response_headers` with [`Vm::data`] in view.
    pub fn on_headers(&mut self, request: bool, ctx: i32) -> Result<i32, VmError> {
        let f = if request {
            self.cb.request_headers.clone()
        } else {
            self.cb.response_headers.clone()
        };
        let Some(f) = f else {
            return Ok(abi::ACTION_CONTINUE);
        };
        let data = self.data();
        let n = if request {
            data.request.as_ref().map_or(0, |p| p.len())
        } else {
            match &data.response {
                ResponseView::None => 0,
                ResponseView::Edit { headers, .. } => headers.len() + 1,
                ResponseView::Seen(h) => h.headers.len() + 1,
            }
        } as i32;
        self.call(|s, _| f.call(s, ctx, n, 0))
    }

    /// Puts back what the current call changed in the response headers, when it recorded that
    /// (a `fail_open` plugin).
    pub fn undo(&mut self, headers: &mut ResponseFields) {
        if let Some(u) = &mut self.env.as_mut(&mut self.store).undo {
            response::undo(headers, u);
        }
    }

    /// Calls `on_request_body` or `on_response_body` with [`Vm::data`] (its `body` set) in
    /// view. A plugin without the callback continues.
    pub fn on_body(&mut self, request: bool, ctx: i32, end: bool) -> Result<i32, VmError> {
        let f = if request {
            self.cb.request_body.clone()
        } else {
            self.cb.response_body.clone()
        };
        let Some(f) = f else {
            return Ok(abi::ACTION_CONTINUE);
        };
        let size = self.data().body.as_ref().map_or(0, |b| b.data.len()) as i32;
        self.call(|s, _| f.call(s, ctx, size, i32::from(end)))
    }

    /// `proxy_on_log`, `proxy_on_done` and `proxy_on_delete` for a finished context, with
    /// [`Vm::data`] in view.
    pub fn finish(&mut self, ctx: i32) -> Result<(), VmError> {
        if let Some(f) = self.cb.log.clone() {
            self.call(|s, _| f.call(s, ctx))?;
        }
        if let Some(f) = self.cb.done.clone() {
            self.call(|s, _| f.call(s, ctx))?;
        }
        if let Some(f) = self.cb.delete.clone() {
            self.call(|s, _| f.call(s, ctx))?;
        }
        Ok(())
    }
}

// ---- memory helpers -------------------------------------------------------------------------
