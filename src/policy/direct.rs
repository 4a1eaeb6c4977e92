//! The direct form of simple hooks: a hook made only of `let`, `if`/`else`, `return`, calls of
//! the host functions in [`HOST_CALLS`] on `req`/`res`, a few string methods, comparisons,
//! `&&`/`||`/`!`, `??`, string `+` and interpolation runs as a small tree of Rust values instead
//! of through Rhai's evaluator.
//! Most header policies look like that, and the interpreter's general machinery (resolving each
//! call by name and argument types, searching the scope by name, counting operations) is most of
//! their cost.
//!
//! The direct form means exactly what Rhai would do with the same body, or it is not built and
//! the hook runs in Rhai:
//! * every value's type is known when the policy is compiled, so each call goes to the one host
//!   function Rhai would pick, and no operator can meet a value it would refuse;
//! * the host functions are the engine's own ([`HOST_CALLS`] is what the engine registers),
//!   errors get the position Rhai gives them, and strings are held to `max_string_size` where
//!   Rhai checks them (results of calls, each step of an interpolation);
//! * there are no loops and no calls of script functions, so the operation count is bounded by
//!   the size of the body: the direct form is only used when that bound is within
//!   `max_operations` and below the point where the budget check would read the clock.
//!
//! Differential tests in `policy::tests` run scripts both ways and compare what they did.

use rhai::{
    ASTFlags, Dynamic, Engine, EvalAltResult, Expr, FnCallExpr, ImmutableString, Position, Stmt,
    Token,
};

use super::api::{HOST_CALLS, HostCall, Req, Res, Returns, Verdict};

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// Most variables a direct hook declares.
const MAX_SLOTS: usize = 16;

/// Rhai counts an operation for each statement and expression it evaluates, each argument, each
/// level of a chain (`req.path.len()`) and each native call, including the `to_string` of a
/// value formatted into a string and the getter behind `req.path`. The compiler counts the same
/// things, generously, and doubles the count for the bound, so a body's bound is never below
/// what Rhai would count (checked against Rhai in `policy::tests`).
const OPS_MARGIN: u64 = 2;

/// The static type of a value in a direct body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Text,
    TextOrUnit,
    Int,
    Bool,
    Unit,
    Decision,
    Req,
    Res,
}

impl From<Returns> for Ty {
    fn from(r: Returns) -> Ty {
        match r {
            Returns::Text => Ty::Text,
            Returns::TextOrUnit => Ty::TextOrUnit,
            Returns::Bool => Ty::Bool,
            Returns::Int => Ty::Int,
            Returns::Unit => Ty::Unit,
            Returns::Decision => Ty::Decision,
        }
    }
}

impl Ty {
    /// Values `==` and `!=` compare by Rhai's built-in rules (no custom type involved).
    fn comparable(self) -> bool {
        matches!(
            self,
            Ty::Text | Ty::TextOrUnit | Ty::Int | Ty::Bool | Ty::Unit
        )
    }
}

/// A value in a direct body.
#[derive(Debug, Clone)]
enum Value {
    Unit,
    Bool(bool),
    Int(i64),
    Text(ImmutableString),
    Decision(Box<Verdict>),
}

impl Value {
    fn from_dynamic(v: Dynamic) -> RhaiResult<Value> {
        // The `is_*` checks first: `as_bool` and friends format the type's name when they fail.
        if v.is_unit() {
            Ok(Value::Unit)
        } else if v.is_string() {
            v.into_immutable_string()
                .map(Value::Text)
                .map_err(|_| mistyped())
        } else if v.is_bool() {
            v.as_bool().map(Value::Bool).map_err(|_| mistyped())
        } else if v.is_int() {
            v.as_int().map(Value::Int).map_err(|_| mistyped())
        } else {
            let name = v.type_name();
            match v.try_cast::<Verdict>() {
                Some(d) => Ok(Value::Decision(Box::new(d))),
                None => Err(format!("internal: a host function returned a `{name}`").into()),
            }
        }
    }

    fn into_dynamic(self) -> Dynamic {
        match self {
            Value::Unit => Dynamic::UNIT,
            Value::Bool(b) => b.into(),
            Value::Int(i) => i.into(),
            Value::Text(s) => s.into(),
            Value::Decision(d) => Dynamic::from(*d),
        }
    }

