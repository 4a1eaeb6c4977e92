//! The host side of the ABI: the functions a plugin imports, and [`Vm`], one instance of a
//! plugin with its store, that calls the plugin's callbacks each under a fresh instruction
//! budget.
//!
//! What a callback may see lives in [`CallData`], set in the instance's environment for the
//! length of one call ([`Vm::in_call`]) and cleared after it: the host functions never see
//! another request's headers, and nothing of a request outlives its calls inside the instance's
//! host state.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use wasmer::{
    Function, FunctionEnv, FunctionEnvMut, Global, Imports, Instance, Memory, RuntimeError, Store,
    TypedFunction, Value,
};

use super::abi::{self, Pairs, errno, status};
use super::headers::{self, Headers};
use super::log;
use super::meter::{self, Meter, Stop};
use super::response::{self, ResponseEdit, ResponseFields, Undo};
use super::{PluginUse, engine::PAGE};
use crate::wire::headers::{GATEWAY_OWNED, HOP_BY_HOP, is_gateway_owned_str};

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

/// Charges the current call for `bytes` of host work ([`Meter::charge`]): `Err` fails the call.
fn charge(env: &mut FunctionEnvMut<'_, HostState>, bytes: usize) -> Result<(), RuntimeError> {
    let (state, mut store) = env.data_and_store_mut();
    state.meter.charge(&mut store, bytes as u64)
}

/// Whether `len` bytes from `ptr` are inside the plugin's memory.
fn fits(env: &FunctionEnvMut<'_, HostState>, ptr: i32, len: usize) -> bool {
    env.data()
        .memory
        .as_ref()
        .is_some_and(|m| (ptr as u32 as u64).saturating_add(len as u64) <= m.view(env).data_size())
}

/// Reads `len` bytes from the plugin's memory, charged to the call; `Ok(None)` when the range
/// is over [`abi::MAX_TRANSFER`] or outside the memory (nothing charged or allocated then).
fn read(
    env: &mut FunctionEnvMut<'_, HostState>,
    ptr: i32,
    len: i32,
) -> Result<Option<Vec<u8>>, RuntimeError> {
    read_at_most(env, ptr, len, abi::MAX_TRANSFER)
}

/// [`read`] with another bound than [`abi::MAX_TRANSFER`] (a body, bounded by its route).
fn read_at_most(
    env: &mut FunctionEnvMut<'_, HostState>,
    ptr: i32,
    len: i32,
    most: usize,
) -> Result<Option<Vec<u8>>, RuntimeError> {
    let len = len as u32 as usize;
    // Nothing is charged or allocated for a range the plugin's memory cannot hold.
    if len > most || !fits(env, ptr, len) {
        return Ok(None);
    }
    charge(env, len)?;
    let Some(memory) = env.data().memory.as_ref() else {
        return Ok(None);
    };
    let mut buf = vec![0; len];
    Ok(memory
        .view(env)
        .read(u64::from(ptr as u32), &mut buf)
        .ok()
        .map(|()| buf))
}

fn write(env: &FunctionEnvMut<'_, HostState>, ptr: i32, data: &[u8]) -> bool {
    env.data()
        .memory
        .as_ref()
        .is_some_and(|m| m.view(env).write(u64::from(ptr as u32), data).is_ok())
}

fn write_u32(env: &FunctionEnvMut<'_, HostState>, ptr: i32, v: u32) -> bool {
    write(env, ptr, &v.to_le_bytes())
}

/// Copies `data` into memory the plugin allocates, and writes where and how long to
/// `ret_ptr` / `ret_size`. The copy is charged to the call first; the allocation runs plugin
/// code, under the same budget.
fn give(
    env: &mut FunctionEnvMut<'_, HostState>,
    data: &[u8],
    ret_ptr: i32,
    ret_size: i32,
) -> Result<i32, RuntimeError> {
    give_at_most(env, data, ret_ptr, ret_size, abi::MAX_TRANSFER)
}

