//! The response's header fields as the plugins see them: the fields the client gets, changed
//! in place ([`ResponseEdit`]). An `http::HeaderMap` (a head a policy or header rule edits too,
//! or one from hyper), or the list in the client side's types that an HTTP/1.1 head only plugins
//! edit was parsed into (then it is neither converted nor copied). A plugin sees both the same:
//! a name's values together, in the order of the names' first fields, as the map gives them.
//! [`Undo`] puts back what a failing `fail_open` plugin changed.

use std::cell::RefCell;

use actix_http::header as ax;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::headers::{NAMES_PER_THREAD, Writer, header_name, joined, same};

thread_local! {
    static CLIENT_NAMES: RefCell<Vec<ax::HeaderName>> = const { RefCell::new(Vec::new()) };
}

/// [`header_name`] in the client side's types (a response's fields as a list).
pub(crate) fn client_name(name: &str) -> Option<ax::HeaderName> {
    CLIENT_NAMES.with_borrow_mut(|names| {
        if let Some(h) = names
            .iter()
            .find(|h| same(h.as_str().as_bytes(), name.as_bytes()))
        {
            return Some(h.clone());
        }
        let h = ax::HeaderName::from_bytes(name.as_bytes()).ok()?;
        if names.len() < NAMES_PER_THREAD {
            names.push(h.clone());
        }
        Some(h)
    })
}

/// The `:status` pseudo-header's value.
fn status_text(status: u16) -> ([u8; 5], usize) {
    let digit = |d: u16| b'0' + (d % 10) as u8;
    if (100..1000).contains(&status) {
        return (
            [digit(status / 100), digit(status / 10), digit(status), 0, 0],
            3,
        );
    }
    let mut out = [0; 5];
    let s = status.to_string();
    let n = s.len().min(5);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    (out, n)
}

/// A response's header fields, as the client gets them: see the module docs.
#[derive(Clone)]
pub enum ResponseFields {
    Map(HeaderMap),
    /// In the order they came; a name's values keep their order.
    List(Vec<(ax::HeaderName, ax::HeaderValue)>),
}

impl Default for ResponseFields {
    fn default() -> Self {
        ResponseFields::Map(HeaderMap::new())
    }
}

impl From<HeaderMap> for ResponseFields {
    fn from(m: HeaderMap) -> Self {
        ResponseFields::Map(m)
    }
}

impl From<Vec<(ax::HeaderName, ax::HeaderValue)>> for ResponseFields {
    fn from(l: Vec<(ax::HeaderName, ax::HeaderValue)>) -> Self {
        ResponseFields::List(l)
    }
}

impl ResponseFields {
    /// The number of fields (values, not names).
    pub fn len(&self) -> usize {
        match self {
            ResponseFields::Map(m) => m.len(),
            ResponseFields::List(l) => l.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every field as a plugin reads them: a name's values together, names in the order of
    /// their first field (`HeaderMap`'s order; a list is grouped the same way).
    fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        match self {
            ResponseFields::Map(m) => {
                Either::Left(m.iter().map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())))
            }
            ResponseFields::List(l) => {
                Either::Right(l.iter().enumerate().flat_map(move |(i, (n, _))| {
                    // A name's values go with its first field; its later fields were listed
                    // there.
                    let first = !l[..i].iter().any(|(m, _)| m == n);
                    l[i..]
                        .iter()
                        .filter(move |(m, _)| first && m == n)
                        .map(|(m, v)| (m.as_str().as_bytes(), v.as_bytes()))
                }))
            }
        }
    }

    /// The values of `name` (lower case), in order.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        match self {
            ResponseFields::Map(m) => {
                Either::Left(m.get_all(name).iter().map(HeaderValue::as_bytes))
            }
            ResponseFields::List(l) => Either::Right(
                l.iter()
                    .filter(move |(n, _)| same(n.as_str().as_bytes(), name.as_bytes()))
                    .map(|(_, v)| v.as_bytes()),
            ),
        }
    }
}

/// One of two iterators of the same items.
enum Either<A, B> {
    Left(A),
    Right(B),
}

impl<T, A: Iterator<Item = T>, B: Iterator<Item = T>> Iterator for Either<A, B> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        match self {
            Either::Left(a) => a.next(),
            Either::Right(b) => b.next(),
        }
    }
}

/// A response's status and headers, read by a plugin: `:status`, then the headers.
fn response_pairs<'a>(
    status: &'a ([u8; 5], usize),
    headers: &'a ResponseFields,
) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
    std::iter::once((&b":status"[..], &status.0[..status.1])).chain(headers.pairs())
}