    /// Rhai's built-in `==` for these types: equal when the types and values are; different
    /// types are never equal.
    fn same(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Unit, Value::Unit) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::Text(a), Value::Text(b)) => a == b,
            _ => false,
        }
    }

    fn text(&self) -> RhaiResult<&str> {
        match self {
            Value::Text(s) => Ok(s.as_str()),
            _ => Err(mistyped()),
        }
    }

    fn int(&self) -> RhaiResult<i64> {
        match self {
            Value::Int(i) => Ok(*i),
            _ => Err(mistyped()),
        }
    }

    fn bool(&self) -> RhaiResult<bool> {
        match self {
            Value::Bool(b) => Ok(*b),
            _ => Err(mistyped()),
        }
    }
}

/// The types are checked when the body is compiled; this is never reached.
#[cold]
fn mistyped() -> Box<EvalAltResult> {
    "internal: a direct hook met a value of an unexpected type".into()
}

#[derive(Debug, Clone, Copy)]
enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
}

/// Rhai's standard string methods a direct body may call, on a string.
#[derive(Debug, Clone, Copy)]
enum TextFn {
    StartsWith,
    EndsWith,
    Contains,
    ToLower,
    ToUpper,
    Len,
}

impl TextFn {
    /// The method `name` taking `args` (after the string), and what it gives back.
    fn find(name: &str, args: &[Ty]) -> Option<(TextFn, Ty)> {
        Some(match (name, args) {
            ("starts_with", [Ty::Text]) => (TextFn::StartsWith, Ty::Bool),
            ("ends_with", [Ty::Text]) => (TextFn::EndsWith, Ty::Bool),
            ("contains", [Ty::Text]) => (TextFn::Contains, Ty::Bool),
            ("to_lower", []) => (TextFn::ToLower, Ty::Text),
            ("to_upper", []) => (TextFn::ToUpper, Ty::Text),
            ("len", []) => (TextFn::Len, Ty::Int),
            _ => return None,
        })
    }

    /// What Rhai's string package does (`packages/string_more.rs`).
    fn apply(self, s: &ImmutableString, args: &[Value]) -> RhaiResult<Value> {
        let arg = || args.first().ok_or_else(mistyped).and_then(Value::text);
        Ok(match self {
            TextFn::StartsWith => Value::Bool(s.starts_with(arg()?)),
            TextFn::EndsWith => Value::Bool(s.ends_with(arg()?)),
            TextFn::Contains => Value::Bool(s.contains(arg()?)),
            TextFn::ToLower if s.is_empty() || s.chars().all(char::is_lowercase) => {
                Value::Text(s.clone())
            }
            TextFn::ToLower => Value::Text(s.to_lowercase().into()),
            TextFn::ToUpper if s.chars().all(char::is_uppercase) => Value::Text(s.clone()),
            TextFn::ToUpper => Value::Text(s.to_uppercase().into()),
            TextFn::Len => Value::Int(i64::try_from(s.chars().count()).unwrap_or(i64::MAX)),
        })
    }
}

/// One `.name` or `.name(..)` of a chain.
#[derive(Debug)]
enum Step {
    /// On `req` or `res`.
    Host(HostCall),
    /// On a string.
    Text(TextFn),
}

/// What a chain starts from.
#[derive(Debug)]
enum Base {
    /// The hook's `req` or `res`.
    Param,
    Value(Box<Ex>),
}

/// Most arguments a chain's calls take together.
const MAX_CHAIN_ARGS: usize = 4;

#[derive(Debug)]
enum Ex {
    Const(Value),
    Local(usize),
    /// A host call; its receiver, if any, is the hook's `req` or `res`.
    Call {
        call: HostCall,
        args: Box<[Ex]>,
        pos: Position,
    },
    Eq(Box<[Ex; 2]>, bool),
    Cmp(Box<[Ex; 2]>, Cmp),
    Not(Box<Ex>),
    And(Box<[Ex]>),
    Or(Box<[Ex]>),
    Coalesce(Box<[Ex]>),
    /// Parts, each with the position a too-long result is reported at.
    Interp(Box<[(Ex, Position)]>),
    /// String `+`.
    Plus(Box<[Ex; 2]>, Position),
    /// `base.step.step(..)`. Rhai evaluates every argument of the chain first, then the base,
    /// then the steps in order; each step takes its arguments from `args` in turn.
    Chain {
        args: Box<[Ex]>,
        base: Base,
        steps: Box<[(Step, usize, Position)]>,
    },
}

