//! The header maps the host functions read and edit: which map a call names, and what a
//! plugin may set in it (names, values, the gateway's own fields).

use std::sync::Arc;

use wasmer::{FunctionEnvMut, RuntimeError};

use super::memory::{charge, fits};
use super::{CallData, HostState, ResponseView};

use crate::plugins::abi::{self, Pairs, status};
use crate::plugins::headers::{self, Headers};
use crate::plugins::response::{self, ResponseEdit, ResponseFields};
use crate::wire::headers::{GATEWAY_OWNED, HOP_BY_HOP, is_gateway_owned_str};

/// A header map in view.
pub(super) enum MapRef<'a> {
    Request(&'a Headers),
    Response(u16, &'a ResponseFields),
}

impl MapRef<'_> {
    pub(super) fn serialize(&self) -> Vec<u8> {
        match self {
            MapRef::Request(h) => h.serialize(),
            MapRef::Response(s, h) => response::serialize_response(*s, h),
        }
    }

    pub(super) fn serialized_len(&self) -> usize {
        match self {
            MapRef::Request(h) => h.serialized_len(),
            MapRef::Response(s, h) => response::serialized_response_len(*s, h),
        }
    }

    pub(super) fn joined(&self, name: &str) -> Option<Vec<u8>> {
        match self {
            MapRef::Request(h) => h.joined(name),
            MapRef::Response(s, h) => response::response_value(*s, h, name),
        }
    }
}

/// The map a call may read, if it is in view now.
pub(super) fn map(call: &CallData, id: i32) -> Option<MapRef<'_>> {
    match id {
        abi::map::REQUEST_HEADERS => call.request.as_deref().map(MapRef::Request),
        abi::map::RESPONSE_HEADERS => match &call.response {
            ResponseView::None => None,
            ResponseView::Edit { status, headers } => Some(MapRef::Response(*status, headers)),
            ResponseView::Seen(h) => Some(MapRef::Response(h.status, &h.headers)),
        },
        _ => None,
    }
}

/// A header map a call may change.
pub(super) enum MapMut<'a> {
    /// Shared with the exchange until changed (then copied, for a `fail_open` plugin).
    Request(&'a mut Headers),
    Response(ResponseEdit<'a>),
}

impl MapMut<'_> {
    fn add(&mut self, name: &str, value: &[u8]) {
        match self {
            MapMut::Request(h) => h.add(name, value),
            MapMut::Response(r) => r.add(name, value),
        }
    }

    fn replace(&mut self, name: &str, value: &[u8]) {
        match self {
            MapMut::Request(h) => h.replace(name, value),
            MapMut::Response(r) => r.replace(name, value),
        }
    }

    pub(super) fn remove(&mut self, name: &str) {
        match self {
            MapMut::Request(h) => h.remove(name),
            MapMut::Response(r) => r.remove(name),
        }
    }

    pub(super) fn set_all(&mut self, pairs: &[(String, Vec<u8>)]) {
        match self {
            MapMut::Request(h) => h.set_all(pairs),
            MapMut::Response(r) => r.set_all(pairs),
        }
    }
}

/// The map a call may change, if it may.
pub(super) fn map_mut(state: &mut HostState, id: i32) -> Option<MapMut<'_>> {
    let HostState { call, undo, .. } = state;
    match id {
        abi::map::REQUEST_HEADERS if call.request_writable => call
            .request
            .as_mut()
            .map(|h| MapMut::Request(Arc::make_mut(h))),
        abi::map::RESPONSE_HEADERS => match &mut call.response {
            ResponseView::Edit { headers, .. } => Some(MapMut::Response(ResponseEdit {
                headers,
                undo: undo.as_mut(),
            })),
            _ => None,
        },
        _ => None,
    }
}

/// A header a plugin may set: a valid name (in lower case) and value, not a pseudo-header, not
/// one the gateway owns (framing, hop-by-hop, forwarding, the request id: the list policies
/// are refused, `wire::headers::is_gateway_owned_str`).
pub(super) fn settable(name: &str, value: &[u8]) -> bool {
    valid_name(name) && valid_value(value) && !is_gateway_owned_str(name)
}

