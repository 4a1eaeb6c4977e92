//! Calls a script makes that nothing can answer: a host function that does not exist (or not
//! with that many arguments) is a `validate` error, not a 500 at run time.
//!
//! A call is known when the engine has a function of that name and arity (the host API and
//! Rhai's standard library), the script defines one, or Rhai handles the name itself (`print`,
//! `type_of`, `Fn`, ...). Calls Rhai may resolve through a value at run time are left alone: `f(x)`
//! where `f` is also a variable (a function pointer), and `obj.name(..)` where `name` is also a
//! map key or property in the script (an object map holding a function pointer).

use std::collections::{HashMap, HashSet};

use rhai::{AST, ASTNode, Dynamic, Engine, Expr, FnCallExpr, Position, Stmt};

/// A call as written: name, argument count, method style, where.
struct Call {
    name: String,
    args: usize,
    /// An operator (`+`, `==`, ...) or a namespaced call: Rhai's own business.
    skip: bool,
    method: bool,
    pos: Position,
}

impl Call {
    fn new(c: &FnCallExpr, method: bool, pos: Position) -> Call {
        let name = c.name.as_str();
        let identifier = name
            .chars()
            .next()
            .is_some_and(|ch| ch.is_alphabetic() || ch == '_')
            && name.chars().all(|ch| ch.is_alphanumeric() || ch == '_');
        Call {
            name: name.to_owned(),
            args: c.args.len(),
            skip: c.op_token.is_some() || c.is_qualified() || !identifier,
            method,
            pos,
        }
    }
}

/// Names Rhai resolves itself rather than through registered functions.
pub(crate) const KEYWORDS: [&str; 11] = [
    "print",
    "debug",
    "type_of",
    "eval",
    "Fn",
    "call",
    "curry",
    "is_shared",
    "is_def_var",
    "is_def_fn",
    "this",
];

/// A call nothing answers.
pub(crate) struct UnknownCall {
    pub name: String,
    /// Arguments as written (for `x.f(a)`: 1).
    pub args: usize,
    pub method: bool,
    pub pos: Position,
    /// The argument counts the name is known with, if any (for `x.f(..)` without `x`).
    pub known_args: Vec<usize>,
}

/// The calls in `ast` that neither `engine` nor the script can answer.
pub(crate) fn unknown(engine: &Engine, ast: &AST) -> Vec<UnknownCall> {
    let mut native: HashMap<String, Vec<usize>> = HashMap::new();
    for (name, n) in engine.collect_fn_metadata(
        None,
        |f| Some((f.metadata.name.to_string(), f.metadata.num_params)),
        true,
    ) {
        native.entry(name).or_default().push(n);
    }
    let script: HashSet<(String, usize)> = ast
        .iter_functions()
        .map(|f| (f.name.to_owned(), f.params.len()))
        .collect();

    let mut variables: HashSet<String> = ast
        .iter_functions()
        .flat_map(|f| f.params.into_iter().map(str::to_owned))
        .collect();
    let mut properties: HashSet<String> = HashSet::new();
    let mut calls: Vec<Call> = Vec::new();
    ast.walk(&mut |path: &[ASTNode]| {
        match path.last() {
            Some(ASTNode::Stmt(Stmt::Var(v, ..))) => {
                variables.insert(v.0.name.to_string());
            }
            Some(ASTNode::Stmt(Stmt::For(f, _))) => {
                variables.insert(f.0.name.to_string());
                if let Some(counter) = &f.1 {
                    variables.insert(counter.name.to_string());
                }
            }
            Some(ASTNode::Stmt(Stmt::FnCall(c, pos)))
            | Some(ASTNode::Expr(Expr::FnCall(c, pos))) => {
                calls.push(Call::new(c, false, *pos));
            }
            Some(ASTNode::Expr(Expr::MethodCall(c, pos))) => calls.push(Call::new(c, true, *pos)),
            Some(ASTNode::Expr(Expr::Property(p, _))) => {
                properties.insert(p.2.to_string());
            }
            Some(ASTNode::Expr(Expr::StringConstant(s, _))) => {
                properties.insert(s.to_string());
            }
            Some(ASTNode::Expr(Expr::Map(m, _))) => {
                properties.extend(m.0.iter().map(|(k, _)| k.name.to_string()));
                properties.extend(m.1.keys().map(|k| k.to_string()));
            }
            Some(ASTNode::Expr(Expr::DynamicConstant(d, _))) => map_keys(d, &mut properties),
            _ => {}
        }
        true
    });

    let mut out = Vec::new();
    for Call {
        name,
        args: written,
        skip,
        method,
        pos,
    } in calls
    {
        let name = name.as_str();
        if skip || KEYWORDS.contains(&name) {
            continue;
        }
        // `x.f(a)` reaches a native `f(x, a)` or a script `f(a)` with `this` bound.
        let native_args = if method { written + 1 } else { written };
        let known = native
            .get(name)
            .is_some_and(|arities| arities.contains(&native_args))
            || script.contains(&(name.to_owned(), written));
        let through_value = if method {
            properties.contains(name)
        } else {
            variables.contains(name)
        };
        if known || through_value {
            continue;
        }
        let mut known_args: Vec<usize> = native
            .get(name)
            .into_iter()
            .flatten()
            .map(|n| if method { n.saturating_sub(1) } else { *n })
            .chain(
                script
                    .iter()
                    .filter(|(n, _)| n == name)
                    .map(|(_, args)| *args),
            )
            .collect();
        known_args.sort_unstable();
        known_args.dedup();
        out.push(UnknownCall {
            name: name.to_owned(),
            args: written,
            method,
            pos,
            known_args,
        });
    }
    out
}

fn map_keys(d: &Dynamic, out: &mut HashSet<String>) {
    if let Ok(m) = d.as_map_ref() {
        out.extend(m.keys().map(|k| k.to_string()));
    }
}