#[derive(Debug)]
enum St {
    Let(usize, Ex),
    If(Ex, Box<[St]>, Box<[St]>),
    Eval(Ex),
    Return(Ex),
}

/// A hook's body in direct form.
#[derive(Debug)]
pub(super) struct Direct {
    body: Box<[St]>,
    /// The most Rhai operations the body can take (checked against Rhai by the tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) ops_bound: u64,
}

/// The hook's arguments: `req`, and `res` for `on_response`.
pub(super) struct Args<'a> {
    pub req: &'a Req,
    pub res: Option<&'a Res>,
}

enum Flow {
    Next(Value),
    Return(Value),
}

impl Direct {
    /// The direct form of a hook body (after [`super::native_calls::rewrite`]) whose
    /// parameters are `params` (`req`, then `res`), when it has one.
    pub(super) fn compile(
        body: &[Stmt],
        params: &[&str],
        max_operations: u64,
        clock_every: u64,
    ) -> Option<Direct> {
        let mut c = Compiler {
            names: params
                .iter()
                .zip([Ty::Req, Ty::Res])
                .map(|(p, t)| (p.to_string(), Bound::Param(t)))
                .collect(),
            slots: 0,
            nodes: 0,
        };
        let body = c.block(body)?;
        let bound = c.nodes.saturating_mul(OPS_MARGIN);
        let within = max_operations == 0 || bound <= max_operations;
        (within && bound < clock_every).then_some(Direct {
            body,
            ops_bound: bound,
        })
    }

