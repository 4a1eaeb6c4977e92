//! Marks the calls in a hook's body that no script function can answer as calls of host
//! functions only.
//!
//! Before each call of a function or method, Rhai looks for a script function of that name
//! (for a method, first under the receiver's type name, which it formats for the lookup) and
//! only then for a host function. A policy's functions are fixed when it is compiled, so when the
//! script defines no function of a name, those lookups can only miss: Rhai's own parser marks
//! operators this way. This is an optimisation only; a call it does not reach behaves the same.

use std::collections::HashSet;

use rhai::{Expr, FnCallExpr, FnCallHashes, Stmt, StmtBlock};

/// Calls `native` where `script_fns` (every function name the script defines) has no match.
pub(crate) fn mark(body: &mut [Stmt], script_fns: &HashSet<String>) {
    let mut m = Marker { script_fns };
    for s in body {
        m.stmt(s);
    }
}

struct Marker<'a> {
    script_fns: &'a HashSet<String>,
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
