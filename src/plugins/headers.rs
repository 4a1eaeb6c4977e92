//! The header maps as the plugins see them.
//!
//! [`Headers`], the request's: pseudo-headers first (`:method`, `:path`, `:authority`), then
//! the rest, names in lower case, all in one buffer, with the names the plugins changed and
//! the values those names had before. One buffer, so that a copy (for a `fail_open` plugin,
//! whose changes must be undone should it fail) costs two allocations, not two per header;
//! the changed names with their earlier values, so that making the plugins' changes on the
//! headers going upstream looks at those names only, and needs no copy of the whole map.
//!
//! The response's are in [`super::response`].

use std::cell::RefCell;

use http::HeaderName;

/// Header names the plugins set, parsed once per worker thread: a name outside `http`'s
/// standard ones is otherwise parsed and allocated anew for every request it is set on.
pub(super) const NAMES_PER_THREAD: usize = 32;

thread_local! {
    static NAMES: RefCell<Vec<HeaderName>> = const { RefCell::new(Vec::new()) };
}

/// The `http` name for a lower-case header name (`None`: not a valid one), from this thread's
/// names when it was seen before.
pub(crate) fn header_name(name: &str) -> Option<HeaderName> {
    NAMES.with_borrow_mut(|names| {
        if let Some(h) = names
            .iter()
            .find(|h| same(h.as_str().as_bytes(), name.as_bytes()))
        {
            return Some(h.clone());
        }
        let h = crate::proxy::headers::header_name(name)?;
        if names.len() < NAMES_PER_THREAD {
            names.push(h.clone());
        }
        Some(h)
    })
}

/// Whether two names are the same bytes. Eight at a time: names are short, and the C library's
/// `memcmp` (musl's) that slice equality calls compares one byte at a time.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    let word = |w: &[u8]| u64::from_ne_bytes(<[u8; 8]>::try_from(w).unwrap_or_default());
    let (wa, wb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (wa.remainder(), wb.remainder());
    a.len() == b.len()
        && wa.zip(wb).all(|(x, y)| word(x) == word(y))
        && ra.iter().zip(rb).all(|(x, y)| x == y)
}

/// Names changed, each followed by a NUL byte: in place up to `INLINE` bytes (a plugin's usual
/// edit or two, without an allocation), then in `spill`.
#[derive(Debug, Clone)]
struct Names {
    inline: [u8; Names::INLINE],
    len: usize,
    spill: Vec<u8>,
}

impl Default for Names {
    fn default() -> Self {
        Names {
            inline: [0; Names::INLINE],
            len: 0,
            spill: Vec::new(),
        }
    }
}

impl Names {
    const INLINE: usize = 64;

    fn bytes(&self) -> &[u8] {
        if self.spill.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spill
        }
    }

    fn push(&mut self, name: &[u8]) {
        let end = self.len + name.len() + 1;
        if self.spill.is_empty() && end <= Names::INLINE {
            self.inline[self.len..end - 1].copy_from_slice(name);
            self.inline[end - 1] = 0;
            self.len = end;
        } else {
            if self.spill.is_empty() {
                self.spill.extend_from_slice(&self.inline[..self.len]);
            }
            self.spill.extend_from_slice(name);
            self.spill.push(0);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.bytes().split(|&b| b == 0).filter(|n| !n.is_empty())
    }
}

/// Headers in one buffer, in order.
#[derive(Debug, Clone, Default)]
struct List {
    bytes: Vec<u8>,
    /// Where each header's name and value end in `bytes`; each starts where the previous ended.
    ends: Vec<(usize, usize)>,
}

impl List {
    fn push_parts(&mut self, name: &[u8], value: &[&[u8]]) {
        self.bytes.extend_from_slice(name);
        let name_end = self.bytes.len();
        for part in value {
            self.bytes.extend_from_slice(part);
        }
        self.ends.push((name_end, self.bytes.len()));
    }

    /// Every header as bytes, in order.
    fn raw(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let mut start = 0;
        self.ends.iter().map(move |&(name_end, end)| {
            let n = self.bytes.get(start..name_end).unwrap_or_default();
            let v = self.bytes.get(name_end..end).unwrap_or_default();
            start = end;
            (n, v)
        })
    }