/// [`give`] with another bound than [`abi::MAX_TRANSFER`] (a body, bounded by its route).
fn give_at_most(
    env: &mut FunctionEnvMut<'_, HostState>,
    data: &[u8],
    ret_ptr: i32,
    ret_size: i32,
    most: usize,
) -> Result<i32, RuntimeError> {
    if data.len() > most {
        return Ok(status::BAD_ARGUMENT);
    }
    let Some(alloc) = env.data().alloc.clone() else {
        return Ok(status::INVALID_MEMORY_ACCESS);
    };
    charge(env, data.len())?;
    let p = alloc.call(env, data.len() as i32)?;
    if p == 0 && !data.is_empty() {
        return Ok(status::INVALID_MEMORY_ACCESS);
    }
    if write(env, p, data)
        && write_u32(env, ret_ptr, p as u32)
        && write_u32(env, ret_size, data.len() as u32)
    {
        Ok(status::OK)
    } else {
        Ok(status::INVALID_MEMORY_ACCESS)
    }
}

// ---- buffers --------------------------------------------------------------------------------

/// The buffer `id` as the current call may read it.
fn buffer(state: &HostState, id: i32) -> Option<bytes::Bytes> {
    match id {
        abi::buffer::PLUGIN_CONFIGURATION => Some(state.config.clone()),
        abi::buffer::VM_CONFIGURATION => Some(bytes::Bytes::new()),
        abi::buffer::HTTP_REQUEST_BODY | abi::buffer::HTTP_RESPONSE_BODY => state
            .call
            .body
            .as_ref()
            .filter(|b| b.id == id)
            .map(|b| b.data.clone()),
        _ => None,
    }
}

/// How much of a body one host call may move: the route's body limit (at least
/// [`abi::MAX_TRANSFER`]); `None` outside a body callback.
fn body_limit(state: &HostState) -> Option<usize> {
    state
        .call
        .body
        .as_ref()
        .map(|b| b.limit.max(abi::MAX_TRANSFER))
}

// ---- header maps ----------------------------------------------------------------------------

/// A header map in view.
enum MapRef<'a> {
    Request(&'a Headers),
    Response(u16, &'a ResponseFields),
}

impl MapRef<'_> {
    fn serialize(&self) -> Vec<u8> {
        match self {
            MapRef::Request(h) => h.serialize(),
            MapRef::Response(s, h) => response::serialize_response(*s, h),
        }
    }

    fn serialized_len(&self) -> usize {
        match self {
            MapRef::Request(h) => h.serialized_len(),
            MapRef::Response(s, h) => response::serialized_response_len(*s, h),
        }
    }

    fn joined(&self, name: &str) -> Option<Vec<u8>> {
        match self {
            MapRef::Request(h) => h.joined(name),
            MapRef::Response(s, h) => response::response_value(*s, h, name),
        }
    }
}

/// The map a call may read, if it is in view now.
fn map(call: &CallData, id: i32) -> Option<MapRef<'_>> {
    match id {
        abi::map::REQUEST_HEADERS => call.request.as_deref().map(MapRef::Request),
        abi::map::RESPONSE_HEADERS => match &call.response {
            ResponseView::None => None,
            ResponseView::Edit { status, headers } => Some(MapRef::Response(*status, headers)),
            ResponseView::Seen(h) => Some(MapRef::Response(h.status, &h.headers)),
        },
        _ => None,
    }
}

/// A header map a call may change.
enum MapMut<'a> {
    /// Shared with the exchange until changed (then copied, for a `fail_open` plugin).
    Request(&'a mut Headers),
    Response(ResponseEdit<'a>),
}

impl MapMut<'_> {
    fn add(&mut self, name: &str, value: &[u8]) {
        match self {
            MapMut::Request(h) => h.add(name, value),
            MapMut::Response(r) => r.add(name, value),
        }
    }

    fn replace(&mut self, name: &str, value: &[u8]) {
        match self {
            MapMut::Request(h) => h.replace(name, value),
            MapMut::Response(r) => r.replace(name, value),
        }
    }

    fn remove(&mut self, name: &str) {
        match self {
            MapMut::Request(h) => h.remove(name),
            MapMut::Response(r) => r.remove(name),
        }
    }

    fn set_all(&mut self, pairs: &[(String, Vec<u8>)]) {
        match self {
            MapMut::Request(h) => h.set_all(pairs),
            MapMut::Response(r) => r.set_all(pairs),
        }
    }
}

