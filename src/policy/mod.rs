//! Rhai policies: engine setup and limits (`engine`), the host API (`api`), compiling a script
//! once per snapshot, and running its hooks for one request.
//!
//! ```text
//! policies/x.rhai ──► compile (in compile::compile, once per snapshot) ──► Arc<Policy> in Route
//! request ──► on_request(req) ──► forward ──► on_response(req, res) ──► client
//! ```
//! A `Policy` holds an AST and the snapshot's engine; both are immutable and shared by every
//! worker without locks. Each hook call gets a fresh scope, a fresh `req`/`res`, the snapshot's
//! hard limits and a wall-clock budget. Any error or exceeded limit fails the request closed.
//! This module knows nothing about actix or sockets: the proxy handler and `rustygate test` run
//! hooks through `crate::decide`.

pub mod api;
mod calls;
mod direct;
pub mod engine;
mod native_calls;
mod regex_cache;
mod sizes;

use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rhai::{
    AST, ASTNode, Caches, Dynamic, Engine, Expr, ImmutableString, Map, Position, Scope, Stmt,
};

pub use api::{
    ClientHeaders, HeaderEdit, Req, RequestInit, RequestState, Res, ResponseState, Verdict,
};
pub use engine::{Limits, Reason};

/// A compiled policy script.
pub struct Policy {
    /// Repo-relative path, as the route names it.
    pub path: Arc<str>,
    ast: AST,
    /// `on_request` and `on_response`, when the script defines them (see [`Hook`]).
    hooks: [Option<Hook>; 2],
    /// Unique per compiled policy: keys the per-thread resolution caches.
    id: u64,
    /// The script assigns into an index or a property (`m[k] = v`, `m.k = v`).
    grows_maps: bool,
    /// The script may call `print` or `debug`, whose log events name the route and script.
    prints: bool,
    source: ImmutableString,
    engine: Arc<Engine>,
    budget: Duration,
}

/// A hook as the gateway runs it: its body's statements evaluated directly in a scope that holds
/// its parameters, with the script's functions in reach. That is what Rhai does when the
/// function is called, minus the call itself (resolving the name, a new frame, moving the
/// arguments), and it lets each thread keep its resolution cache across calls (see
/// [`with_thread_state`]). Strict variables already limit a body to its parameters and its own
/// `let`s; `return` ends the body with its value, and `exit()` fails (see [`engine::build`]).
///
/// A body simple enough also has a direct form (see [`direct`]), which runs instead.
#[derive(Debug)]
struct Hook {
    params: Vec<ImmutableString>,
    body: Vec<Stmt>,
    direct: Option<direct::Direct>,
}

impl Hook {
    fn find(ast: &AST, name: &str, arity: usize, limits: &Limits) -> Option<Hook> {
        let def = ast
            .iter_fn_def()
            .find(|f| f.name == name && f.params.len() == arity)?;
        // The body's top-level statements. Walking an AST of this one function keeps out the
        // bodies of closures it defines, which Rhai stores as functions of their own.
        let mut module = rhai::Module::new();
        module.set_script_fn(def.clone());
        let only = AST::new_from_module(module);
        let mut body = Vec::new();
        only.walk(&mut |path: &[ASTNode]| {
            if let [ASTNode::Stmt(s)] = path {
                body.push((*s).clone());
            }
            true
        });
        let script_fns = ast.iter_functions().map(|f| f.name.to_owned()).collect();
        let params: Vec<&str> = def.params.iter().map(|p| p.as_str()).collect();
        native_calls::rewrite(&mut body, &script_fns, &params);
        let direct =
            direct::Direct::compile(&body, &params, limits.max_operations, engine::CLOCK_EVERY);
        Some(Hook {
            params: def.params.iter().cloned().collect(),
            body,
            direct,
        })
    }
}

impl Policy {
    pub fn has_on_request(&self) -> bool {
        self.hooks[0].is_some()
    }

    pub fn has_on_response(&self) -> bool {
        self.hooks[1].is_some()
    }
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy").field("path", &self.path).finish()
    }
}

/// A policy bound to a route, with the route's `policy_config`.
#[derive(Debug, Clone)]
pub struct RoutePolicy {
    pub policy: Arc<Policy>,
    /// `policy_config`, read-only to the script as `req.config`.
    pub config: Arc<Map>,
    /// The route's name, for logs.
    pub route: Arc<str>,
}

/// A problem in a script found while compiling it.
#[derive(Debug, Clone)]
pub struct ScriptError {
    pub code: &'static str,
    pub message: String,
    /// Byte range in the script.
    pub span: Range<usize>,
    pub label: &'static str,
    pub help: Option<String>,
}

