//! Compiling a plugin: wasmer with Cranelift and the metering middleware, the memory cap
//! written into the module, every import checked against the ABI subset, and a cache so that a
//! reload does not recompile a plugin whose bytes did not change.
//!
//! Memory is capped by rewriting the module's declared maximum (its memory section) to
//! `max_memory` before compiling: wasmer then refuses `memory.grow` past it exactly as it
//! refuses growth past any declared maximum (`memory.grow` returns -1). A custom `Tunables`
//! would do the same but needs `unsafe fn`s, which this crate forbids. Tables (8 bytes an
//! element, outside the memory) are capped the same way, at [`MAX_TABLE_ELEMENTS`] in all.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, Weak};

use wasmer::sys::{CompilerConfig, Cranelift, EngineBuilder};
use wasmer::{Engine, Module};
use wasmer_middlewares::Metering;

use super::abi;

/// A WebAssembly page.
pub const PAGE: u64 = 64 * 1024;

/// The most elements a plugin's tables may hold together, at start and after `table.grow`
/// (wasmer keeps 8 bytes an element, outside `max_memory`: 800 KB). Toolchains size a
/// plugin's function table to its address-taken functions: the example plugin's has 220.
pub const MAX_TABLE_ELEMENTS: u64 = 100_000;

/// A module compiled for one memory cap, with the engine that compiled it (the metering
/// middleware belongs to one module, so each module has its own engine).
pub struct Compiled {
    pub engine: Engine,
    pub module: Module,
    /// Whether it exports `proxy_on_request_body` / `proxy_on_response_body` (with the ABI's
    /// signature): a plugin without them costs nothing on the body path.
    pub request_body: bool,
    pub response_body: bool,
}

/// Why a plugin did not compile. Messages name what to fix; the caller adds the file.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("is not a WebAssembly module: {0}")]
    Invalid(String),
    #[error("{0}")]
    Import(String),
    #[error("{0}")]
    Memory(String),
    #[error("{0}")]
    Table(String),
    #[error("does not export `{0}`: is it a proxy-wasm plugin? (build it with a proxy-wasm SDK)")]
    Export(&'static str),
}

type Key = (String, u64);

/// Compiled modules by (sha256, memory cap), kept while a snapshot holds them.
static CACHE: LazyLock<Mutex<HashMap<Key, Weak<Compiled>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Whether the module is compiled already (for `rustygate plan`-style reporting and tests).
pub fn is_cached(sha256: &str, max_memory: u64) -> bool {
    CACHE
        .lock()
        .ok()
        .and_then(|c| {
            c.get(&(sha256.to_owned(), max_memory))
                .map(|w| w.strong_count() > 0)
        })
        .unwrap_or(false)
}

/// Compiles `bytes` (whose sha256 the caller checked) or returns the cached module.
pub fn compile(bytes: &[u8], sha256: &str, max_memory: u64) -> Result<Arc<Compiled>, CompileError> {
    let key = (sha256.to_owned(), max_memory);
    if let Some(c) = CACHE.lock().ok().and_then(|c| c.get(&key)?.upgrade()) {
        return Ok(c);
    }
    let capped = cap_module(bytes, max_memory / PAGE)?;
    let mut compiler = Cranelift::default();
    // The budget is set before every call; this initial value only matters for start functions.
    compiler.push_middleware(Arc::new(Metering::new(
        0,
        |_: &wasmer::wasmparser::Operator| 1,
    )));
    let engine: Engine = EngineBuilder::new(compiler).into();
    let module = Module::new(&engine, &capped).map_err(|e| CompileError::Invalid(e.to_string()))?;
    check_module(&module)?;
    let compiled = Arc::new(Compiled {
        request_body: exports_body_callback(&module, "proxy_on_request_body"),
        response_body: exports_body_callback(&module, "proxy_on_response_body"),
        engine,
        module,
    });
    if let Ok(mut c) = CACHE.lock() {
        c.retain(|_, w| w.strong_count() > 0);
        c.insert(key, Arc::downgrade(&compiled));
    }
    Ok(compiled)
}

/// Imports within the subset, the exports the host calls present.
fn check_module(module: &Module) -> Result<(), CompileError> {
    let mut refused = Vec::new();
    for i in module.imports() {
        if !matches!(i.ty(), wasmer::ExternType::Function(_)) {
            refused.push(format!(
                "imports `{}.{}`, which is not a function: RustyGate provides only functions",
                i.module(),
                i.name()
            ));
        } else if let Err(e) = abi::check_import(i.module(), i.name()) {
            refused.push(e);
        }
    }
    if !refused.is_empty() {
        return Err(CompileError::Import(refused.join("; ")));
    }
    let exports: Vec<String> = module.exports().map(|e| e.name().to_owned()).collect();
    let has = |n: &str| exports.iter().any(|e| e == n);
    if !has("memory") {
        return Err(CompileError::Export("memory"));
    }
    if !has("proxy_on_memory_allocate") && !has("malloc") {
        return Err(CompileError::Export("proxy_on_memory_allocate"));
    }
    if !has("proxy_on_context_create") {
        return Err(CompileError::Export("proxy_on_context_create"));
    }
    Ok(())
}