/// A response's status and headers as the ABI reads them (see [`Headers::serialize`]).
pub(crate) fn serialize_response(status: u16, headers: &ResponseFields) -> Vec<u8> {
    let s = status_text(status);
    let mut w = Writer::new(headers.len() + 1, serialized_response_len(status, headers));
    w.sizes(response_pairs(&s, headers));
    w.pairs(response_pairs(&s, headers));
    w.out
}

/// The length of [`serialize_response`]'s output.
pub(crate) fn serialized_response_len(status: u16, headers: &ResponseFields) -> usize {
    let s = status_text(status);
    4 + response_pairs(&s, headers)
        .map(|(n, v)| 10 + n.len() + v.len())
        .sum::<usize>()
}

/// The values of `name` (lower case) in a response, joined (see [`Headers::joined`]).
pub(crate) fn response_value(status: u16, headers: &ResponseFields, name: &str) -> Option<Vec<u8>> {
    if name == ":status" {
        let (s, n) = status_text(status);
        return Some(s[..n].to_vec());
    }
    if name.starts_with(':') {
        return None;
    }
    joined(headers.values(name))
}

/// A client-side list changed as [`HeaderMap`] changes: read grouped by name (see
/// [`ResponseFields::pairs`]), a new name's field goes last, a replaced name keeps its place, and
/// a removed name's place goes to the name that came last (the map swaps its last entry in), so
/// that a plugin sees the same whichever it edits.
trait Fields {
    type Name: Clone + PartialEq;
    type Value;
    fn name(name: &str) -> Option<Self::Name>;
    fn value(value: &[u8]) -> Option<Self::Value>;
    fn names(&self) -> Vec<Self::Name>;
    fn values_of(&self, name: &Self::Name) -> Vec<Self::Value>;
    fn has(&self, name: &Self::Name) -> bool;
    fn append(&mut self, name: Self::Name, value: Self::Value);
    fn insert(&mut self, name: Self::Name, value: Self::Value);
    fn remove(&mut self, name: &Self::Name);
    fn clear(&mut self);
}

impl Fields for HeaderMap {
    type Name = HeaderName;
    type Value = HeaderValue;

    fn name(name: &str) -> Option<HeaderName> {
        header_name(name)
    }

    fn value(value: &[u8]) -> Option<HeaderValue> {
        HeaderValue::from_bytes(value).ok()
    }

    fn names(&self) -> Vec<HeaderName> {
        self.keys().cloned().collect()
    }

    fn values_of(&self, name: &HeaderName) -> Vec<HeaderValue> {
        self.get_all(name).iter().cloned().collect()
    }

    fn has(&self, name: &HeaderName) -> bool {
        self.contains_key(name)
    }

    fn append(&mut self, name: HeaderName, value: HeaderValue) {
        HeaderMap::append(self, name, value);
    }

    fn insert(&mut self, name: HeaderName, value: HeaderValue) {
        HeaderMap::insert(self, name, value);
    }

    fn remove(&mut self, name: &HeaderName) {
        HeaderMap::remove(self, name);
    }

    fn clear(&mut self) {
        HeaderMap::clear(self);
    }
}

type List = Vec<(ax::HeaderName, ax::HeaderValue)>;

impl Fields for List {
    type Name = ax::HeaderName;
    type Value = ax::HeaderValue;

    fn name(name: &str) -> Option<ax::HeaderName> {
        client_name(name)
    }

    fn value(value: &[u8]) -> Option<ax::HeaderValue> {
        ax::HeaderValue::from_bytes(value).ok()
    }

    fn names(&self) -> Vec<ax::HeaderName> {
        let mut names: Vec<ax::HeaderName> = Vec::new();
        for (n, _) in self {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names
    }

    fn values_of(&self, name: &ax::HeaderName) -> Vec<ax::HeaderValue> {
        self.iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn has(&self, name: &ax::HeaderName) -> bool {
        self.iter().any(|(n, _)| n == name)
    }

    fn append(&mut self, name: ax::HeaderName, value: ax::HeaderValue) {
        self.push((name, value));
    }

    fn insert(&mut self, name: ax::HeaderName, value: ax::HeaderValue) {
        let Some(i) = self.iter().position(|(n, _)| *n == name) else {
            self.push((name, value));
            return;
        };
        self[i].1 = value;
        let mut k = 0;
        self.retain(|(n, _)| {
            k += 1;
            k - 1 <= i || *n != name
        });
    }

    fn remove(&mut self, name: &ax::HeaderName) {
        let Some(i) = self.iter().position(|(n, _)| n == name) else {
            return;
        };
        // The field that starts the name read last takes the removed name's first field's
        // place, as the map's last entry takes the removed one's.
        let last = (0..self.len())
            .rev()
            .find(|&j| !self[..j].iter().any(|(n, _)| *n == self[j].0));
        if let Some(j) = last
            && self[j].0 != *name
        {
            let moved = self.remove(j);
            self[i] = moved;
        }
        self.retain(|(n, _)| n != name);
    }

    fn clear(&mut self) {
        Vec::clear(self);
    }
}

/// What changes to a response's headers replaced: the values a name had before each change.
#[derive(Default)]
pub(crate) struct Undo {
    map: Log<HeaderMap>,
    list: Log<List>,
}

impl Undo {
    pub fn new() -> Undo {
        Undo::default()
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.list.clear();
    }
}

/// A response's headers being changed by a plugin, in place; `undo`, when given, records what
/// each change replaced (a `fail_open` plugin's, undone should it fail).
pub(crate) struct ResponseEdit<'a> {
    pub headers: &'a mut ResponseFields,
    pub undo: Option<&'a mut Undo>,
}

/// What each change replaced: a name and the values it had.
type Log<F> = Vec<(<F as Fields>::Name, Vec<<F as Fields>::Value>)>;

/// One shape of the fields being changed, with its undo log.
struct Edit<'a, F: Fields> {
    fields: &'a mut F,
    undo: Option<&'a mut Log<F>>,
}