/// The hooks a policy may define, with their parameters.
const HOOKS: [(&str, usize, &str); 2] = [
    ("on_request", 1, "fn on_request(req)"),
    ("on_response", 2, "fn on_response(req, res)"),
];

static NEXT_POLICY_ID: AtomicU64 = AtomicU64::new(0);

/// Compiles `source` (the file at repo path `path`) with the snapshot's engine.
pub fn compile(
    engine: &Arc<Engine>,
    limits: &Limits,
    path: &str,
    source: &str,
) -> Result<Policy, Vec<ScriptError>> {
    let mut ast = match engine.compile(source) {
        Ok(ast) => ast,
        Err(e) => {
            let (kind, pos) = (e.err_type(), e.position());
            let (code, help) = match kind {
                rhai::ParseErrorType::VariableUndefined(_) => (
                    "policy-unknown-variable",
                    Some("functions only see their parameters and the variables they declare; request data is on `req` (e.g. `req.config`, `req.ctx`)".to_owned()),
                ),
                rhai::ParseErrorType::ExprTooDeep => (
                    "policy-too-deep",
                    Some(format!(
                        "expressions nest at most {} deep (`[policy_limits] max_expr_depth`)",
                        limits.max_expr_depth
                    )),
                ),
                rhai::ParseErrorType::LiteralTooLarge(..) => (
                    "policy-too-large",
                    Some(
                        "raise `[policy_limits] max_array_size` / `max_map_size` / `max_string_size` in gateway.toml if this is intended".into(),
                    ),
                ),
                _ => ("policy-syntax", None),
            };
            return Err(vec![ScriptError {
                code,
                message: format!("{path}: {kind}"),
                span: span_at(source, pos),
                label: "here",
                help,
            }]);
        }
    };
    ast.set_source(path);
    let mut errors = Vec::new();
    let mut found = [false; 2];
    for f in ast.iter_functions() {
        for (i, (name, arity, shape)) in HOOKS.iter().enumerate() {
            if f.name != *name {
                continue;
            }
            if f.params.len() == *arity {
                found[i] = true;
            } else {
                errors.push(ScriptError {
                    code: "policy-hook-arity",
                    message: format!(
                        "{path}: `{name}` takes {arity} parameter(s), this one takes {}",
                        f.params.len()
                    ),
                    span: fn_span(source, name),
                    label: "wrong parameters",
                    help: Some(format!("write `{shape}`")),
                });
            }
        }
    }
    if errors.is_empty() && !found.iter().any(|f| *f) {
        errors.push(ScriptError {
            code: "policy-no-hooks",
            message: format!("{path} defines neither `on_request` nor `on_response`"),
            span: 0..0,
            label: "no hook in this script",
            help: Some(
                "define `fn on_request(req)` and/or `fn on_response(req, res)`; top-level code is not run per request".into(),
            ),
        });
    }
    if errors.is_empty() {
        errors.extend(calls::unknown(engine, &ast).into_iter().map(|c| {
            let shown = if c.method {
                format!(".{}(..)", c.name)
            } else {
                format!("{}(..)", c.name)
            };
            let help = match c.known_args.as_slice() {
                [] => {
                    "see the host API in docs/policies.md; a script's own functions are defined with `fn`".to_owned()
                }
                known => format!(
                    "`{}` takes {} argument(s){}",
                    c.name,
                    known.iter().map(usize::to_string).collect::<Vec<_>>().join(" or "),
                    if c.method { " after the value it is called on" } else { "" }
                ),
            };
            ScriptError {
                code: "policy-unknown-function",
                message: format!(
                    "{path}: no function `{shown}` takes {} argument(s)",
                    c.args
                ),
                span: span_at(source, c.pos),
                label: "unknown function",
                help: Some(help),
            }
        }));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let grows_maps = assigns_into_containers(&ast);
    let prints = names_print(&ast);
    let hooks = HOOKS.map(|(name, arity, _)| Hook::find(&ast, name, arity, limits));
    for ((hook, ..), code) in HOOKS.iter().zip(&hooks) {
        if let Some(code) = code {
            tracing::debug!(
                target: "rustygate::policy",
                script = path,
                hook,
                runs_directly = code.direct.is_some(),
                "policy hook compiled"
            );
        }
    }
    Ok(Policy {
        path: Arc::from(path),
        ast,
        hooks,
        id: NEXT_POLICY_ID.fetch_add(1, Ordering::Relaxed),
        grows_maps,
        prints,
        source: path.into(),
        engine: Arc::clone(engine),
        budget: limits.budget,
    })
}

/// Whether `ast` assigns into an index or a property anywhere (hooks, helpers, closures).
fn assigns_into_containers(ast: &AST) -> bool {
    let mut found = false;
    ast.walk(&mut |path: &[ASTNode]| {
        if let Some(ASTNode::Stmt(Stmt::Assignment(a))) = path.last()
            && matches!(a.1.lhs, Expr::Index(..) | Expr::Dot(..))
        {
            found = true;
        }
        !found
    });
    found
}

/// Whether `ast` calls `print` or `debug` (they are keywords: `Fn("print")` is refused).
fn names_print(ast: &AST) -> bool {
    let mut found = false;
    ast.walk(&mut |path: &[ASTNode]| {
        let name = match path.last() {
            Some(ASTNode::Expr(Expr::FnCall(c, _) | Expr::MethodCall(c, _))) => {
                Some(c.name.as_str())
            }
            Some(ASTNode::Stmt(Stmt::FnCall(c, _))) => Some(c.name.as_str()),
            _ => None,
        };
        found = matches!(name, Some("print" | "debug"));
        !found
    });
    found
}

/// The byte range of a Rhai position (1-based line, 1-based character column) in `source`.
fn span_at(source: &str, pos: Position) -> Range<usize> {
    let Some(line) = pos.line() else {
        return 0..0;
    };
    let col = pos.position().unwrap_or(1);
    let line_start: usize = source
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    let line_text = source[line_start.min(source.len())..]
        .split('\n')
        .next()
        .unwrap_or("");
    let offset = line_text
        .char_indices()
        .nth(col.saturating_sub(1))
        .map(|(i, _)| i)
        .unwrap_or(line_text.len());
    let start = line_start + offset;
    let end = line_text[offset..]
        .chars()
        .next()
        .map(|c| start + c.len_utf8())
        .unwrap_or(start);
    start..end
}

/// Where `fn name` is written, for hook diagnostics.
fn fn_span(source: &str, name: &str) -> Range<usize> {
    let needle = format!("fn {name}");
    source
        .find(&needle)
        .map(|i| i + 3..i + 3 + name.len())
        .unwrap_or(0..0)
}

/// A hook that failed or ran over a limit. The request fails closed with a 500.
#[derive(Debug, Clone)]
pub struct PolicyFailure {
    pub route: Arc<str>,
    pub script: Arc<str>,
    pub hook: &'static str,
    pub reason: Reason,
    /// Line in the script, when Rhai knows it.
    pub line: Option<usize>,
    pub message: String,
}

impl PolicyFailure {
    /// The log event every failure gets (the handler and `rustygate test` both report this way).
    pub fn log(&self, request_id: &str) {
        tracing::error!(
            target: "rustygate::policy",
            request_id,
            route = self.route.as_ref(),
            script = self.script.as_ref(),
            hook = self.hook,
            line = self.line.unwrap_or(0),
            reason = self.reason.as_str(),
            error = self.message.as_str(),
            "policy failed; request refused"
        );
    }
}

impl std::fmt::Display for PolicyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.script)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        write!(
            f,
            ": {} failed ({}): {}",
            self.hook,
            self.reason.as_str(),
            self.message
        )
    }
}

