//! A header map as the plugins see it: pseudo-headers first (`:method`, `:path`, `:authority`
//! or `:status`), then the rest, names in lower case, all in one buffer, with the names a
//! plugin changed.
//!
//! One buffer, so that sharing a copy with a plugin that changes it costs two allocations, not
//! two per header; the changed names, so that making the plugins' changes on the real headers
//! looks at those names only, not at every value of every header.

/// A header map (see the module docs). Cloned when a plugin changes a map it shares.
#[derive(Debug, Clone, Default)]
pub(crate) struct Headers {
    bytes: Vec<u8>,
    /// Where each header's name and value end in `bytes`; each starts where the previous ended.
    ends: Vec<(usize, usize)>,
    changed: Changed,
}

/// The names a plugin changed since the map was built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Changed {
    #[default]
    None,
    /// Added to, replaced or removed (lower case, each once).
    Names(Vec<String>),
    /// Every header was replaced (`proxy_set_header_map_pairs`).
    All,
}

impl Headers {
    /// An empty map with room for `n` headers of `bytes` bytes in all.
    pub fn with_capacity(n: usize, bytes: usize) -> Headers {
        Headers {
            bytes: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(n),
            changed: Changed::None,
        }
    }

    /// Adds a header; its name is stored in lower case. Not counted as a change.
    pub fn push(&mut self, name: &str, value: &[u8]) {
        self.push_parts(name, &[value]);
    }

    /// [`Headers::push`] with a value in pieces (a path and its query).
    pub fn push_parts(&mut self, name: &str, value: &[&[u8]]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(name.as_bytes());
        // Names from `http` and from the SDKs are in lower case already.
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.bytes[start..].make_ascii_lowercase();
        }
        let name_end = self.bytes.len();
        for part in value {
            self.bytes.extend_from_slice(part);
        }
        self.ends.push((name_end, self.bytes.len()));
    }

    pub fn len(&self) -> usize {
        self.ends.len()
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

    /// Every header, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        // Names were pushed as `&str`, lower-cased byte by byte (ASCII only changes).
        self.raw()
            .map(|(n, v)| (std::str::from_utf8(n).unwrap_or(""), v))
    }

    /// The values of `name` (lower case), in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.raw()
            .filter(move |(n, _)| *n == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// The values of `name` as one, comma-separated, as HTTP allows; `None` when it has none.
    pub fn joined(&self, name: &str) -> Option<Vec<u8>> {
        let mut values = self.values(name);
        let mut v = values.next()?.to_vec();
        for more in values {
            v.extend_from_slice(b", ");
            v.extend_from_slice(more);
        }
        Some(v)
    }

    pub fn changed(&self) -> &Changed {
        &self.changed
    }

    fn mark(&mut self, name: &str) {
        match &mut self.changed {
            Changed::All => {}
            Changed::Names(names) if names.iter().any(|n| n == name) => {}
            Changed::Names(names) => names.push(name.to_owned()),
            Changed::None => self.changed = Changed::Names(vec![name.to_owned()]),
        }
    }

    /// Adds a value to `name` (lower case).
    pub fn add(&mut self, name: &str, value: &[u8]) {
        self.push(name, value);
        self.mark(name);
    }

    /// Replaces the values of `name` (lower case) with `value`, which goes last.
    pub fn replace(&mut self, name: &str, value: &[u8]) {
        self.retain(|n| n != name.as_bytes());
        self.add(name, value);
    }

    /// Removes every value of `name` (lower case).
    pub fn remove(&mut self, name: &str) {
        self.retain(|n| n != name.as_bytes());
        self.mark(name);
    }

    /// Replaces every header but the pseudo-headers with `pairs` (names in lower case).
    pub fn set_all(&mut self, pairs: &[(String, Vec<u8>)]) {
        self.retain(|n| n.starts_with(b":"));
        for (n, v) in pairs.iter().filter(|(n, _)| !n.starts_with(':')) {
            self.push(n, v);
        }
        self.changed = Changed::All;
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
            self.bytes.copy_within(from..end, to);
            let shift = from - to;
            self.ends[kept] = (name_end - shift, end - shift);
            to += end - from;
            kept += 1;
        }
        self.ends.truncate(kept);
        self.bytes.truncate(to);
    }

    /// The map in the ABI's wire format: count, then (key length, value length) pairs, then
    /// each key and value followed by a NUL byte; all integers little-endian `u32`.
    pub fn serialize(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.serialized_len());
        out.extend_from_slice(&(self.len() as u32).to_le_bytes());
        for (k, v) in self.raw() {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (k, v) in self.raw() {
            out.extend_from_slice(k);
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out
    }

    /// The length of [`Headers::serialize`]'s output.
    pub fn serialized_len(&self) -> usize {
        4 + self.len() * 10 + self.bytes.len()
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
    fn names_are_lower_case_and_values_keep_their_order() {
        let h = map();
        assert_eq!(h.len(), 5);
        assert_eq!(h.values("accept").collect::<Vec<_>>(), [b"*/*"]);
        assert_eq!(h.joined("x-a").as_deref(), Some(&b"1, 3"[..]));
        assert_eq!(h.joined("x-c"), None);
        assert_eq!(*h.changed(), Changed::None);
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
        assert_eq!(
            *h.changed(),
            Changed::Names(vec!["x-a".into(), "accept".into(), "x-none".into()])
        );
        h.set_all(&[("x-z".to_owned(), b"9".to_vec())]);
        assert_eq!(
            all(&h),
            [
                (":method".to_owned(), b"GET".to_vec()),
                ("x-z".to_owned(), b"9".to_vec())
            ]
        );
        assert_eq!(*h.changed(), Changed::All);
    }

    #[test]
    fn serializes_as_the_abi_reads_it() {
        let h = map();
        let bytes = h.serialize();
        assert_eq!(bytes.len(), h.serialized_len());
        assert_eq!(super::super::abi::deserialize_map(&bytes), Some(all(&h)));
    }
}