    fn values<'a>(&'a self, name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut start = 0;
        self.ends.iter().filter_map(move |&(name_end, end)| {
            let from = start;
            start = end;
            // Lengths first: most names differ in length.
            (name_end - from == name.len() && same(&self.bytes[from..name_end], name))
                .then(|| self.bytes.get(name_end..end).unwrap_or_default())
        })
    }

    /// Keeps the headers whose name `keep` accepts, in order, moving them down in place.
    fn retain(&mut self, keep: impl Fn(&[u8]) -> bool) {
        let (mut start, mut to, mut kept) = (0, 0, 0);
        for i in 0..self.ends.len() {
            let (name_end, end) = self.ends[i];
            let from = start;
            start = end;
            if !keep(&self.bytes[from..name_end]) {
                continue;
            }
            if from != to {
                self.bytes.copy_within(from..end, to);
            }
            let shift = from - to;
            self.ends[kept] = (name_end - shift, end - shift);
            to += end - from;
            kept += 1;
        }
        self.ends.truncate(kept);
        self.bytes.truncate(to);
    }
}

/// The request's header map (see the module docs). Cloned when a `fail_open` plugin changes a
/// map it shares.
#[derive(Debug, Clone, Default)]
pub(crate) struct Headers {
    list: List,
    /// The names changed since the map was built, each once.
    changed: Names,
    /// The values the changed names had when the map was built (only names that had any).
    before: List,
}

impl Headers {
    /// The map of `client`'s headers (a buffer and where each name and value end in it, names
    /// in lower case) with `pseudo` (names in lower case, values in pieces) in front, made in
    /// `client`'s buffers.
    pub fn with_pseudo(
        pseudo: &[(&str, &[&[u8]])],
        (mut bytes, mut ends): (Vec<u8>, Vec<(usize, usize)>),
    ) -> Headers {
        let shift: usize = pseudo
            .iter()
            .map(|(n, v)| n.len() + v.iter().map(|p| p.len()).sum::<usize>())
            .sum();
        let old = bytes.len();
        bytes.resize(old + shift, 0);
        bytes.copy_within(0..old, shift);
        for e in &mut ends {
            *e = (e.0 + shift, e.1 + shift);
        }
        let mut at = 0;
        for (name, value) in pseudo {
            let name_end = at + name.len();
            bytes[at..name_end].copy_from_slice(name.as_bytes());
            at = name_end;
            for part in *value {
                bytes[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            ends.push((name_end, at));
        }
        ends.rotate_right(pseudo.len());
        Headers {
            list: List { bytes, ends },
            ..Headers::default()
        }
    }

    /// Adds a header; its name is stored in lower case. Not counted as a change.
    pub fn push(&mut self, name: &str, value: &[u8]) {
        self.push_parts(name, &[value]);
    }

    /// [`Headers::push`] with a value in pieces (a path and its query).
    pub fn push_parts(&mut self, name: &str, value: &[&[u8]]) {
        let start = self.list.bytes.len();
        self.list.push_parts(name.as_bytes(), value);
        // Names from `http` and from the SDKs are in lower case already.
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            let name_end = start + name.len();
            self.list.bytes[start..name_end].make_ascii_lowercase();
        }
    }

    pub fn len(&self) -> usize {
        self.list.ends.len()
    }

    /// Every header, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        // Names were pushed as `&str`, lower-cased byte by byte (ASCII only changes).
        self.list
            .raw()
            .map(|(n, v)| (std::str::from_utf8(n).unwrap_or(""), v))
    }