impl<F: Fields> Edit<'_, F> {
    fn record(&mut self, name: &F::Name) {
        if let Some(u) = self.undo.as_deref_mut() {
            u.push((name.clone(), self.fields.values_of(name)));
        }
    }

    fn add(&mut self, name: &str, value: &[u8]) {
        if let (Some(n), Some(v)) = (F::name(name), F::value(value)) {
            self.record(&n);
            self.fields.append(n, v);
        }
    }

    fn replace(&mut self, name: &str, value: &[u8]) {
        if let (Some(n), Some(v)) = (F::name(name), F::value(value)) {
            self.record(&n);
            self.fields.insert(n, v);
        }
    }

    fn remove(&mut self, name: &str) {
        if let Some(n) = F::name(name)
            && self.fields.has(&n)
        {
            self.record(&n);
            self.fields.remove(&n);
        }
    }

    fn set_all(&mut self, pairs: &[(String, Vec<u8>)]) {
        let pairs: Vec<(F::Name, F::Value)> = pairs
            .iter()
            .filter(|(n, _)| !n.starts_with(':'))
            .filter_map(|(n, v)| Some((F::name(n)?, F::value(v)?)))
            .collect();
        if self.undo.is_some() {
            let mut names = self.fields.names();
            names.extend(pairs.iter().map(|(n, _)| n.clone()));
            for n in &names {
                self.record(n);
            }
        }
        self.fields.clear();
        for (n, v) in pairs {
            self.fields.append(n, v);
        }
    }

    /// Puts back what the recorded changes replaced, latest first.
    fn undo(&mut self) {
        let Some(u) = self.undo.as_deref_mut() else {
            return;
        };
        while let Some((name, values)) = u.pop() {
            self.fields.remove(&name);
            for v in values {
                self.fields.append(name.clone(), v);
            }
        }
    }
}

/// Runs `f` on the shape the fields are in.
macro_rules! on_shape {
    ($fields:expr, $undo:expr, |$e:ident| $body:expr) => {
        match $fields {
            ResponseFields::Map(m) => {
                let mut $e = Edit {
                    fields: m,
                    undo: $undo.map(|u: &mut Undo| &mut u.map),
                };
                $body
            }
            ResponseFields::List(l) => {
                let mut $e = Edit {
                    fields: l,
                    undo: $undo.map(|u: &mut Undo| &mut u.list),
                };
                $body
            }
        }
    };
}

impl ResponseEdit<'_> {
    /// Adds a value to `name` (lower case; both checked by the caller).
    pub fn add(&mut self, name: &str, value: &[u8]) {
        on_shape!(&mut *self.headers, self.undo.as_deref_mut(), |e| e
            .add(name, value))
    }

    /// Replaces the values of `name` (lower case) with `value`.
    pub fn replace(&mut self, name: &str, value: &[u8]) {
        on_shape!(&mut *self.headers, self.undo.as_deref_mut(), |e| e
            .replace(name, value))
    }

    /// Removes every value of `name` (lower case).
    pub fn remove(&mut self, name: &str) {
        on_shape!(&mut *self.headers, self.undo.as_deref_mut(), |e| e
            .remove(name))
    }

    /// Replaces every header with `pairs` (pseudo-headers skipped; names in lower case).
    pub fn set_all(&mut self, pairs: &[(String, Vec<u8>)]) {
        on_shape!(&mut *self.headers, self.undo.as_deref_mut(), |e| e
            .set_all(pairs))
    }
}