impl RoutePolicy {
    fn failure(
        &self,
        hook: &'static str,
        reason: Reason,
        line: Option<usize>,
        message: String,
    ) -> PolicyFailure {
        PolicyFailure {
            route: Arc::clone(&self.route),
            script: Arc::clone(&self.policy.path),
            hook,
            reason,
            line,
            message,
        }
    }

    /// Runs hook `i` of [`HOOKS`] on `req` (and `res`) under the limits; `Ok(Some)` when it
    /// returned a decision.
    fn call(
        &self,
        i: usize,
        req: &Req,
        res: Option<&Res>,
    ) -> Result<Option<Verdict>, PolicyFailure> {
        let (hook, p) = (HOOKS[i].0, &self.policy);
        let Some(code) = &p.hooks[i] else {
            return Ok(None);
        };
        let out = match &code.direct {
            Some(d) => d.run(&p.engine, direct::Args { req, res }),
            None => self.interpret(code, req, res),
        };
        match out {
            Ok(v) if v.is_unit() => Ok(None),
            Ok(v) if v.is::<Verdict>() => Ok(v.try_cast::<Verdict>()),
            Ok(v) => Err(self.failure(
                hook,
                Reason::InvalidAction,
                None,
                format!(
                    "{hook} returned a value of type `{}`; return deny(...), redirect(...), respond(...) or nothing",
                    v.type_name()
                ),
            )),
            Err(e) => {
                let (reason, pos, message) = engine::classify(&e);
                Err(self.failure(hook, reason, pos.line(), message))
            }
        }
    }