    /// The values of `name` (lower case), in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.list.values(name.as_bytes())
    }

    /// The values of `name` as one, comma-separated, as HTTP allows; `None` when it has none.
    pub fn joined(&self, name: &str) -> Option<Vec<u8>> {
        joined(self.values(name))
    }

    /// The names changed since the map was built, each once.
    pub fn changed(&self) -> impl Iterator<Item = &str> + '_ {
        self.changed
            .iter()
            .map(|n| std::str::from_utf8(n).unwrap_or(""))
    }

    /// The values `name` (a changed name) had when the map was built, in order.
    pub fn values_before<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.before.values(name.as_bytes())
    }

    fn is_marked(&self, name: &[u8]) -> bool {
        self.changed.iter().any(|n| same(n, name))
    }

    /// Records `name` as changed, with the values it has now, unless it is already; whether
    /// it may have values now (`false`: it has none).
    fn mark(&mut self, name: &[u8]) -> bool {
        if self.is_marked(name) {
            return true;
        }
        self.changed.push(name);
        let Headers { list, before, .. } = self;
        let mut any = false;
        for v in list.values(name) {
            before.push_parts(name, &[v]);
            any = true;
        }
        any
    }

    /// Adds a value to `name` (lower case).
    pub fn add(&mut self, name: &str, value: &[u8]) {
        self.mark(name.as_bytes());
        self.list.push_parts(name.as_bytes(), &[value]);
    }

    /// Replaces the values of `name` (lower case) with `value`, which goes last.
    pub fn replace(&mut self, name: &str, value: &[u8]) {
        if self.mark(name.as_bytes()) {
            self.list.retain(|n| n != name.as_bytes());
        }
        self.list.push_parts(name.as_bytes(), &[value]);
    }

    /// Removes every value of `name` (lower case).
    pub fn remove(&mut self, name: &str) {
        if self.mark(name.as_bytes()) {
            self.list.retain(|n| n != name.as_bytes());
        }
    }

    /// Replaces every header but the pseudo-headers with `pairs` (names in lower case).
    pub fn set_all(&mut self, pairs: &[(String, Vec<u8>)]) {
        let names: Vec<Vec<u8>> = self
            .list
            .raw()
            .map(|(n, _)| n.to_vec())
            .filter(|n| !n.starts_with(b":"))
            .collect();
        for n in &names {
            self.mark(n);
        }
        for (n, _) in pairs.iter().filter(|(n, _)| !n.starts_with(':')) {
            self.mark(n.as_bytes());
        }
        self.list.retain(|n| n.starts_with(b":"));
        for (n, v) in pairs.iter().filter(|(n, _)| !n.starts_with(':')) {
            self.push(n, v);
        }
    }

    /// The map in the ABI's wire format: count, then (key length, value length) pairs, then
    /// each key and value followed by a NUL byte; all integers little-endian `u32`.
    pub fn serialize(&self) -> Vec<u8> {
        let mut w = Writer::new(self.len(), self.serialized_len());
        w.sizes(self.list.raw());
        w.pairs(self.list.raw());
        w.out
    }

    /// The length of [`Headers::serialize`]'s output.
    pub fn serialized_len(&self) -> usize {
        4 + self.len() * 10 + self.list.bytes.len()
    }
}

/// Values joined with `, `; `None` when there are none.
pub(super) fn joined<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
    let mut v = values.next()?.to_vec();
    for more in values {
        v.extend_from_slice(b", ");
        v.extend_from_slice(more);
    }
    Some(v)
}

/// Writes a map in the ABI's wire format.
pub(super) struct Writer {
    pub out: Vec<u8>,
}