/// Whether the module exports `name` as `(i32, i32, i32) -> i32`, the ABI's body callback.
fn exports_body_callback(module: &Module, name: &str) -> bool {
    use wasmer::Type::I32;
    module.exports().any(|e| {
        e.name() == name
            && matches!(e.ty(), wasmer::ExternType::Function(f)
                if f.params() == [I32, I32, I32] && f.results() == [I32])
    })
}

/// Rewrites the memory section so that every memory's maximum is at most `max_pages`, and the
/// table section so that the tables' maxima add up to at most [`MAX_TABLE_ELEMENTS`].
/// Refuses shared and 64-bit memories and tables, and minimums above the caps.
pub fn cap_module(bytes: &[u8], max_pages: u64) -> Result<Vec<u8>, CompileError> {
    let invalid = |m: &str| CompileError::Invalid(m.to_owned());
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(invalid("no `\\0asm` header"));
    }
    let mut out = Vec::with_capacity(bytes.len() + 8);
    out.extend_from_slice(&bytes[..8]);
    let mut at = 8;
    while at < bytes.len() {
        let id = bytes[at];
        let (size, n) = read_leb(&bytes[at + 1..]).ok_or_else(|| invalid("bad section size"))?;
        let start = at + 1 + n;
        let end = start
            .checked_add(size as usize)
            .filter(|e| *e <= bytes.len())
            .ok_or_else(|| invalid("section runs past the end"))?;
        let body = &bytes[start..end];
        let new = match id {
            4 => Some(cap_table_section(body)?),
            5 => Some(cap_memory_section(body, max_pages)?),
            _ => None,
        };
        if let Some(new) = new {
            out.push(id);
            write_leb(&mut out, new.len() as u64);
            out.extend_from_slice(&new);
        } else {
            out.extend_from_slice(&bytes[at..end]);
        }
        at = end;
    }
    Ok(out)
}

/// A memory's or table's limits at `body[*at..]`, moving `at` past them: the flags byte, the
/// minimum, and the maximum where flag bit 0 says there is one. `None` when cut short.
fn read_limits(body: &[u8], at: &mut usize) -> Option<(u8, u64, Option<u64>)> {
    let flags = *body.get(*at)?;
    *at += 1;
    let (min, n) = read_leb(body.get(*at..)?)?;
    *at += n;
    let max = if flags & 1 == 1 {
        let (max, n) = read_leb(body.get(*at..)?)?;
        *at += n;
        Some(max)
    } else {
        None
    };
    Some((flags, min, max))
}

fn cap_memory_section(body: &[u8], max_pages: u64) -> Result<Vec<u8>, CompileError> {
    let bad = || CompileError::Invalid("malformed memory section".to_owned());
    let (count, mut at) = read_leb(body).ok_or_else(bad)?;
    let mut out = Vec::with_capacity(body.len() + 4);
    write_leb(&mut out, count);
    for _ in 0..count {
        let (flags, min, declared_max) = read_limits(body, &mut at).ok_or_else(bad)?;
        if flags & !1 != 0 {
            return Err(CompileError::Memory(
                "declares a shared or 64-bit memory; plugins have one plain 32-bit memory".into(),
            ));
        }
        if min > max_pages {
            return Err(CompileError::Memory(format!(
                "needs {} KiB of memory at start, more than `max_memory` ({} KiB)",
                min * PAGE / 1024,
                max_pages * PAGE / 1024
            )));
        }
        let max = declared_max.map_or(max_pages, |m| m.min(max_pages));
        out.push(1);
        write_leb(&mut out, min);
        write_leb(&mut out, max);
    }
    if at != body.len() {
        return Err(bad());
    }
    Ok(out)
}