    /// Runs a hook's body in Rhai.
    fn interpret(
        &self,
        code: &Hook,
        req: &Req,
        res: Option<&Res>,
    ) -> Result<Dynamic, Box<rhai::EvalAltResult>> {
        let p = &self.policy;
        let who = p.prints.then_some((&self.route, &p.path));
        let _guard = engine::CallGuard::enter(p.budget, who, p.grows_maps);
        let mut global = p.engine.new_global_runtime_state();
        global.lib.push(p.ast.shared_lib().clone());
        global.source = Some(p.source.clone());
        let args = [
            Dynamic::from(req.clone()),
            res.map(|r| Dynamic::from(r.clone()))
                .unwrap_or(Dynamic::UNIT),
        ];
        with_thread_state(p.id, &code.params, args, |caches, scope| {
            // `eval_statements_raw` is the one call that takes a resolution cache the caller
            // keeps; Rhai marks it deprecated without a replacement yet. It turns `return` into
            // the body's value.
            #[allow(deprecated)]
            p.engine
                .eval_statements_raw(&mut global, caches, scope, &code.body)
        })
    }

    /// Runs `on_request` when the script has it.
    pub fn on_request(&self, req: &Req) -> Result<Option<Verdict>, PolicyFailure> {
        self.call(0, req, None)
    }

    /// Runs `on_response` when the script has it, on `res` (status and headers the client gets).
    pub fn on_response(&self, req: &Req, res: &Res) -> Result<Option<Verdict>, PolicyFailure> {
        self.call(1, req, Some(res))
    }
}

/// Policies whose resolution caches a thread keeps (the oldest goes first).
const CACHED_POLICIES: usize = 64;

/// What a thread keeps between hook calls.
#[derive(Default)]
struct ThreadState {
    /// Rhai resolves each function a script calls (name and argument types) against the
    /// engine and the script, and caches the answer for one call only. The answer never changes
    /// for a compiled policy, so each thread keeps it across calls, keyed by policy id.
    caches: Vec<(u64, Caches)>,
    /// The scope hooks run in; kept to reuse its allocation.
    scope: Scope<'static>,
}

thread_local! {
    static THREAD_STATE: RefCell<ThreadState> = RefCell::new(ThreadState::default());
}

/// Runs `f` with this thread's resolution cache for policy `id` and a scope holding `args`
/// named `params` (a hook's body finds its parameters at the end of the scope, in order).
fn with_thread_state<T>(
    id: u64,
    params: &[ImmutableString],
    args: [Dynamic; 2],
    f: impl FnOnce(&mut Caches, &mut Scope<'static>) -> T,
) -> T {
    let run = |caches: &mut Caches, scope: &mut Scope<'static>| {
        scope.clear();
        for (name, value) in params.iter().zip(args) {
            scope.push_dynamic(name.as_str(), value);
        }
        let out = f(caches, scope);
        // Drop the request and response now, not with the next call on this thread.
        scope.clear();
        // A failed call can leave nested cache levels behind; keep only the hook's own.
        caches.rewind_fn_resolution_caches(caches.fn_resolution_caches_len().min(1));
        out
    };
    THREAD_STATE.with(|state| match state.try_borrow_mut() {
        Ok(mut state) => {
            let ThreadState { caches, scope } = &mut *state;
            let i = match caches.iter().position(|(k, _)| *k == id) {
                Some(i) => i,
                None => {
                    if caches.len() >= CACHED_POLICIES {
                        caches.remove(0);
                    }
                    caches.push((id, Caches::new()));
                    caches.len() - 1
                }
            };
            run(&mut caches[i].1, scope)
        }
        // A hook running inside another one on this thread (nothing does this today) gets
        // state of its own.
        Err(_) => run(&mut Caches::new(), &mut Scope::new()),
    })
}

/// The engine for a snapshot's policies.
pub fn engine(limits: &Limits) -> Arc<Engine> {
    Arc::new(engine::build(limits))
}

/// Compiles (and caches) a regular expression written as a literal in a script.
pub fn check_regex(pattern: &str) -> Result<(), regex::Error> {
    regex_cache::get(pattern).map(|_| ())
}

/// Converts a JSON object (claims, `policy_config`) into a Rhai map.
pub fn to_map(v: &serde_json::Map<String, serde_json::Value>) -> Map {
    rhai::serde::to_dynamic(v)
        .ok()
        .and_then(|d| d.try_cast::<Map>())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
