//! Reading and writing the instance's memory for the host functions: bounds, the memory's
//! charge against the budget, buffers handed to the plugin.

use wasmer::{FunctionEnvMut, RuntimeError};

use super::HostState;

use crate::plugins::abi::{self, status};

/// Charges the current call for `bytes` of host work ([`Meter::charge`]): `Err` fails the call.
///
/// [`Meter::charge`]: crate::plugins::meter::Meter::charge
pub(super) fn charge(
    env: &mut FunctionEnvMut<'_, HostState>,
    bytes: usize,
) -> Result<(), RuntimeError> {
    let (state, mut store) = env.data_and_store_mut();
    state.meter.charge(&mut store, bytes as u64)
}

/// Whether `len` bytes from `ptr` are inside the plugin's memory.
pub(super) fn fits(env: &FunctionEnvMut<'_, HostState>, ptr: i32, len: usize) -> bool {
    env.data()
        .memory
        .as_ref()
        .is_some_and(|m| (ptr as u32 as u64).saturating_add(len as u64) <= m.view(env).data_size())
}

/// Reads `len` bytes from the plugin's memory, charged to the call; `Ok(None)` when the range
/// is over [`abi::MAX_TRANSFER`] or outside the memory (nothing charged or allocated then).
pub(super) fn read(
    env: &mut FunctionEnvMut<'_, HostState>,
    ptr: i32,
    len: i32,
) -> Result<Option<Vec<u8>>, RuntimeError> {
    read_at_most(env, ptr, len, abi::MAX_TRANSFER)
}

/// [`read`] with another bound than [`abi::MAX_TRANSFER`] (a body, bounded by its route).
pub(super) fn read_at_most(
    env: &mut FunctionEnvMut<'_, HostState>,
    ptr: i32,
    len: i32,
    most: usize,
) -> Result<Option<Vec<u8>>, RuntimeError> {
    let len = len as u32 as usize;
    // Nothing is charged or allocated for a range the plugin's memory cannot hold.
    if len > most || !fits(env, ptr, len) {
        return Ok(None);
    }
    charge(env, len)?;
    let Some(memory) = env.data().memory.as_ref() else {
        return Ok(None);
    };
    let mut buf = vec![0; len];
    Ok(memory
        .view(env)
        .read(u64::from(ptr as u32), &mut buf)
        .ok()
        .map(|()| buf))
}

pub(super) fn write(env: &FunctionEnvMut<'_, HostState>, ptr: i32, data: &[u8]) -> bool {
    env.data()
        .memory
        .as_ref()
        .is_some_and(|m| m.view(env).write(u64::from(ptr as u32), data).is_ok())
}

pub(super) fn write_u32(env: &FunctionEnvMut<'_, HostState>, ptr: i32, v: u32) -> bool {
    write(env, ptr, &v.to_le_bytes())
}

/// Copies `data` into memory the plugin allocates, and writes where and how long to
/// `ret_ptr` / `ret_size`. The copy is charged to the call first; the allocation runs plugin
/// code, under the same budget.
pub(super) fn give(
    env: &mut FunctionEnvMut<'_, HostState>,
    data: &[u8],
    ret_ptr: i32,
    ret_size: i32,
) -> Result<i32, RuntimeError> {
    give_at_most(env, data, ret_ptr, ret_size, abi::MAX_TRANSFER)
}

/// [`give`] with another bound than [`abi::MAX_TRANSFER`] (a body, bounded by its route).
pub(super) fn give_at_most(
    env: &mut FunctionEnvMut<'_, HostState>,
    data: &[u8],
    ret_ptr: i32,
    ret_size: i32,
    most: usize,
) -> Result<i32, RuntimeError> {
    if data.len() > most {
        return Ok(status::BAD_ARGUMENT);
    }
    let Some(alloc) = env.data().alloc.clone() else {
        return Ok(status::INVALID_MEMORY_ACCESS);
    };
    charge(env, data.len())?;
    let p = alloc.call(env, data.len() as i32)?;
    if p == 0 && !data.is_empty() {
        return Ok(status::INVALID_MEMORY_ACCESS);
    }
    if write(env, p, data)
        && write_u32(env, ret_ptr, p as u32)
        && write_u32(env, ret_size, data.len() as u32)
    {
        Ok(status::OK)
    } else {
        Ok(status::INVALID_MEMORY_ACCESS)
    }
}

// ---- buffers --------------------------------------------------------------------------------

/// The buffer `id` as the current call may read it.
pub(super) fn buffer(state: &HostState, id: i32) -> Option<bytes::Bytes> {
    match id {
        abi::buffer::PLUGIN_CONFIGURATION => Some(state.config.clone()),
        abi::buffer::VM_CONFIGURATION => Some(bytes::Bytes::new()),
        abi::buffer::HTTP_REQUEST_BODY | abi::buffer::HTTP_RESPONSE_BODY => state
            .call
            .body
            .as_ref()
            .filter(|b| b.id == id)
            .map(|b| b.data.clone()),
        _ => None,
    }
}

/// How much of a body one host call may move: the route's body limit (at least
/// [`abi::MAX_TRANSFER`]); `None` outside a body callback.
pub(super) fn body_limit(state: &HostState) -> Option<usize> {
    state
        .call
        .body
        .as_ref()
        .map(|b| b.limit.max(abi::MAX_TRANSFER))
}

// ---- header maps ----------------------------------------------------------------------------