/// Rewrites the table section: each table's maximum is set so that all of them together can
/// never hold more than [`MAX_TABLE_ELEMENTS`] (what their minimums leave is given to the
/// tables in order), so `table.grow` past it returns -1. Refuses minimums that add up to more,
/// shared and 64-bit tables, and tables with an initialiser expression.
fn cap_table_section(body: &[u8]) -> Result<Vec<u8>, CompileError> {
    let bad = || CompileError::Invalid("malformed table section".to_owned());
    let (count, mut at) = read_leb(body).ok_or_else(bad)?;
    // (where its element type is in `body`, minimum, declared maximum)
    let mut tables = Vec::new();
    for _ in 0..count {
        let ty = at;
        match *body.get(at).ok_or_else(bad)? {
            // funcref, externref
            0x70 | 0x6f => at += 1,
            // (ref null? heaptype), the function-references encoding
            0x63 | 0x64 => {
                let (_, n) = read_leb(body.get(at + 1..).ok_or_else(bad)?).ok_or_else(bad)?;
                at += 1 + n;
            }
            0x40 => {
                return Err(CompileError::Table(
                    "declares a table with an initialiser expression; plugins' tables are plain (funcref or externref)".into(),
                ));
            }
            _ => return Err(bad()),
        }
        let ty = ty..at;
        let (flags, min, declared_max) = read_limits(body, &mut at).ok_or_else(bad)?;
        if flags & !1 != 0 {
            return Err(CompileError::Table(
                "declares a shared or 64-bit table; plugins have plain 32-bit tables".into(),
            ));
        }
        tables.push((ty, min, declared_max));
    }
    if at != body.len() {
        return Err(bad());
    }
    let at_start = tables
        .iter()
        .fold(0u64, |sum, (_, min, _)| sum.saturating_add(*min));
    if at_start > MAX_TABLE_ELEMENTS {
        return Err(CompileError::Table(format!(
            "declares tables of {at_start} elements at start, more than the {MAX_TABLE_ELEMENTS}              a plugin's tables may hold (docs/plugins.md, Limits)"
        )));
    }
    let mut spare = MAX_TABLE_ELEMENTS - at_start;
    let mut out = Vec::with_capacity(body.len() + 4 * tables.len());
    write_leb(&mut out, count);
    for (ty, min, declared_max) in tables {
        let max = declared_max.map_or(min + spare, |m| m.clamp(min, min + spare));
        spare -= max - min;
        out.extend_from_slice(&body[ty]);
        out.push(1);
        write_leb(&mut out, min);
        write_leb(&mut out, max);
    }
    Ok(out)
}

/// An unsigned LEB128 number and the bytes it took.
fn read_leb(b: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

fn write_leb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory_section(wat_src: &str) -> Vec<u8> {
        let bytes = wat::parse_str(wat_src).unwrap();
        let capped = cap_module(&bytes, 4).unwrap();
        wasmparser_memories(&capped)
    }

    /// The (min, max) of each memory, read back by wasmer's own parser.
    fn wasmparser_memories(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for payload in wasmer::wasmparser::Parser::new(0).parse_all(bytes) {
            if let Ok(wasmer::wasmparser::Payload::MemorySection(r)) = payload {
                for m in r {
                    let m = m.unwrap();
                    out.push(m.initial as u8);
                    out.push(m.maximum.map_or(255, |x| x as u8));
                }
            }
        }
        out
    }

    #[test]
    fn memory_maximum_is_capped_or_kept_when_lower() {
        assert_eq!(memory_section("(module (memory 1))"), vec![1, 4]);
        assert_eq!(memory_section("(module (memory 1 100))"), vec![1, 4]);
        assert_eq!(memory_section("(module (memory 1 2))"), vec![1, 2]);
        // Other sections pass through untouched.
        let src = "(module (memory 1) (func (export \"f\") (result i32) i32.const 7))";
        let capped = cap_module(&wat::parse_str(src).unwrap(), 4).unwrap();
        assert!(wasmer::wasmparser::validate(&capped).is_ok());
    }

    #[test]
    fn a_minimum_over_the_cap_is_refused() {
        let bytes = wat::parse_str("(module (memory 5))").unwrap();
        let e = cap_module(&bytes, 4).unwrap_err();
        assert!(e.to_string().contains("max_memory"), "{e}");
        assert!(cap_module(b"not wasm", 4).is_err());
    }

    /// The (min, max) of each table after capping, read back by wasmer's own parser.
    fn tables(wat_src: &str) -> Result<Vec<(u64, Option<u64>)>, String> {
        let bytes = wat::parse_str(wat_src).unwrap();
        let capped = cap_module(&bytes, 4).map_err(|e| e.to_string())?;
        assert!(wasmer::wasmparser::validate(&capped).is_ok());
        let mut out = Vec::new();
        for payload in wasmer::wasmparser::Parser::new(0).parse_all(&capped) {
            if let Ok(wasmer::wasmparser::Payload::TableSection(r)) = payload {
                for t in r {
                    let t = t.unwrap();
                    out.push((t.ty.initial, t.ty.maximum));
                }
            }
        }
        Ok(out)
    }

    #[test]
    fn tables_are_capped_in_all_and_over_large_ones_refused() {
        let cap = MAX_TABLE_ELEMENTS;
        assert_eq!(
            tables("(module (table 220 220 funcref))"),
            Ok(vec![(220, Some(220))])
        );
        assert_eq!(
            tables("(module (table 10 funcref))"),
            Ok(vec![(10, Some(cap))])
        );
        assert_eq!(
            tables("(module (table 1 5000000 funcref))"),
            Ok(vec![(1, Some(cap))])
        );
        // Two tables share the cap: what the first may grow by, the second may not.
        assert_eq!(
            tables("(module (table 10 funcref) (table 20 externref))"),
            Ok(vec![(10, Some(cap - 20)), (20, Some(20))])
        );
        let e = tables("(module (table 5000000 funcref))").unwrap_err();
        assert!(
            e.contains("5000000 elements") && e.contains("100000"),
            "{e}"
        );
        let e = tables("(module (table 60000 funcref) (table 60000 funcref))").unwrap_err();
        assert!(e.contains("120000 elements"), "{e}");
    }
}
