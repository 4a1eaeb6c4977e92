//! A value with the byte range it came from in its source file.

use std::ops::{Deref, Range};

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer};

/// A config value and where it was written. Deserialises like `T`; the span is filled in by the
/// TOML deserializer so that every diagnostic can point at `file:line:col`.
///
/// The span is kept as two `u32` (config files are capped far below 4 GiB): a route has some
/// twenty spanned fields, and a repo can have 100,000 routes.
#[derive(Clone, PartialEq, Eq)]
pub struct Spanned<T> {
    value: T,
    start: u32,
    end: u32,
}

impl<T> Spanned<T> {
    /// Wraps a value with a span (used by tests and by the loader for table keys).
    pub fn new(value: T, span: Range<usize>) -> Self {
        let at = |i: usize| u32::try_from(i).unwrap_or(u32::MAX);
        Self {
            value,
            start: at(span.start),
            end: at(span.end),
        }
    }

    /// Byte range of the value in its file.
    pub fn span(&self) -> Range<usize> {
        self.start as usize..self.end as usize
    }

    pub fn get(&self) -> &T {
        &self.value
    }

    pub fn into_inner(self) -> T {
        self.value
    }
}

impl<T> Deref for Spanned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Spanned<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let inner = toml::Spanned::<T>::deserialize(deserializer)?;
        let span = inner.span();
        Ok(Self::new(inner.into_inner(), span))
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Spanned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spanned")
            .field("value", &self.value)
            .field("span", &self.span())
            .finish()
    }
}

impl<T: JsonSchema> JsonSchema for Spanned<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        T::schema_name()
    }

    fn schema_id() -> std::borrow::Cow<'static, str> {
        T::schema_id()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}