/// Puts back what the changes recorded in `undo` replaced, latest first.
pub(crate) fn undo(headers: &mut ResponseFields, undo: &mut Undo) {
    on_shape!(headers, Some(undo), |e| e.undo())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_of(r: &ResponseFields) -> &HeaderMap {
        match r {
            ResponseFields::Map(m) => m,
            ResponseFields::List(_) => unreachable!("a map"),
        }
    }

    #[test]
    fn response_edits_are_undone_latest_first() {
        let mut res = HeaderMap::new();
        res.insert("x-a", HeaderValue::from_static("1"));
        res.append("x-a", HeaderValue::from_static("2"));
        res.insert("content-type", HeaderValue::from_static("text/plain"));
        let before = res.clone();
        let mut res = ResponseFields::Map(res);
        let mut log = Undo::new();
        let mut e = ResponseEdit {
            headers: &mut res,
            undo: Some(&mut log),
        };
        e.add("x-new", b"yes");
        e.replace("x-a", b"one");
        e.add("x-a", b"two");
        e.remove("content-type");
        e.remove("x-none");
        assert_eq!(
            map_of(&res).get_all("x-a").iter().collect::<Vec<_>>(),
            ["one", "two"]
        );
        assert!(map_of(&res).get("content-type").is_none());
        undo(&mut res, &mut log);
        assert_eq!(*map_of(&res), before);
        let mut e = ResponseEdit {
            headers: &mut res,
            undo: Some(&mut log),
        };
        e.set_all(&[("x-z".to_owned(), b"9".to_vec())]);
        assert_eq!(res.len(), 1);
        undo(&mut res, &mut log);
        assert_eq!(*map_of(&res), before);
        assert_eq!(
            response_value(200, &res, ":status").as_deref(),
            Some(&b"200"[..])
        );
        assert_eq!(
            response_value(200, &res, "x-a").as_deref(),
            Some(&b"1, 2"[..])
        );
        let bytes = serialize_response(200, &res);
        assert_eq!(bytes.len(), serialized_response_len(200, &res));
        let pairs = super::super::abi::deserialize_map(&bytes).unwrap();
        assert_eq!(pairs[0], (":status".to_owned(), b"200".to_vec()));
        assert_eq!(pairs.len(), 4);
    }

    #[test]
    fn a_list_reads_and_changes_as_the_map_does() {
        let fields = [
            ("x-a", "1"),
            ("content-type", "text/plain"),
            ("x-a", "2"),
            ("set-cookie", "a=1"),
            ("x-b", "3"),
            ("set-cookie", "b=2"),
        ];
        let mut map = HeaderMap::new();
        let mut list = Vec::new();
        for (n, v) in fields {
            map.append(n, HeaderValue::from_static(v));
            list.push((
                ax::HeaderName::from_static(n),
                ax::HeaderValue::from_static(v),
            ));
        }
        let mut map = ResponseFields::Map(map);
        let mut list = ResponseFields::List(list);
        type Step = fn(&mut ResponseEdit<'_>);
        let steps: [Step; 8] = [
            |_| {},
            |e| e.add("x-a", b"3"),
            |e| e.add("x-new", b"yes"),
            |e| e.replace("set-cookie", b"c=3"),
            |e| e.replace("x-other", b"4"),
            |e| e.remove("content-type"),
            |e| e.remove("x-none"),
            |e| {
                e.set_all(&[
                    ("x-z".to_owned(), b"9".to_vec()),
                    (":status".to_owned(), b"1".to_vec()),
                ])
            },
        ];
        let names = [
            "x-a",
            "set-cookie",
            "content-type",
            "x-new",
            "x-z",
            "x-other",
            "x-none",
        ];
        let same_view = |map: &ResponseFields, list: &ResponseFields| {
            assert_eq!(serialize_response(200, map), serialize_response(200, list));
            assert_eq!(
                serialized_response_len(200, list),
                serialize_response(200, list).len()
            );
            assert_eq!(map.len(), list.len());
            for n in names {
                assert_eq!(
                    response_value(200, map, n),
                    response_value(200, list, n),
                    "{n}"
                );
            }
        };
        same_view(&map, &list);
        for (i, step) in steps.iter().enumerate() {
            // Each step undone (as for a failing `fail_open` plugin): the same values again,
            // and the same view of them ...
            let undone: Vec<ResponseFields> = [&map, &list]
                .into_iter()
                .map(|fields| {
                    let mut edited = fields.clone();
                    let mut log = Undo::new();
                    step(&mut ResponseEdit {
                        headers: &mut edited,
                        undo: Some(&mut log),
                    });
                    undo(&mut edited, &mut log);
                    for n in names {
                        assert_eq!(
                            response_value(200, &edited, n),
                            response_value(200, fields, n),
                            "step {i} undone: {n}"
                        );
                    }
                    edited
                })
                .collect();
            same_view(&undone[0], &undone[1]);
            // ... and kept: the same view.
            for fields in [&mut map, &mut list] {
                step(&mut ResponseEdit {
                    headers: fields,
                    undo: None,
                });
            }
            same_view(&map, &list);
        }
    }
}