    /// Runs the body; its value is what the hook returned, as Rhai would give it.
    pub(super) fn run(&self, engine: &Engine, args: Args<'_>) -> RhaiResult<Dynamic> {
        let mut env = Env {
            args,
            max_string: engine.max_string_size(),
            slots: [const { Value::Unit }; MAX_SLOTS],
        };
        match env.block(&self.body)? {
            Flow::Next(v) | Flow::Return(v) => Ok(v.into_dynamic()),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Bound {
    Param(Ty),
    Slot(usize, Ty),
}

struct Compiler {
    /// Names in reach, innermost last.
    names: Vec<(String, Bound)>,
    slots: usize,
    nodes: u64,
}

impl Compiler {
    fn block(&mut self, stmts: &[Stmt]) -> Option<Box<[St]>> {
        let depth = self.names.len();
        let out = stmts
            .iter()
            .map(|s| self.stmt(s))
            .collect::<Option<Box<[St]>>>();
        self.names.truncate(depth);
        out
    }

    fn stmt(&mut self, s: &Stmt) -> Option<St> {
        self.nodes += 1;
        Some(match s {
            // Its value, `()`, is the block's when it comes last.
            Stmt::Noop(_) => St::Eval(Ex::Const(Value::Unit)),
            Stmt::Var(x, flags, _) => {
                if flags.contains(ASTFlags::EXPORTED) || self.slots == MAX_SLOTS {
                    return None;
                }
                let (value, ty) = self.expr(&x.1)?;
                let slot = self.slots;
                self.slots += 1;
                self.names
                    .push((x.0.name.to_string(), Bound::Slot(slot, ty)));
                St::Let(slot, value)
            }
            Stmt::If(f, _) => {
                let (guard, ty) = self.expr(&f.expr)?;
                if ty != Ty::Bool {
                    return None;
                }
                St::If(
                    guard,
                    self.block(f.body.statements())?,
                    self.block(f.branch.statements())?,
                )
            }
            Stmt::Expr(e) => St::Eval(self.expr(e)?.0),
            Stmt::FnCall(call, pos) => St::Eval(self.call(call, *pos)?.0),
            // A nested block: its value is its last statement's, as an `if` branch's is.
            Stmt::Block(b) => St::If(
                Ex::Const(Value::Bool(true)),
                self.block(b.statements())?,
                Box::default(),
            ),
            Stmt::Return(e, flags, _) if !flags.contains(ASTFlags::BREAK) => St::Return(match e {
                Some(e) => self.expr(e)?.0,
                None => Ex::Const(Value::Unit),
            }),
            _ => return None,
        })
    }

    fn expr(&mut self, e: &Expr) -> Option<(Ex, Ty)> {
        self.nodes += 1;
        let constant = |v: Value, t: Ty| Some((Ex::Const(v), t));
        match e {
            Expr::Unit(_) => constant(Value::Unit, Ty::Unit),
            Expr::BoolConstant(b, _) => constant(Value::Bool(*b), Ty::Bool),
            Expr::IntegerConstant(i, _) => constant(Value::Int(*i), Ty::Int),
            Expr::StringConstant(s, _) => constant(Value::Text(s.clone()), Ty::Text),
            Expr::DynamicConstant(v, _) => {
                let v = Value::from_dynamic((**v).clone()).ok()?;
                let ty = match v {
                    Value::Unit => Ty::Unit,
                    Value::Bool(_) => Ty::Bool,
                    Value::Int(_) => Ty::Int,
                    Value::Text(_) => Ty::Text,
                    Value::Decision(_) => return None,
                };
                constant(v, ty)
            }
            Expr::Variable(..) => match self.lookup(e)? {
                Bound::Slot(slot, ty) => Some((Ex::Local(slot), ty)),
                // `req`/`res` only appear as the receiver of a host call.
                Bound::Param(_) => None,
            },
            Expr::FnCall(call, pos) => self.call(call, *pos),
            Expr::Dot(..) => self.chain(e),
            Expr::And(v, _) | Expr::Or(v, _) => {
                let parts = v
                    .iter()
                    .map(|e| match self.expr(e)? {
                        (e, Ty::Bool) => Some(e),
                        _ => None,
                    })
                    .collect::<Option<Box<[Ex]>>>()?;
                let ex = if matches!(e, Expr::And(..)) {
                    Ex::And(parts)
                } else {
                    Ex::Or(parts)
                };
                Some((ex, Ty::Bool))
            }
            Expr::Coalesce(v, _) => {
                let mut ty = Ty::Unit;
                let mut parts = Vec::with_capacity(v.len());
                for e in v.iter() {
                    let (e, t) = self.expr(e)?;
                    ty = match (ty, t) {
                        (Ty::Unit, t @ (Ty::Unit | Ty::Text | Ty::TextOrUnit)) => t,
                        (Ty::TextOrUnit, Ty::Text | Ty::TextOrUnit | Ty::Unit) => {
                            if t == Ty::Text {
                                Ty::Text
                            } else {
                                Ty::TextOrUnit
                            }
                        }
                        // Nothing after a value that is never `()` runs.
                        (Ty::Text, Ty::Text | Ty::TextOrUnit | Ty::Unit) => Ty::Text,
                        _ => return None,
                    };
                    parts.push(e);
                }
                Some((Ex::Coalesce(parts.into()), ty))
            }
            Expr::InterpolatedString(v, _) => {
                let parts = v
                    .iter()
                    .map(|e| {
                        self.nodes += 1;
                        let (ex, t) = self.expr(e)?;
                        matches!(t, Ty::Text | Ty::TextOrUnit | Ty::Unit | Ty::Int | Ty::Bool)
                            .then(|| (ex, e.position()))
                    })
                    .collect::<Option<Box<[_]>>>()?;
                Some((Ex::Interp(parts), Ty::Text))
            }
            _ => None,
        }
    }

    /// A chain of property reads and method calls: on `req`/`res`, the host functions; on a
    /// string, [`TextFn`].
    fn chain(&mut self, e: &Expr) -> Option<(Ex, Ty)> {
        let Expr::Dot(x, ASTFlags::NONE, _) = e else {
            return None;
        };
        let (base, mut ty) = match self.lookup(&x.lhs) {
            Some(Bound::Param(t)) => {
                self.nodes += 1;
                (Base::Param, t)
            }
            _ => {
                let (b, t) = self.expr(&x.lhs)?;
                (Base::Value(Box::new(b)), t)
            }
        };
        let (mut args, mut steps) = (Vec::new(), Vec::new());
        let mut rest = &x.rhs;
        loop {
            let (step, next) = match rest {
                Expr::Dot(y, ASTFlags::NONE, _) => (&y.lhs, Some(&y.rhs)),
                Expr::Dot(..) => return None,
                other => (other, None),
            };
            // The chain's bookkeeping for this level, the call itself and its receiver.
            self.nodes += 3;
            let (s, argc, returns, pos) = match step {
                Expr::Property(p, pos) => {
                    let (s, t) = self.step(ty, p.2.as_str(), &[])?;
                    (s, 0, t, *pos)
                }
                Expr::MethodCall(c, pos) => {
                    if !c.hashes.is_native_only() || c.is_qualified() || c.capture_parent_scope {
                        return None;
                    }
                    let mut types = Vec::with_capacity(c.args.len());
                    for a in c.args.iter() {
                        let (a, t) = self.expr(a)?;
                        args.push(a);
                        types.push(t);
                    }
                    let (s, t) = self.step(ty, c.name.as_str(), &types)?;
                    (s, c.args.len(), t, *pos)
                }
                _ => return None,
            };
            steps.push((s, argc, pos));
            ty = returns;
            match next {
                Some(n) => rest = n,
                None => break,
            }
        }
        if args.len() > MAX_CHAIN_ARGS {
            return None;
        }
        let chain = Ex::Chain {
            args: args.into(),
            base,
            steps: steps.into(),
        };
        Some((chain, ty))
    }

    /// `.name` / `.name(args)` on a value of type `on`.
    fn step(&self, on: Ty, name: &str, args: &[Ty]) -> Option<(Step, Ty)> {
        if on == Ty::Text {
            // `s.len` is a property as well as a method.
            return TextFn::find(name, args).map(|(f, t)| (Step::Text(f), t));
        }
        let h = HOST_CALLS
            .iter()
            .find(|h| h.name == name && fits(h.call, Some(on), args))?;
        Some((Step::Host(h.call), h.returns.into()))
    }

    /// What variable `e` names, when it is a plain name in reach.
    fn lookup(&self, e: &Expr) -> Option<Bound> {
        let Expr::Variable(v, ..) = e else {
            return None;
        };
        if !v.2.is_empty() {
            return None;
        }
        self.names
            .iter()
            .rev()
            .find(|(n, _)| n == v.1.as_str())
            .map(|(_, b)| *b)
    }

    fn call(&mut self, c: &FnCallExpr, pos: Position) -> Option<(Ex, Ty)> {
        // Only calls no script function can answer (see `native_calls`).
        if !c.hashes.is_native_only() || c.is_qualified() || c.capture_parent_scope {
            return None;
        }
        self.nodes += 1;
        if let Some(op) = &c.op_token {
            return self.operator(op, &c.args, pos);
        }
        let (receiver, rest) = match c.args.first().map(|a| self.lookup(a)) {
            Some(Some(Bound::Param(t))) => (Some(t), &c.args[1..]),
            _ => (None, &c.args[..]),
        };
        if receiver.is_some() {
            self.nodes += 1;
        }
        let mut args = Vec::with_capacity(rest.len());
        let mut types = Vec::with_capacity(rest.len());
        for a in rest {
            let (e, t) = self.expr(a)?;
            args.push(e);
            types.push(t);
        }
        let h = HOST_CALLS
            .iter()
            .find(|h| h.name == c.name.as_str() && fits(h.call, receiver, &types))?;
        Some((
            Ex::Call {
                call: h.call,
                args: args.into(),
                pos,
            },
            h.returns.into(),
        ))
    }

    fn operator(&mut self, op: &Token, args: &[Expr], pos: Position) -> Option<(Ex, Ty)> {
        match (op, args) {
            // Rhai's built-in `+` for strings (`()` on one side gives the other); `() + ()` is
            // an error, so one side must always be a string.
            (Token::Plus, [a, b]) => {
                let ((a, ta), (b, tb)) = (self.expr(a)?, self.expr(b)?);
                let texty = |t| matches!(t, Ty::Text | Ty::TextOrUnit | Ty::Unit);
                (texty(ta) && texty(tb) && (ta == Ty::Text || tb == Ty::Text))
                    .then(|| (Ex::Plus(Box::new([a, b]), pos), Ty::Text))
            }
            (Token::Bang, [a]) => match self.expr(a)? {
                (a, Ty::Bool) => Some((Ex::Not(Box::new(a)), Ty::Bool)),
                _ => None,
            },
            (Token::EqualsTo | Token::NotEqualsTo, [a, b]) => {
                let ((a, ta), (b, tb)) = (self.expr(a)?, self.expr(b)?);
                (ta.comparable() && tb.comparable()).then(|| {
                    let ne = matches!(op, Token::NotEqualsTo);
                    (Ex::Eq(Box::new([a, b]), ne), Ty::Bool)
                })
            }
            (
                Token::LessThan
                | Token::LessThanEqualsTo
                | Token::GreaterThan
                | Token::GreaterThanEqualsTo,
                [a, b],
            ) => {
                let cmp = match op {
                    Token::LessThan => Cmp::Lt,
                    Token::LessThanEqualsTo => Cmp::Le,
                    Token::GreaterThan => Cmp::Gt,
                    _ => Cmp::Ge,
                };
                match (self.expr(a)?, self.expr(b)?) {
                    ((a, Ty::Int), (b, Ty::Int)) => {
                        Some((Ex::Cmp(Box::new([a, b]), cmp), Ty::Bool))
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

/// Whether host function `call` takes a receiver of type `on` and arguments of `args`' types.
fn fits(call: HostCall, on: Option<Ty>, args: &[Ty]) -> bool {
    use HostCall::*;
    matches!(
        (call, on, args),
        (ReqProp(_), Some(Ty::Req), [])
            | (ResProp(_), Some(Ty::Res), [])
            | (Req1(_), Some(Ty::Req), [Ty::Text])
            | (Req2(_), Some(Ty::Req), [Ty::Text, Ty::Text])
            | (Res1(_), Some(Ty::Res), [Ty::Text])
            | (Res2(_), Some(Ty::Res), [Ty::Text, Ty::Text])
            | (ResInt(_), Some(Ty::Res), [Ty::Int])
            | (IntText(_), None, [Ty::Int, Ty::Text])
    )
}

struct Env<'a> {
    args: Args<'a>,
    /// `max_string_size`; 0: no limit.
    max_string: usize,
    slots: [Value; MAX_SLOTS],
}

impl Env<'_> {
    fn block(&mut self, stmts: &[St]) -> RhaiResult<Flow> {
        let mut last = Value::Unit;
        for s in stmts {
            last = match s {
                St::Let(slot, e) => {
                    let v = self.eval(e)?;
                    if let Some(s) = self.slots.get_mut(*slot) {
                        *s = v;
                    }
                    Value::Unit
                }
                St::If(guard, then, otherwise) => {
                    let branch = if self.eval(guard)?.bool()? {
                        then
                    } else {
                        otherwise
                    };
                    match self.block(branch)? {
                        Flow::Next(v) => v,
                        r @ Flow::Return(_) => return Ok(r),
                    }
                }
                St::Eval(e) => self.eval(e)?,
                St::Return(e) => return Ok(Flow::Return(self.eval(e)?)),
            };
        }
        Ok(Flow::Next(last))
    }

    fn eval(&mut self, e: &Ex) -> RhaiResult<Value> {
        Ok(match e {
            Ex::Const(v) => v.clone(),
            Ex::Local(slot) => self.slots.get(*slot).cloned().unwrap_or(Value::Unit),
            Ex::Call { call, args, pos } => {
                let mut values = [Value::Unit, Value::Unit];
                for (v, a) in values.iter_mut().zip(args) {
                    *v = self.eval(a)?;
                }
                self.host(*call, &values, *pos)?
            }
            Ex::Plus(ab, pos) => {
                let [a, b] = &**ab;
                match (self.eval(a)?, self.eval(b)?) {
                    (Value::Text(a), Value::Text(b)) => {
                        self.check_len(a.len() + b.len(), *pos)?;
                        Value::Text(a + b)
                    }
                    (Value::Unit, t @ Value::Text(_)) | (t @ Value::Text(_), Value::Unit) => t,
                    _ => return Err(mistyped()),
                }
            }
            Ex::Chain { args, base, steps } => {
                let mut values = [const { Value::Unit }; MAX_CHAIN_ARGS];
                for (v, a) in values.iter_mut().zip(args.iter()) {
                    *v = self.eval(a)?;
                }
                let mut on = match base {
                    Base::Param => None,
                    Base::Value(e) => Some(self.eval(e)?),
                };
                let mut next = 0;
                for (step, argc, pos) in steps.iter() {
                    let a = values.get(next..next + argc).ok_or_else(mistyped)?;
                    next += argc;
                    let out = match (step, &on) {
                        (Step::Host(call), None) => self.host(*call, a, *pos)?,
                        (Step::Text(f), Some(Value::Text(s))) => {
                            let out = f.apply(s, a)?;
                            if let Value::Text(t) = &out {
                                self.check_len(t.len(), *pos)?;
                            }
                            out
                        }
                        _ => return Err(mistyped()),
                    };
                    on = Some(out);
                }
                on.ok_or_else(mistyped)?
            }
            Ex::Eq(ab, ne) => {
                let [a, b] = &**ab;
                let same = self.eval(a)?.same(&self.eval(b)?);
                Value::Bool(same != *ne)
            }
            Ex::Cmp(ab, cmp) => {
                let [a, b] = &**ab;
                let (a, b) = (self.eval(a)?.int()?, self.eval(b)?.int()?);
                Value::Bool(match cmp {
                    Cmp::Lt => a < b,
                    Cmp::Le => a <= b,
                    Cmp::Gt => a > b,
                    Cmp::Ge => a >= b,
                })
            }
            Ex::Not(a) => Value::Bool(!self.eval(a)?.bool()?),
            Ex::And(parts) => {
                for p in parts.iter() {
                    if !self.eval(p)?.bool()? {
                        return Ok(Value::Bool(false));
                    }
                }
                Value::Bool(true)
            }
            Ex::Or(parts) => {
                for p in parts.iter() {
                    if self.eval(p)?.bool()? {
                        return Ok(Value::Bool(true));
                    }
                }
                Value::Bool(false)
            }
            Ex::Coalesce(parts) => {
                for p in parts.iter() {
                    let v = self.eval(p)?;
                    if !matches!(v, Value::Unit) {
                        return Ok(v);
                    }
                }
                Value::Unit
            }
            Ex::Interp(parts) => {
                let mut out = String::new();
                for (p, pos) in parts.iter() {
                    match self.eval(p)? {
                        Value::Text(s) => out.push_str(&s),
                        Value::Int(i) => out.push_str(&i.to_string()),
                        Value::Bool(b) => out.push_str(if b { "true" } else { "false" }),
                        Value::Unit => {}
                        Value::Decision(_) => return Err(mistyped()),
                    }
                    self.check_len(out.len(), *pos)?;
                }
                Value::Text(out.into())
            }
        })
    }

    /// Calls a host function with its arguments (the receiver is the hook's `req`/`res`).
    fn host(&self, call: HostCall, args: &[Value], pos: Position) -> RhaiResult<Value> {
        let unit = Value::Unit;
        let (a, b) = (args.first().unwrap_or(&unit), args.get(1).unwrap_or(&unit));
        let req = self.args.req;
        let res = || self.args.res.ok_or_else(mistyped);
        let out = match call {
            HostCall::ReqProp(f) => Ok(Dynamic::from(f(&req.state()))),
            HostCall::ResProp(f) => Ok(Dynamic::from(f(&res()?.state()))),
            HostCall::Req1(f) => f(req, a.text()?),
            HostCall::Req2(f) => f(req, a.text()?, b.text()?),
            HostCall::Res1(f) => f(res()?, a.text()?),
            HostCall::Res2(f) => f(res()?, a.text()?, b.text()?),
            HostCall::ResInt(f) => f(res()?, a.int()?),
            HostCall::IntText(f) => f(a.int()?, b.text()?),
        };
        let value = out.and_then(Value::from_dynamic).map_err(|mut e| {
            if e.position().is_none() {
                e.set_position(pos);
            }
            e
        })?;
        if let Value::Text(s) = &value {
            self.check_len(s.len(), pos)?;
        }
        Ok(value)
    }

    /// Rhai's check of a string it built or was given against `max_string_size`.
    fn check_len(&self, len: usize, pos: Position) -> RhaiResult<()> {
        if self.max_string > 0 && len > self.max_string {
            return Err(EvalAltResult::ErrorDataTooLarge("Length of string".into(), pos).into());
        }
        Ok(())
    }
}
