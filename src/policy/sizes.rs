//! Rhai's string functions whose result can be many times larger than their arguments, replaced
//! by versions that work out the result's size first and fail with `string_size` before
//! allocating it.
//!
//! Rhai checks `max_string_size` on a function's result, after the function has built it. For
//! most functions the result is at most a few times the size of the arguments, which are within
//! the limit themselves (`+` of two strings, `to_upper`, `to_string` of an array). `replace`
//! is not: each match of a one-character pattern can become a 64 KiB replacement, so one call
//! could build gigabytes (and take seconds, inside one Rhai operation, where the wall-clock
//! budget is not looked at) before the check. `pad` is bounded by its length argument in
//! characters, but a character can be four bytes; its check here is on the exact byte size.
//!
//! The engine's own functions are found before the standard library's, so registering these
//! on the engine replaces Rhai's for every script.
//!
//! Also here: how deeply arrays and maps may nest ([`MAX_DEPTH`]). Rhai's size limits count
//! elements, not depth, and Rhai clones, measures, compares, prints and drops a nested value
//! by recursion: `for i in 0..n { a = [a]; }` built values a few thousand levels deep within
//! the default limits, and the first recursion over one overflowed the worker's stack, which
//! aborts the whole process.

use rhai::{Dynamic, Engine, EvalAltResult, INT, ImmutableString, Position};

/// How many arrays and maps deep a value a script reads may be (JSON that `parse_json` or a
/// token's claims give is at most 128 deep too: serde_json's limit). A value is checked each
/// time a script reads a variable holding it, and when it is stored as `req.ctx`; one
/// expression can nest at most `max_expr_depth` more levels before its result is read again,
/// and script functions returning nested literals at most `max_call_depth` times that.
pub const MAX_DEPTH: usize = 128;

/// What a walk over a value found: how many bytes its maps' keys take.
#[derive(Default)]
struct Walk {
    key_bytes: usize,
}

impl Walk {
    /// Whether `v` has arrays or maps nested more than `room` deep (`[]` is one deep), adding
    /// up its maps' keys on the way. Recursive, but never more than `room` calls deep.
    fn deeper_than(&mut self, v: &Dynamic, room: usize) -> bool {
        if v.is_array() {
            let Ok(a) = v.as_array_ref() else {
                return false;
            };
            room == 0 || a.iter().any(|x| self.deeper_than(x, room - 1))
        } else if v.is_map() {
            let Ok(m) = v.as_map_ref() else {
                return false;
            };
            room == 0 || self.map_deeper_than(&m, room - 1)
        } else {
            false
        }
    }

    fn map_deeper_than(&mut self, m: &rhai::Map, room: usize) -> bool {
        self.key_bytes = m
            .keys()
            .fold(self.key_bytes, |n, k| n.saturating_add(k.len()));
        m.values().any(|x| self.deeper_than(x, room))
    }

    fn verdict(&self, deeper: bool, max_key_bytes: usize) -> RhaiResult<()> {
        if deeper {
            return Err(too_deep());
        }
        if max_key_bytes > 0 && self.key_bytes > max_key_bytes {
            return Err(keys_too_long(max_key_bytes));
        }
        Ok(())
    }
}

fn too_deep() -> Box<EvalAltResult> {
    EvalAltResult::ErrorDataTooLarge(
        format!("Nesting of arrays and object maps (over {MAX_DEPTH} deep)"),
        Position::NONE,
    )
    .into()
}

/// Read back as `map_size` by `engine::classify`.
fn keys_too_long(max: usize) -> Box<EvalAltResult> {
    EvalAltResult::ErrorDataTooLarge(
        format!("Keys of object maps (over {max} bytes in one value)"),
        Position::NONE,
    )
    .into()
}

/// `Err` when `v` nests arrays and maps more than [`MAX_DEPTH`] deep (`nesting`), or when the
/// keys of the maps in it take more than `max_key_bytes` (`map_size`; 0: no limit). Rhai counts
/// a map's entries and the strings in its values against the limits, never its keys: 10,000
/// keys of 64 KiB each (640 MB) passed them.
pub(crate) fn check_value(v: &Dynamic, max_key_bytes: usize) -> RhaiResult<()> {
    let mut walk = Walk::default();
    let deeper = walk.deeper_than(v, MAX_DEPTH);
    walk.verdict(deeper, max_key_bytes)
}

/// [`check_value`] of a map held as a `Map`.
pub(crate) fn check_map(m: &rhai::Map, max_key_bytes: usize) -> RhaiResult<()> {
    let mut walk = Walk::default();
    let deeper = walk.map_deeper_than(m, MAX_DEPTH - 1);
    walk.verdict(deeper, max_key_bytes)
}

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// The error Rhai raises for a string over `max_string_size` (read back as `string_size`).
fn too_long() -> Box<EvalAltResult> {
    EvalAltResult::ErrorDataTooLarge("Length of string".into(), Position::NONE).into()
}

/// `Err` when a string of `bytes` (`None`: more than a `usize` holds) is over `max`
/// (0: no limit).
fn within(bytes: Option<usize>, max: usize) -> RhaiResult<()> {
    match bytes {
        Some(n) if max == 0 || n <= max => Ok(()),
        _ => Err(too_long()),
    }
}