/// Whether `pairs`, replacing the map `id` whole (`proxy_set_header_map_pairs`), leaves every
/// header the gateway owns as it is: the SDKs' "read all, change one, write all" gives back
/// the client's `X-Forwarded-For` or `Content-Length` unchanged, which is no attempt to set it.
pub(super) fn keeps_gateway_owned(call: &CallData, id: i32, pairs: &Pairs) -> bool {
    let Some(current) = map(call, id) else {
        return true;
    };
    HOP_BY_HOP.iter().chain(&GATEWAY_OWNED).all(|&name| {
        let given = pairs.iter().filter(|(k, _)| k == name).map(|(_, v)| &v[..]);
        current.joined(name) == headers::joined(given)
    })
}

/// What `http::HeaderName::from_bytes` accepts, for a name already in lower case (an RFC 9110
/// token), checked without copying it.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| TOKEN[usize::from(b)])
}

/// The bytes of a header name in lower case: `a-z`, `0-9`, ``!#$%&'*+-.^_`|~``.
static TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    t
};

/// What `http::HeaderValue::from_bytes` accepts, checked without copying it.
fn valid_value(value: &[u8]) -> bool {
    value.iter().all(|&b| (b >= 32 && b != 127) || b == b'\t')
}

/// Reads a header name (lower-cased) and a value (`vl` 0: none) from the plugin's memory into
/// the instance's scratch buffer, and runs `f` on them with the host state: no allocation per
/// host call. The call is charged for the name and the value and for the header map `id`
/// (which the host scans or copies). `Ok(None)` when the memory does not hold them or the name
/// is not UTF-8.
pub(super) fn with_name_value<R>(
    env: &mut FunctionEnvMut<'_, HostState>,
    id: i32,
    (kp, kl): (i32, i32),
    (vp, vl): (i32, i32),
    f: impl FnOnce(&mut HostState, &str, &[u8]) -> R,
) -> Result<Option<R>, RuntimeError> {
    let (kl, vl) = (kl as u32 as usize, vl as u32 as usize);
    // Nothing is charged or allocated for a range the plugin's memory cannot hold.
    if kl > abi::MAX_TRANSFER || vl > abi::MAX_TRANSFER || !fits(env, kp, kl) || !fits(env, vp, vl)
    {
        return Ok(None);
    }
    let map_size = map(&env.data().call, id).map_or(0, |m| m.serialized_len());
    charge(env, kl + vl + map_size)?;
    let (state, store) = env.data_and_store_mut();
    let Some(memory) = state.memory.as_ref() else {
        return Ok(None);
    };
    let view = memory.view(&store);
    let mut buf = std::mem::take(&mut state.scratch);
    buf.clear();
    buf.resize(kl + vl, 0);
    let read = view.read(u64::from(kp as u32), &mut buf[..kl]).is_ok()
        && view.read(u64::from(vp as u32), &mut buf[kl..]).is_ok();
    buf[..kl].make_ascii_lowercase();
    let out = match std::str::from_utf8(&buf[..kl]) {
        Ok(k) if read => Some(f(state, k, &buf[kl..])),
        _ => None,
    };
    if buf.capacity() <= 64 * 1024 {
        state.scratch = buf;
    }
    Ok(out)
}

pub(super) enum Edit {
    Add,
    Replace,
}

pub(super) fn edit(
    mut env: FunctionEnvMut<'_, HostState>,
    how: Edit,
    id: i32,
    kp: i32,
    kl: i32,
    vp: i32,
    vl: i32,
) -> Result<i32, RuntimeError> {
    let done = with_name_value(&mut env, id, (kp, kl), (vp, vl), |state, k, v| {
        if !settable(k, v) {
            return status::BAD_ARGUMENT;
        }
        let Some(mut m) = map_mut(state, id) else {
            return status::BAD_ARGUMENT;
        };
        match how {
            Edit::Add => m.add(k, v),
            Edit::Replace => m.replace(k, v),
        }
        status::OK
    })?;
    Ok(done.unwrap_or(status::INVALID_MEMORY_ACCESS))
}

// ---- the imports ----------------------------------------------------------------------------
