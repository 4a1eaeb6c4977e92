//! Two rewrites of the calls in a hook's body, made once when the policy is compiled. Both are
//! optimisations only: a call they do not reach behaves the same, just slower.
//!
//! * Calls that no script function can answer are marked as calls of host functions only.
//!   Before each call, Rhai looks for a script function of that name (for a method, first under
//!   the receiver's type name, which it formats for the lookup) and only then for a host
//!   function. A policy's functions are fixed when it is compiled, so when the script defines no
//!   function of a name, those lookups can only miss (Rhai's parser marks operators this way).
//! * Such a method called on a hook parameter the body never rebinds (`req.header("x")`) becomes
//!   the function call Rhai makes of it anyway (`header(req, "x")`, the receiver passed by
//!   reference), without the machinery for chains like `a.b[c].d()`.

use std::collections::HashSet;

use rhai::{ASTFlags, ASTNode, Expr, FnCallExpr, FnCallHashes, Stmt, StmtBlock};

/// Rewrites `body` given `script_fns` (every function name the script defines) and the hook's
/// parameter names.
pub(crate) fn rewrite(body: &mut [Stmt], script_fns: &HashSet<String>, params: &[&str]) {
    let receivers = params
        .iter()
        .filter(|p| !rebinds(body, p))
        .map(|p| p.to_string())
        .collect();
    let mut m = Marker {
        script_fns,
        receivers,
    };
    for s in body {
        m.stmt(s);
    }
}

/// Whether `body` may give variable `name` another value: `let`, assignment, a loop or `catch`
/// variable, or a closure capturing it.
fn rebinds(body: &[Stmt], name: &str) -> bool {
    let ast = rhai::AST::new(body.iter().cloned(), rhai::Module::new());
    let var = |e: &Expr| matches!(e, Expr::Variable(v, ..) if v.1 == name);
    let mut found = false;
    ast.walk(&mut |path: &[ASTNode]| {
        found = match path.last() {
            Some(ASTNode::Stmt(Stmt::Var(x, ..))) => x.0.name == name,
            Some(ASTNode::Stmt(Stmt::Assignment(x))) => var(&x.1.lhs),
            Some(ASTNode::Stmt(Stmt::For(x, _))) => {
                x.0.name == name || x.1.as_ref().is_some_and(|c| c.name == name)
            }
            Some(ASTNode::Stmt(Stmt::TryCatch(f, _))) => var(&f.expr),
            Some(ASTNode::Stmt(Stmt::Share(v))) => v.iter().any(|(i, _)| i.name == name),
            _ => false,
        };
        !found
    });
    found
}

struct Marker<'a> {
    script_fns: &'a HashSet<String>,
    /// Hook parameters a method call can be rewritten on.
    receivers: HashSet<String>,
}

impl Marker<'_> {
    fn call(&mut self, c: &mut FnCallExpr) {
        for a in c.args.iter_mut() {
            self.expr(a);
        }
        let name = c.name.as_str();
        // Names Rhai treats specially (`Fn`, `call`, `curry`, `is_def_fn`, ...) and `f!(..)`
        // calls are left as they are.
        if c.is_qualified()
            || c.capture_parent_scope
            || c.hashes.is_native_only()
            || super::calls::KEYWORDS.contains(&name)
            || self.script_fns.contains(name)
        {
            return;
        }
        c.hashes = FnCallHashes::from_native_only(c.hashes.native());
    }

    /// `receiver.method(args)` as `method(receiver, args)`, when that is what it means.
    fn method_on_receiver(&mut self, e: &mut Expr) -> Option<Expr> {
        // `?.` (null-safe access) sets a flag; only a plain `.` is rewritten.
        let Expr::Dot(x, flags, _) = e else {
            return None;
        };
        if *flags != ASTFlags::NONE {
            return None;
        }
        let receiver = match &x.lhs {
            Expr::Variable(v, ..) if self.receivers.contains(v.1.as_str()) => x.lhs.clone(),
            _ => return None,
        };
        let Expr::MethodCall(c, pos) = &mut x.rhs else {
            return None;
        };
        self.call(c);
        // Marked above only when no script function and nothing special answers the name.
        if !c.hashes.is_native_only() {
            return None;
        }
        let mut call = (**c).clone();
        call.args.insert(0, receiver);
        Some(Expr::FnCall(Box::new(call), *pos))
    }

    fn block(&mut self, b: &mut StmtBlock) {
        for s in b.statements_mut().iter_mut() {
            self.stmt(s);
        }
    }

    fn stmt(&mut self, s: &mut Stmt) {
        match s {
            Stmt::If(f, _) | Stmt::While(f, _) | Stmt::Do(f, ..) | Stmt::TryCatch(f, _) => {
                self.expr(&mut f.expr);
                self.block(&mut f.body);
                self.block(&mut f.branch);
            }
            Stmt::For(x, _) => {
                self.expr(&mut x.2.expr);
                self.block(&mut x.2.body);
            }
            Stmt::Var(x, ..) => self.expr(&mut x.1),
            Stmt::Assignment(x) => {
                self.expr(&mut x.1.lhs);
                self.expr(&mut x.1.rhs);
            }
            Stmt::FnCall(c, _) => self.call(c),
            Stmt::Block(b) => self.block(b),
            Stmt::Expr(e) => self.expr(e),
            Stmt::BreakLoop(Some(e), ..) | Stmt::Return(Some(e), ..) => self.expr(e),
            // `switch` (its cases live in a shared table), imports and the rest: left alone.
            _ => {}
        }
    }

    fn expr(&mut self, e: &mut Expr) {
        if let Some(call) = self.method_on_receiver(e) {
            *e = call;
            return;
        }
        match e {
            Expr::FnCall(c, _) | Expr::MethodCall(c, _) => self.call(c),
            Expr::Dot(x, ..) | Expr::Index(x, ..) => {
                self.expr(&mut x.lhs);
                self.expr(&mut x.rhs);
            }
            Expr::And(v, _) | Expr::Or(v, _) | Expr::Coalesce(v, _) => {
                for e in v.iter_mut() {
                    self.expr(e);
                }
            }
            Expr::InterpolatedString(v, _) | Expr::Array(v, _) => {
                for e in v.iter_mut() {
                    self.expr(e);
                }
            }
            Expr::Map(m, _) => {
                for (_, e) in m.0.iter_mut() {
                    self.expr(e);
                }
            }
            Expr::Stmt(b) => self.block(b),
            _ => {}
        }
    }
}