/// The length of `s` with every `find` replaced by `with` (`find` of `find_len` bytes, as
/// `str::replace` does it: an empty `find` matches at every character boundary).
fn replaced_len(s: &str, find: &str, with_len: usize) -> Option<usize> {
    let matches = if find.is_empty() {
        s.chars().count() + 1
    } else {
        s.matches(find).count()
    };
    let removed = matches.checked_mul(find.len())?;
    let added = matches.checked_mul(with_len)?;
    (s.len() - removed).checked_add(added)
}

/// `s.replace(find, with)` into `s`, failing before the work when the result would be over
/// `max`. Rhai leaves an empty string as it is, even for an empty `find`.
fn replace(s: &mut ImmutableString, find: &str, with: &str, max: usize) -> RhaiResult<()> {
    if s.is_empty() {
        return Ok(());
    }
    // A replacement no longer than what it replaces cannot make the string grow.
    if with.len() > find.len() {
        within(replaced_len(s, find, with.len()), max)?;
    }
    *s = s.replace(find, with).into();
    Ok(())
}

/// The length of `s` padded to `len` characters with `padding` (repeated, the last copy cut
/// short), or `s`'s own length when it has that many already.
fn padded_len(s: &str, len: usize, padding: &str) -> Option<usize> {
    let have = s.chars().count();
    let Some(missing) = len.checked_sub(have).filter(|&m| m > 0) else {
        return Some(s.len());
    };
    let per = padding.chars().count();
    if per == 0 {
        return Some(s.len());
    }
    let whole = (missing / per).checked_mul(padding.len())?;
    let part: usize = padding
        .chars()
        .take(missing % per)
        .map(char::len_utf8)
        .sum();
    s.len().checked_add(whole)?.checked_add(part)
}

/// `s.pad(len, padding)`: pads `s` to `len` characters, failing first when that is over `max`.
fn pad(s: &mut ImmutableString, len: INT, padding: &str, max: usize) -> RhaiResult<()> {
    if len <= 0 || padding.is_empty() {
        return Ok(());
    }
    let Ok(len) = usize::try_from(len) else {
        return Err(too_long());
    };
    let bytes = padded_len(s, len, padding);
    within(bytes, max)?;
    let have = s.chars().count();
    if len <= have {
        return Ok(());
    }
    let p = s.make_mut();
    p.extend(padding.chars().cycle().take(len - have));
    Ok(())
}

/// Registers the checked versions on `engine`, for strings of at most `max` bytes (0: none).
pub(crate) fn register(engine: &mut Engine, max: usize) {
    engine
        .register_fn(
            "replace",
            move |s: &mut ImmutableString, find: &str, with: &str| replace(s, find, with, max),
        )
        .register_fn(
            "replace",
            move |s: &mut ImmutableString, find: &str, with: char| {
                replace(s, find, with.encode_utf8(&mut [0; 4]), max)
            },
        )
        .register_fn(
            "replace",
            move |s: &mut ImmutableString, find: char, with: &str| {
                replace(s, find.encode_utf8(&mut [0; 4]), with, max)
            },
        )
        .register_fn(
            "replace",
            move |s: &mut ImmutableString, find: char, with: char| {
                replace(
                    s,
                    find.encode_utf8(&mut [0; 4]),
                    with.encode_utf8(&mut [0; 4]),
                    max,
                )
            },
        )
        .register_fn(
            "pad",
            move |s: &mut ImmutableString, len: INT, padding: char| {
                pad(s, len, padding.encode_utf8(&mut [0; 4]), max)
            },
        )
        .register_fn(
            "pad",
            move |s: &mut ImmutableString, len: INT, padding: &str| pad(s, len, padding, max),
        );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_arrays_and_maps_alike() {
        let mut v = Dynamic::from(1_i64);
        for i in 0..MAX_DEPTH {
            v = if i % 2 == 0 {
                Dynamic::from_array(vec![Dynamic::UNIT, v])
            } else {
                let mut m = rhai::Map::new();
                m.insert("k".into(), v);
                Dynamic::from_map(m)
            };
        }
        assert!(check_value(&v, 0).is_ok(), "{MAX_DEPTH} deep is allowed");
        let v = Dynamic::from_array(vec![v]);
        assert!(check_value(&v, 0).is_err());
        assert!(check_value(&Dynamic::from("text"), 0).is_ok());
    }

    #[test]
    fn sizes_are_worked_out_as_the_functions_build_them() {
        for (s, find, with) in [
            ("hello, world! hello", "hello", "hey"),
            ("aaa", "a", "xyz"),
            ("aaa", "", "-"),
            ("héé", "é", "😀"),
            ("abc", "zz", "long"),
            ("", "", "x"),
        ] {
            assert_eq!(
                replaced_len(s, find, with.len()),
                Some(s.replace(find, with).len()),
                "{s:?}.replace({find:?}, {with:?})"
            );
        }
        for (s, len, padding, want) in [
            ("hello", 8, "!", "hello!!!"),
            ("hello", 10, "(!)", "hello(!)(!"),
            ("hé", 5, "😀é", "hé😀é😀"),
            ("hello", 3, "*", "hello"),
        ] {
            assert_eq!(padded_len(s, len, padding), Some(want.len()));
            let mut text = ImmutableString::from(s);
            pad(&mut text, len as INT, padding, 0).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(text.as_str(), want);
        }
    }
}