impl Writer {
    pub fn new(count: usize, len: usize) -> Writer {
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&(count as u32).to_le_bytes());
        Writer { out }
    }

    pub fn sizes<'a>(&mut self, pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>) {
        for (k, v) in pairs {
            self.out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            self.out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
    }

    pub fn pairs<'a>(&mut self, pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>) {
        for (k, v) in pairs {
            self.out.extend_from_slice(k);
            self.out.push(0);
            self.out.extend_from_slice(v);
            self.out.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> Headers {
        let mut h = Headers::default();
        h.push(":method", b"GET");
        h.push("Accept", b"*/*");
        h.push("x-a", b"1");
        h.push("x-b", b"2");
        h.push("x-a", b"3");
        h
    }

    fn all(h: &Headers) -> Vec<(String, Vec<u8>)> {
        h.iter().map(|(n, v)| (n.to_owned(), v.to_vec())).collect()
    }

    #[test]
    fn pseudo_headers_go_in_front_of_the_clients_in_their_buffers() {
        let client = (b"acceptx/yx-a1".to_vec(), vec![(6, 9), (12, 13)]);
        let h = Headers::with_pseudo(
            &[(":method", &[b"GET"]), (":path", &[b"/a", b"?", b"q=1"])],
            client,
        );
        assert_eq!(
            all(&h),
            [
                (":method".to_owned(), b"GET".to_vec()),
                (":path".to_owned(), b"/a?q=1".to_vec()),
                ("accept".to_owned(), b"x/y".to_vec()),
                ("x-a".to_owned(), b"1".to_vec()),
            ]
        );
        assert_eq!(h.changed().count(), 0);
    }

    #[test]
    fn names_are_lower_case_and_values_keep_their_order() {
        let h = map();
        assert_eq!(h.len(), 5);
        assert_eq!(h.values("accept").collect::<Vec<_>>(), [b"*/*"]);
        assert_eq!(h.joined("x-a").as_deref(), Some(&b"1, 3"[..]));
        assert_eq!(h.joined("x-c"), None);
        assert_eq!(h.changed().count(), 0);
    }

    #[test]
    fn edits_move_the_rest_in_place_and_record_the_names() {
        let mut h = map();
        h.replace("x-a", b"new");
        assert_eq!(
            all(&h),
            [
                (":method".to_owned(), b"GET".to_vec()),
                ("accept".to_owned(), b"*/*".to_vec()),
                ("x-b".to_owned(), b"2".to_vec()),
                ("x-a".to_owned(), b"new".to_vec()),
            ]
        );
        h.remove("accept");
        h.add("x-a", b"more");
        h.remove("x-none");
        assert_eq!(h.joined("x-a").as_deref(), Some(&b"new, more"[..]));
        assert_eq!(h.values("accept").count(), 0);
        assert_eq!(h.changed().collect::<Vec<_>>(), ["x-a", "accept", "x-none"]);
        // What the changed names had when the map was built.
        assert_eq!(h.values_before("x-a").collect::<Vec<_>>(), [b"1", b"3"]);
        assert_eq!(h.values_before("accept").collect::<Vec<_>>(), [b"*/*"]);
        assert_eq!(h.values_before("x-none").count(), 0);
        h.set_all(&[("x-z".to_owned(), b"9".to_vec())]);
        assert_eq!(
            all(&h),
            [
                (":method".to_owned(), b"GET".to_vec()),
                ("x-z".to_owned(), b"9".to_vec())
            ]
        );
        assert_eq!(
            h.changed().collect::<Vec<_>>(),
            ["x-a", "accept", "x-none", "x-b", "x-z"]
        );
        assert_eq!(h.values_before("x-b").collect::<Vec<_>>(), [b"2"]);
        assert_eq!(h.values_before("x-a").collect::<Vec<_>>(), [b"1", b"3"]);
    }

    #[test]
    fn names_compare_and_spill() {
        assert!(same(b"x-rustygate-plugin-seen", b"x-rustygate-plugin-seen"));
        assert!(!same(
            b"x-rustygate-plugin-seen",
            b"x-rustygate-plugin-seem"
        ));
        assert!(!same(
            b"x-rustygate-plugin-seen",
            b"y-rustygate-plugin-seen"
        ));
        assert!(!same(b"x-a", b"x-ab"));
        assert!(same(b"", b""));
        let mut h = map();
        let long: Vec<String> = (0..12)
            .map(|i| format!("x-a-long-header-name-{i}"))
            .collect();
        for n in &long {
            h.add(n, b"v");
            h.add(n, b"w");
        }
        let mut want = long.clone();
        h.remove("x-a");
        want.push("x-a".to_owned());
        assert_eq!(h.changed().collect::<Vec<_>>(), want);
    }

    #[test]
    fn serializes_as_the_abi_reads_it() {
        let h = map();
        let bytes = h.serialize();
        assert_eq!(bytes.len(), h.serialized_len());
        assert_eq!(super::super::abi::deserialize_map(&bytes), Some(all(&h)));
    }
}