/// The map a call may change, if it may.
fn map_mut(state: &mut HostState, id: i32) -> Option<MapMut<'_>> {
    let HostState { call, undo, .. } = state;
    match id {
        abi::map::REQUEST_HEADERS if call.request_writable => call
            .request
            .as_mut()
            .map(|h| MapMut::Request(Arc::make_mut(h))),
        abi::map::RESPONSE_HEADERS => match &mut call.response {
            ResponseView::Edit { headers, .. } => Some(MapMut::Response(ResponseEdit {
                headers,
                undo: undo.as_mut(),
            })),
            _ => None,
        },
        _ => None,
    }
}

/// A header a plugin may set: a valid name (in lower case) and value, not a pseudo-header, not
/// one the gateway owns (framing, hop-by-hop, forwarding, the request id: the list policies
/// are refused, `wire::headers::is_gateway_owned_str`).
fn settable(name: &str, value: &[u8]) -> bool {
    valid_name(name) && valid_value(value) && !is_gateway_owned_str(name)
}

/// Whether `pairs`, replacing the map `id` whole (`proxy_set_header_map_pairs`), leaves every
/// header the gateway owns as it is: the SDKs' "read all, change one, write all" gives back
/// the client's `X-Forwarded-For` or `Content-Length` unchanged, which is no attempt to set it.
fn keeps_gateway_owned(call: &CallData, id: i32, pairs: &Pairs) -> bool {
    let Some(current) = map(call, id) else {
        return true;
    };
    HOP_BY_HOP.iter().chain(&GATEWAY_OWNED).all(|&name| {
        let given = pairs.iter().filter(|(k, _)| k == name).map(|(_, v)| &v[..]);
        current.joined(name) == headers::joined(given)
    })
}

/// What `http::HeaderName::from_bytes` accepts, for a name already in lower case (an RFC 9110
/// token), checked without copying it.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| TOKEN[usize::from(b)])
}

/// The bytes of a header name in lower case: `a-z`, `0-9`, ``!#$%&'*+-.^_`|~``.
static TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    t
};

/// What `http::HeaderValue::from_bytes` accepts, checked without copying it.
fn valid_value(value: &[u8]) -> bool {
    value.iter().all(|&b| (b >= 32 && b != 127) || b == b'\t')
}

/// Reads a header name (lower-cased) and a value (`vl` 0: none) from the plugin's memory into
/// the instance's scratch buffer, and runs `f` on them with the host state: no allocation per
/// host call. The call is charged for the name and the value and for the header map `id`
/// (which the host scans or copies). `Ok(None)` when the memory does not hold them or the name
/// is not UTF-8.
fn with_name_value<R>(
    env: &mut FunctionEnvMut<'_, HostState>,
    id: i32,
    (kp, kl): (i32, i32),
    (vp, vl): (i32, i32),
    f: impl FnOnce(&mut HostState, &str, &[u8]) -> R,
) -> Result<Option<R>, RuntimeError> {
    let (kl, vl) = (kl as u32 as usize, vl as u32 as usize);
    // Nothing is charged or allocated for a range the plugin's memory cannot hold.
    if kl > abi::MAX_TRANSFER || vl > abi::MAX_TRANSFER || !fits(env, kp, kl) || !fits(env, vp, vl)
    {
        return Ok(None);
    }
    let map_size = map(&env.data().call, id).map_or(0, |m| m.serialized_len());
    charge(env, kl + vl + map_size)?;
    let (state, store) = env.data_and_store_mut();
    let Some(memory) = state.memory.as_ref() else {
        return Ok(None);
    };
    let view = memory.view(&store);
    let mut buf = std::mem::take(&mut state.scratch);
    buf.clear();
    buf.resize(kl + vl, 0);
    let read = view.read(u64::from(kp as u32), &mut buf[..kl]).is_ok()
        && view.read(u64::from(vp as u32), &mut buf[kl..]).is_ok();
    buf[..kl].make_ascii_lowercase();
    let out = match std::str::from_utf8(&buf[..kl]) {
        Ok(k) if read => Some(f(state, k, &buf[kl..])),
        _ => None,
    };
    if buf.capacity() <= 64 * 1024 {
        state.scratch = buf;
    }
    Ok(out)
}

enum Edit {
    Add,
    Replace,
}

