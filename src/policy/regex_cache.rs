//! Compiled regular expressions for `regex_match` / `regex_captures`, shared by every worker.
//!
//! Patterns written as literals in a script are compiled when the snapshot is compiled (so a bad
//! one is a `validate` error); any other pattern is compiled on first use. The cache is bounded:
//! past its size a pattern is compiled for the call and not kept, so a script building patterns
//! from request data cannot grow memory without bound.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};

use regex::Regex;

const MAX_ENTRIES: usize = 1024;
/// Compiled-program size limit per pattern: a pathological pattern fails instead of eating memory.
const SIZE_LIMIT: usize = 1 << 20;

static CACHE: LazyLock<RwLock<HashMap<String, Arc<Regex>>>> = LazyLock::new(Default::default);

/// The compiled pattern, from the cache when it is there.
pub(crate) fn get(pattern: &str) -> Result<Arc<Regex>, regex::Error> {
    if let Some(re) = CACHE.read().unwrap_or_else(|e| e.into_inner()).get(pattern) {
        return Ok(Arc::clone(re));
    }
    let re = Arc::new(
        regex::RegexBuilder::new(pattern)
            .size_limit(SIZE_LIMIT)
            .build()?,
    );
    let mut cache = CACHE.write().unwrap_or_else(|e| e.into_inner());
    if cache.len() < MAX_ENTRIES {
        cache.insert(pattern.to_owned(), Arc::clone(&re));
    }
    Ok(re)
}