fn edit(
    mut env: FunctionEnvMut<'_, HostState>,
    how: Edit,
    id: i32,
    kp: i32,
    kl: i32,
    vp: i32,
    vl: i32,
) -> Result<i32, RuntimeError> {
    let done = with_name_value(&mut env, id, (kp, kl), (vp, vl), |state, k, v| {
        if !settable(k, v) {
            return status::BAD_ARGUMENT;
        }
        let Some(mut m) = map_mut(state, id) else {
            return status::BAD_ARGUMENT;
        };
        match how {
            Edit::Add => m.add(k, v),
            Edit::Replace => m.replace(k, v),
        }
        status::OK
    })?;
    Ok(done.unwrap_or(status::INVALID_MEMORY_ACCESS))
}

// ---- the imports ----------------------------------------------------------------------------

fn imports(store: &mut Store, env: &FunctionEnv<HostState>, module: &wasmer::Module) -> Imports {
    let mut i = Imports::new();
    // Host functions outside the subset that the module imports (`abi::Import::Stub`): typed
    // as the module declares them, answering `UNIMPLEMENTED`.
    for imp in module.imports() {
        let (wasmer::ExternType::Function(ty), Ok(abi::Import::Stub)) =
            (imp.ty(), abi::check_import(imp.module(), imp.name()))
        else {
            continue;
        };
        let results: Vec<Value> = ty
            .results()
            .iter()
            .map(|t| match t {
                wasmer::Type::I32 => Value::I32(status::UNIMPLEMENTED),
                wasmer::Type::I64 => Value::I64(0),
                wasmer::Type::F32 => Value::F32(0.0),
                wasmer::Type::F64 => Value::F64(0.0),
                _ => Value::I32(0),
            })
            .collect();
        let name = imp.name().to_owned();
        let stub = Function::new_with_env(store, env, ty.clone(), move |env, _args| {
            tracing::debug!(
                plugin = &*env.data().plugin,
                "{name} is not supported by RustyGate: answered UNIMPLEMENTED"
            );
            Ok(results.clone())
        });
        i.define(imp.module(), imp.name(), stub);
    }
    macro_rules! f {
        ($body:expr) => {
            Function::new_typed_with_env(store, env, $body)
        };
    }
    let e = "env";
    i.define(
        e,
        "proxy_log",
        f!(|mut env: FunctionEnvMut<HostState>,
            level: i32,
            p: i32,
            l: i32|
         -> Result<i32, RuntimeError> {
            let len = l as u32 as usize;
            if len > abi::MAX_TRANSFER {
                return Ok(status::INVALID_MEMORY_ACCESS);
            }
            // At most a line's worth is read, and charged whether or not the line is logged.
            let take = len.min(log::MAX_LINE);
            let d = env.data();
            if !log::admit(&d.plugin, route(d)) {
                if !fits(&env, p, take) {
                    return Ok(status::INVALID_MEMORY_ACCESS);
                }
                charge(&mut env, take)?;
                return Ok(status::OK);
            }
            let Some(msg) = read(&mut env, p, take as i32)? else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            let d = env.data();
            log::line(&d.plugin, route(d), level, &msg, len - take);
            Ok(status::OK)
        }),
    );
    i.define(
        e,
        "proxy_get_log_level",
        f!(|env: FunctionEnvMut<HostState>, ret: i32| -> i32 {
            // INFO: debug and trace lines are not worth a call across the boundary.
            if write_u32(&env, ret, 2) {
                status::OK
            } else {
                status::INVALID_MEMORY_ACCESS
            }
        }),
    );
    i.define(
        e,
        "proxy_set_effective_context",
        f!(|_env: FunctionEnvMut<HostState>, _ctx: i32| -> i32 { status::OK }),
    );
    i.define(
        e,
        "proxy_get_buffer_bytes",
        f!(|mut env: FunctionEnvMut<HostState>,
            id: i32,
            start: i32,
            max: i32,
            rp: i32,
            rs: i32|
         -> Result<i32, RuntimeError> {
            let Some(buf) = buffer(env.data(), id) else {
                return Ok(status::NOT_FOUND);
            };
            let start = start as u32 as usize;
            let end = start.saturating_add(max as u32 as usize).min(buf.len());
            let Some(slice) = buf.get(start..end) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let most = body_limit(env.data()).unwrap_or(abi::MAX_TRANSFER);
            give_at_most(&mut env, slice, rp, rs, most)
        }),
    );
    i.define(
        e,
        "proxy_get_buffer_status",
        f!(
            |env: FunctionEnvMut<HostState>, id: i32, rl: i32, rf: i32| -> i32 {
                let Some(len) = buffer(env.data(), id).map(|b| b.len()) else {
                    return status::NOT_FOUND;
                };
                if write_u32(&env, rl, len as u32) && write_u32(&env, rf, 0) {
                    status::OK
                } else {
                    status::INVALID_MEMORY_ACCESS
                }
            }
        ),
    );
    i.define(
        e,
        "proxy_set_buffer_bytes",
        // Only the body in view is writable; configurations are read-only.
        f!(|mut env: FunctionEnvMut<HostState>,
            id: i32,
            start: i32,
            size: i32,
            p: i32,
            l: i32|
         -> Result<i32, RuntimeError> {
            let Some(most) = body_limit(env.data()) else {
                return Ok(status::NOT_FOUND);
            };
            let Some(value) = read_at_most(&mut env, p, l, most)? else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            let Some(len) = env
                .data()
                .call
                .body
                .as_ref()
                .filter(|b| b.id == id)
                .map(|b| b.data.len())
            else {
                return Ok(status::NOT_FOUND);
            };
            // The new buffer is a copy of the body with the value in it.
            charge(&mut env, len)?;
            let Some(body) = env.data_mut().call.body.as_mut().filter(|b| b.id == id) else {
                return Ok(status::NOT_FOUND);
            };
            let new = abi::splice(
                &body.data,
                start as u32 as usize,
                size as u32 as usize,
                &value,
            );
            if new.len() > body.limit {
                // The route's body limit bounds what a plugin can make of a body too.
                return Ok(status::BAD_ARGUMENT);
            }
            body.data = bytes::Bytes::from(new);
            body.edited = true;
            Ok(status::OK)
        }),
    );
    i.define(
        e,
        "proxy_get_header_map_pairs",
        f!(|mut env: FunctionEnvMut<HostState>,
            id: i32,
            rp: i32,
            rs: i32|
         -> Result<i32, RuntimeError> {
            let Some(size) = map(&env.data().call, id).map(|m| m.serialized_len()) else {
                return Ok(status::NOT_FOUND);
            };
            // Serialising is charged as much again as the copy `give` charges.
            charge(&mut env, size)?;
            let Some(bytes) = map(&env.data().call, id).map(|m| m.serialize()) else {
                return Ok(status::NOT_FOUND);
            };
            give(&mut env, &bytes, rp, rs)
        }),
    );
    i.define(
        e,
        "proxy_get_header_map_size",
        f!(
            |mut env: FunctionEnvMut<HostState>, id: i32, rs: i32| -> Result<i32, RuntimeError> {
                let Some(size) = map(&env.data().call, id).map(|m| m.serialized_len()) else {
                    return Ok(status::NOT_FOUND);
                };
                // Measuring a response's map walks it.
                charge(&mut env, size)?;
                if write_u32(&env, rs, size as u32) {
                    Ok(status::OK)
                } else {
                    Ok(status::INVALID_MEMORY_ACCESS)
                }
            }
        ),
    );
    i.define(
        e,
        "proxy_set_header_map_pairs",
        f!(|mut env: FunctionEnvMut<HostState>,
            id: i32,
            p: i32,
            l: i32|
         -> Result<i32, RuntimeError> {
            let Some(bytes) = read(&mut env, p, l)? else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            // The map it replaces is walked (and, for the request, copied) too.
            let size = map(&env.data().call, id).map_or(0, |m| m.serialized_len());
            charge(&mut env, size)?;
            let Some(pairs) = abi::deserialize_map(&bytes) else {
                return Ok(status::BAD_ARGUMENT);
            };
            // A header the gateway owns may only be given back as it is.
            if pairs
                .iter()
                .any(|(k, v)| !k.starts_with(':') && !is_gateway_owned_str(k) && !settable(k, v))
                || !keeps_gateway_owned(&env.data().call, id, &pairs)
            {
                return Ok(status::BAD_ARGUMENT);
            }
            let Some(mut m) = map_mut(env.data_mut(), id) else {
                return Ok(status::BAD_ARGUMENT);
            };
            // Pseudo-headers stay as they are; the rest is replaced.
            m.set_all(&pairs);
            Ok(status::OK)
        }),
    );
    i.define(
        e,
        "proxy_get_header_map_value",
        f!(|mut env: FunctionEnvMut<HostState>,
            id: i32,
            kp: i32,
            kl: i32,
            rp: i32,
            rs: i32|
         -> Result<i32, RuntimeError> {
            // Several values read as one, comma-separated, as HTTP allows.
            let found = with_name_value(&mut env, id, (kp, kl), (0, 0), |state, k, _| {
                map(&state.call, id).map(|m| m.joined(k))
            })?;
            match found {
                None => Ok(status::INVALID_MEMORY_ACCESS),
                Some(None | Some(None)) => Ok(status::NOT_FOUND),
                Some(Some(Some(v))) => give(&mut env, &v, rp, rs),
            }
        }),
    );
    i.define(
        e,
        "proxy_add_header_map_value",
        f!(|env: FunctionEnvMut<HostState>,
            id: i32,
            kp: i32,
            kl: i32,
            vp: i32,
            vl: i32|
         -> Result<i32, RuntimeError> { edit(env, Edit::Add, id, kp, kl, vp, vl) }),
    );
    i.define(
        e,
        "proxy_replace_header_map_value",
        f!(|env: FunctionEnvMut<HostState>,
            id: i32,
            kp: i32,
            kl: i32,
            vp: i32,
            vl: i32|
         -> Result<i32, RuntimeError> { edit(env, Edit::Replace, id, kp, kl, vp, vl) }),
    );
    i.define(
        e,
        "proxy_remove_header_map_value",
        f!(|mut env: FunctionEnvMut<HostState>,
            id: i32,
            kp: i32,
            kl: i32|
         -> Result<i32, RuntimeError> {
            let done = with_name_value(&mut env, id, (kp, kl), (0, 0), |state, k, _| {
                // `content-length` may go (what the SDKs' body examples do before changing
                // a body; the gateway frames bodies itself), never be set.
                if !settable(k, b"") && k != "content-length" {
                    return status::BAD_ARGUMENT;
                }
                let Some(mut m) = map_mut(state, id) else {
                    return status::BAD_ARGUMENT;
                };
                m.remove(k);
                status::OK
            })?;
            Ok(done.unwrap_or(status::INVALID_MEMORY_ACCESS))
        }),
    );
    i.define(
        e,
        "proxy_send_local_response",
        f!(|mut env: FunctionEnvMut<HostState>,
            code: i32,
            _dp: i32,
            _dl: i32,
            bp: i32,
            bl: i32,
            hp: i32,
            hl: i32,
            _grpc: i32|
         -> Result<i32, RuntimeError> {
            let (Some(body), Some(h)) = (read(&mut env, bp, bl)?, read(&mut env, hp, hl)?) else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            let Some(headers) = abi::deserialize_map(&h) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let call = &mut env.data_mut().call;
            // From a headers or a body callback, not from on_log.
            let may_answer = call.request_writable
                || matches!(call.response, ResponseView::Edit { .. })
                || call.body.is_some();
            if !(200..=599).contains(&code)
                || !may_answer
                || headers.iter().any(|(k, v)| !settable(k, v))
            {
                return Ok(status::BAD_ARGUMENT);
            }
            call.local = Some(Box::new(LocalResponse {
                status: code as u16,
                headers,
                body,
            }));
            Ok(status::OK)
        }),
    );
    for name in [
        "proxy_continue_request",
        "proxy_continue_response",
        "proxy_done",
    ] {
        // Nothing is ever paused, so continuing is a no-op.
        i.define(
            e,
            name,
            f!(|_env: FunctionEnvMut<HostState>| -> i32 { status::OK }),
        );
    }
    i.define(
        e,
        "proxy_continue_stream",
        f!(|_env: FunctionEnvMut<HostState>, _stream: i32| -> i32 { status::OK }),
    );
    i.define(
        e,
        "proxy_get_property",
        f!(|mut env: FunctionEnvMut<HostState>,
            pp: i32,
            pl: i32,
            rp: i32,
            rs: i32|
         -> Result<i32, RuntimeError> {
            let Some(path) = read(&mut env, pp, pl)? else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            let Some(path) = abi::property_path(&path) else {
                return Ok(status::NOT_FOUND);
            };
            let d = env.data();
            let value = match &d.call.props {
                Some(p) => p.get(&path, &d.plugin),
                None if path == "plugin_name" => Some(d.plugin.as_bytes().to_vec()),
                None => None,
            };
            match value {
                Some(v) => give(&mut env, &v, rp, rs),
                None => Ok(status::NOT_FOUND),
            }
        }),
    );
    i.define(
        e,
        "proxy_get_current_time_nanoseconds",
        f!(|env: FunctionEnvMut<HostState>, ret: i32| -> i32 {
            if write(&env, ret, &now_nanos().to_le_bytes()) {
                status::OK
            } else {
                status::INVALID_MEMORY_ACCESS
            }
        }),
    );

    let w = "wasi_snapshot_preview1";
    i.define(
        w,
        "fd_write",
        f!(|mut env: FunctionEnvMut<HostState>,
            fd: i32,
            iovs: i32,
            n: i32,
            ret: i32|
         -> Result<i32, RuntimeError> {
            if fd != 1 && fd != 2 {
                return Ok(errno::BADF);
            }
            let mut text = Vec::new();
            for k in 0..n.clamp(0, 64) {
                let Some(iov) = read(&mut env, iovs.wrapping_add(k * 8), 8)? else {
                    return Ok(errno::FAULT);
                };
                let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                let room = (abi::MAX_TRANSFER - text.len()) as i32;
                let Some(b) = read(&mut env, ptr, len.clamp(0, room))? else {
                    return Ok(errno::FAULT);
                };
                text.extend_from_slice(&b);
            }
            let level = if fd == 2 { 3 } else { 2 };
            let d = env.data();
            for line in String::from_utf8_lossy(&text).lines().take(64) {
                if log::admit(&d.plugin, route(d)) {
                    log::line(&d.plugin, route(d), level, line.as_bytes(), 0);
                }
            }
            if write_u32(&env, ret, text.len() as u32) {
                Ok(errno::SUCCESS)
            } else {
                Ok(errno::FAULT)
            }
        }),
    );
    i.define(
        w,
        "clock_time_get",
        f!(
            |env: FunctionEnvMut<HostState>, _id: i32, _precision: i64, ret: i32| -> i32 {
                if write(&env, ret, &now_nanos().to_le_bytes()) {
                    errno::SUCCESS
                } else {
                    errno::FAULT
                }
            }
        ),
    );
    i.define(
        w,
        "random_get",
        f!(
            |mut env: FunctionEnvMut<HostState>, p: i32, l: i32| -> Result<i32, RuntimeError> {
                let len = l as u32 as usize;
                if len > abi::MAX_TRANSFER {
                    return Ok(errno::INVAL);
                }
                // The range is checked and the fill charged before any byte is made; the bytes go
                // straight into the plugin's memory, a block at a time, with no buffer of `len`.
                if !fits(&env, p, len) {
                    return Ok(errno::FAULT);
                }
                charge(&mut env, len)?;
                const BLOCK: usize = 4096;
                let mut block = [0u8; BLOCK];
                let mut at = p as u32 as usize;
                for n in (0..len).step_by(BLOCK).map(|from| (len - from).min(BLOCK)) {
                    rand::RngCore::fill_bytes(&mut rand::rng(), &mut block[..n]);
                    if !write(&env, at as i32, &block[..n]) {
                        return Ok(errno::FAULT);
                    }
                    at += n;
                }
                Ok(errno::SUCCESS)
            }
        ),
    );
    for name in ["environ_sizes_get", "args_sizes_get"] {
        // No environment and no arguments: a plugin sees nothing of the gateway's process.
        i.define(
            w,
            name,
            f!(
                |env: FunctionEnvMut<HostState>, count: i32, size: i32| -> i32 {
                    if write_u32(&env, count, 0) && write_u32(&env, size, 0) {
                        errno::SUCCESS
                    } else {
                        errno::FAULT
                    }
                }
            ),
        );
    }
    for name in ["environ_get", "args_get"] {
        i.define(
            w,
            name,
            f!(|_env: FunctionEnvMut<HostState>, _a: i32, _b: i32| -> i32 { errno::SUCCESS }),
        );
    }
    i.define(
        w,
        "proc_exit",
        f!(
            |_env: FunctionEnvMut<HostState>, code: i32| -> Result<(), RuntimeError> {
                Err(RuntimeError::new(format!("proc_exit({code})")))
            }
        ),
    );
    i
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The route of the current call, for its log lines; `""` outside a request (start-up).
fn route(state: &HostState) -> &str {
    state.call.props.as_deref().map_or("", Props::route)
}
