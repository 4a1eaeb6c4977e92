//! The functions a plugin imports (the proxy-wasm ABI's host side), as one [`Imports`].

use std::time::{SystemTime, UNIX_EPOCH};

use wasmer::{Function, FunctionEnv, FunctionEnvMut, Imports, RuntimeError, Store, Value};

use super::maps::{Edit, edit, keeps_gateway_owned, map, map_mut, settable, with_name_value};
use super::memory::{
    body_limit, buffer, charge, fits, give, give_at_most, read, read_at_most, write, write_u32,
};
use super::{HostState, LocalResponse, Props, ResponseView};

use crate::plugins::abi::{self, errno, status};
use crate::plugins::log;
use crate::wire::headers::is_gateway_owned_str;

pub(super) fn imports(
    store: &mut Store,
    env: &FunctionEnv<HostState>,
    module: &wasmer::Module,
) -> Imports {
    let mut i = Imports::new();
    // Host functions outside the subset that the module imports (`abi::Import::Stub`): typed
    // as the module declares them, answering `UNIMPLEMENTED`.
    for imp in module.imports() {
        let (wasmer::ExternType::Function(ty), Ok(abi::Import::Stub)) =
            (imp.ty(), abi::check_import(imp.module(), imp.name()))
        else {
            continue;
        };
        let results: Vec<Value> = ty
            .results()
            .iter()
            .map(|t| match t {
                wasmer::Type::I32 => Value::I32(status::UNIMPLEMENTED),
                wasmer::Type::I64 => Value::I64(0),
                wasmer::Type::F32 => Value::F32(0.0),
                wasmer::Type::F64 => Value::F64(0.0),
                _ => Value::I32(0),
            })
            .collect();
        let name = imp.name().to_owned();
        let stub = Function::new_with_env(store, env, ty.clone(), move |env, _args| {
            tracing::debug!(
                plugin = &*env.data().plugin,
                "{name} is not supported by RustyGate: answered UNIMPLEMENTED"
            );
            Ok(results.clone())
        });
        i.define(imp.module(), imp.name(), stub);
    }
    macro_rules! f {
        ($body:expr) => {
            Function::new_typed_with_env(store, env, $body)
        };
    }
    let e = "env";
    i.define(
        e,
        "proxy_log",
        f!(|mut env: FunctionEnvMut<HostState>,
            level: i32,
            p: i32,
            l: i32|
         -> Result<i32, RuntimeError> {
            let len = l as u32 as usize;
            if len > abi::MAX_TRANSFER {
                return Ok(status::INVALID_MEMORY_ACCESS);
            }
            // At most a line's worth is read, and charged whether or not the line is logged.
            let take = len.min(log::MAX_LINE);
            let d = env.data();
            if !log::admit(&d.plugin, route(d)) {
                if !fits(&env, p, take) {
                    return Ok(status::INVALID_MEMORY_ACCESS);
                }
                charge(&mut env, take)?;
                return Ok(status::OK);
            }
            let Some(msg) = read(&mut env, p, take as i32)? else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            let d = env.data();
            log::line(&d.plugin, route(d), level, &msg, len - take);
            Ok(status::OK)
        }),
    );
    i.define(
        e,
        "proxy_get_log_level",
        f!(|env: FunctionEnvMut<HostState>, ret: i32| -> i32 {
            // INFO: debug and trace lines are not worth a call across the boundary.
            if write_u32(&env, ret, 2) {
                status::OK
            } else {
                status::INVALID_MEMORY_ACCESS
            }
        }),
    );
    i.define(
        e,
        "proxy_set_effective_context",
        f!(|_env: FunctionEnvMut<HostState>, _ctx: i32| -> i32 { status::OK }),
    );
    i.define(
        e,
        "proxy_get_buffer_bytes",
        f!(|mut env: FunctionEnvMut<HostState>,
            id: i32,
            start: i32,
            max: i32,
            rp: i32,
            rs: i32|
         -> Result<i32, RuntimeError> {
            let Some(buf) = buffer(env.data(), id) else {
                return Ok(status::NOT_FOUND);
            };
            let start = start as u32 as usize;
            let end = start.saturating_add(max as u32 as usize).min(buf.len());
            let Some(slice) = buf.get(start..end) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let most = body_limit(env.data()).unwrap_or(abi::MAX_TRANSFER);
            give_at_most(&mut env, slice, rp, rs, most)
        }),
    );
    i.define(
        e,
        "proxy_get_buffer_status",
        f!(
            |env: FunctionEnvMut<HostState>, id: i32, rl: i32, rf: i32| -> i32 {
                let Some(len) = buffer(env.data(), id).map(|b| b.len()) else {
                    return status::NOT_FOUND;
                };
                if write_u32(&env, rl, len as u32) && write_u32(&env, rf, 0) {
                    status::OK
                } else {
                    status::INVALID_MEMORY_ACCESS
                }
            }
        ),
    );
    i.define(
        e,
        "proxy_set_buffer_bytes",
        // Only the body in view is writable; configurations are read-only.
        f!(|mut env: FunctionEnvMut<HostState>,
            id: i32,
            start: i32,
            size: i32,
            p: i32,
            l: i32|
         -> Result<i32, RuntimeError> {
            let Some(most) = body_limit(env.data()) else {
                return Ok(status::NOT_FOUND);
            };
            let Some(value) = read_at_most(&mut env, p, l, most)? else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            let Some(len) = env
                .data()
                .call
                .body
                .as_ref()
                .filter(|b| b.id == id)
                .map(|b| b.data.len())
            else {
                return Ok(status::NOT_FOUND);
            };
            // The new buffer is a copy of the body with the value in it.
            charge(&mut env, len)?;
            let Some(body) = env.data_mut().call.body.as_mut().filter(|b| b.id == id) else {
                return Ok(status::NOT_FOUND);
            };
            let new = abi::splice(
                &body.data,
                start as u32 as usize,
                size as u32 as usize,
                &value,
            );
            if new.len() > body.limit {
                // The route's body limit bounds what a plugin can make of a body too.
                return Ok(status::BAD_ARGUMENT);
            }
            body.data = bytes::Bytes::from(new);
            body.edited = true;
            Ok(status::OK)
        }),
    );
    i.define(
        e,
        "proxy_get_header_map_pairs",
        f!(|mut env: FunctionEnvMut<HostState>,
            id: i32,
            rp: i32,
            rs: i32|
         -> Result<i32, RuntimeError> {
            let Some(size) = map(&env.data().call, id).map(|m| m.serialized_len()) else {
                return Ok(status::NOT_FOUND);
            };
            // Serialising is charged as much again as the copy `give` charges.
            charge(&mut env, size)?;
            let Some(bytes) = map(&env.data().call, id).map(|m| m.serialize()) else {
                return Ok(status::NOT_FOUND);
            };
            give(&mut env, &bytes, rp, rs)
        }),
    );
    i.define(
        e,
        "proxy_get_header_map_size",
        f!(
            |mut env: FunctionEnvMut<HostState>, id: i32, rs: i32| -> Result<i32, RuntimeError> {
                let Some(size) = map(&env.data().call, id).map(|m| m.serialized_len()) else {
                    return Ok(status::NOT_FOUND);
                };
                // Measuring a response's map walks it.
                charge(&mut env, size)?;
                if write_u32(&env, rs, size as u32) {
                    Ok(status::OK)
                } else {
                    Ok(status::INVALID_MEMORY_ACCESS)
                }
            }
        ),
    );
    i.define(
        e,
        "proxy_set_header_map_pairs",
        f!(|mut env: FunctionEnvMut<HostState>,
            id: i32,
            p: i32,
            l: i32|
         -> Result<i32, RuntimeError> {
            let Some(bytes) = read(&mut env, p, l)? else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            // The map it replaces is walked (and, for the request, copied) too.
            let size = map(&env.data().call, id).map_or(0, |m| m.serialized_len());
            charge(&mut env, size)?;
            let Some(pairs) = abi::deserialize_map(&bytes) else {
                return Ok(status::BAD_ARGUMENT);
            };
            // A header the gateway owns may only be given back as it is.
            if pairs
                .iter()
                .any(|(k, v)| !k.starts_with(':') && !is_gateway_owned_str(k) && !settable(k, v))
                || !keeps_gateway_owned(&env.data().call, id, &pairs)
            {
                return Ok(status::BAD_ARGUMENT);
            }
            let Some(mut m) = map_mut(env.data_mut(), id) else {
                return Ok(status::BAD_ARGUMENT);
            };
            // Pseudo-headers stay as they are; the rest is replaced.
            m.set_all(&pairs);
            Ok(status::OK)
        }),
    );
    i.define(
        e,
        "proxy_get_header_map_value",
        f!(|mut env: FunctionEnvMut<HostState>,
            id: i32,
            kp: i32,
            kl: i32,
            rp: i32,
            rs: i32|
         -> Result<i32, RuntimeError> {
            // Several values read as one, comma-separated, as HTTP allows.
            let found = with_name_value(&mut env, id, (kp, kl), (0, 0), |state, k, _| {
                map(&state.call, id).map(|m| m.joined(k))
            })?;
            match found {
                None => Ok(status::INVALID_MEMORY_ACCESS),
                Some(None | Some(None)) => Ok(status::NOT_FOUND),
                Some(Some(Some(v))) => give(&mut env, &v, rp, rs),
            }
        }),
    );
    i.define(
        e,
        "proxy_add_header_map_value",
        f!(|env: FunctionEnvMut<HostState>,
            id: i32,
            kp: i32,
            kl: i32,
            vp: i32,
            vl: i32|
         -> Result<i32, RuntimeError> { edit(env, Edit::Add, id, kp, kl, vp, vl) }),
    );
    i.define(
        e,
        "proxy_replace_header_map_value",
        f!(|env: FunctionEnvMut<HostState>,
            id: i32,
            kp: i32,
            kl: i32,
            vp: i32,
            vl: i32|
         -> Result<i32, RuntimeError> { edit(env, Edit::Replace, id, kp, kl, vp, vl) }),
    );
    i.define(
        e,
        "proxy_remove_header_map_value",
        f!(|mut env: FunctionEnvMut<HostState>,
            id: i32,
            kp: i32,
            kl: i32|
         -> Result<i32, RuntimeError> {
            let done = with_name_value(&mut env, id, (kp, kl), (0, 0), |state, k, _| {
                // `content-length` may go (what the SDKs' body examples do before changing
                // a body; the gateway frames bodies itself), never be set.
                if !settable(k, b"") && k != "content-length" {
                    return status::BAD_ARGUMENT;
                }
                let Some(mut m) = map_mut(state, id) else {
                    return status::BAD_ARGUMENT;
                };
                m.remove(k);
                status::OK
            })?;
            Ok(done.unwrap_or(status::INVALID_MEMORY_ACCESS))
        }),
    );
    i.define(
        e,
        "proxy_send_local_response",
        f!(|mut env: FunctionEnvMut<HostState>,
            code: i32,
            _dp: i32,
            _dl: i32,
            bp: i32,
            bl: i32,
            hp: i32,
            hl: i32,
            _grpc: i32|
         -> Result<i32, RuntimeError> {
            let (Some(body), Some(h)) = (read(&mut env, bp, bl)?, read(&mut env, hp, hl)?) else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            let Some(headers) = abi::deserialize_map(&h) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let call = &mut env.data_mut().call;
            // From a headers or a body callback, not from on_log.
            let may_answer = call.request_writable
                || matches!(call.response, ResponseView::Edit { .. })
                || call.body.is_some();
            if !(200..=599).contains(&code)
                || !may_answer
                || headers.iter().any(|(k, v)| !settable(k, v))
            {
                return Ok(status::BAD_ARGUMENT);
            }
            call.local = Some(Box::new(LocalResponse {
                status: code as u16,
                headers,
                body,
            }));
            Ok(status::OK)
        }),
    );
    for name in [
        "proxy_continue_request",
        "proxy_continue_response",
        "proxy_done",
    ] {
        // Nothing is ever paused, so continuing is a no-op.
        i.define(
            e,
            name,
            f!(|_env: FunctionEnvMut<HostState>| -> i32 { status::OK }),
        );
    }
    i.define(
        e,
        "proxy_continue_stream",
        f!(|_env: FunctionEnvMut<HostState>, _stream: i32| -> i32 { status::OK }),
    );
    i.define(
        e,
        "proxy_get_property",
        f!(|mut env: FunctionEnvMut<HostState>,
            pp: i32,
            pl: i32,
            rp: i32,
            rs: i32|
         -> Result<i32, RuntimeError> {
            let Some(path) = read(&mut env, pp, pl)? else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            let Some(path) = abi::property_path(&path) else {
                return Ok(status::NOT_FOUND);
            };
            let d = env.data();
            let value = match &d.call.props {
                Some(p) => p.get(&path, &d.plugin),
                None if path == "plugin_name" => Some(d.plugin.as_bytes().to_vec()),
                None => None,
            };
            match value {
                Some(v) => give(&mut env, &v, rp, rs),
                None => Ok(status::NOT_FOUND),
            }
        }),
    );
    i.define(
        e,
        "proxy_get_current_time_nanoseconds",
        f!(|env: FunctionEnvMut<HostState>, ret: i32| -> i32 {
            if write(&env, ret, &now_nanos().to_le_bytes()) {
                status::OK
            } else {
                status::INVALID_MEMORY_ACCESS
            }
        }),
    );

    let w = "wasi_snapshot_preview1";
    i.define(
        w,
        "fd_write",
        f!(|mut env: FunctionEnvMut<HostState>,
            fd: i32,
            iovs: i32,
            n: i32,
            ret: i32|
         -> Result<i32, RuntimeError> {
            if fd != 1 && fd != 2 {
                return Ok(errno::BADF);
            }
            let mut text = Vec::new();
            for k in 0..n.clamp(0, 64) {
                let Some(iov) = read(&mut env, iovs.wrapping_add(k * 8), 8)? else {
                    return Ok(errno::FAULT);
                };
                let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                let room = (abi::MAX_TRANSFER - text.len()) as i32;
                let Some(b) = read(&mut env, ptr, len.clamp(0, room))? else {
                    return Ok(errno::FAULT);
                };
                text.extend_from_slice(&b);
            }
            let level = if fd == 2 { 3 } else { 2 };
            let d = env.data();
            for line in String::from_utf8_lossy(&text).lines().take(64) {
                if log::admit(&d.plugin, route(d)) {
                    log::line(&d.plugin, route(d), level, line.as_bytes(), 0);
                }
            }
            if write_u32(&env, ret, text.len() as u32) {
                Ok(errno::SUCCESS)
            } else {
                Ok(errno::FAULT)
            }
        }),
    );
    i.define(
        w,
        "clock_time_get",
        f!(
            |env: FunctionEnvMut<HostState>, _id: i32, _precision: i64, ret: i32| -> i32 {
                if write(&env, ret, &now_nanos().to_le_bytes()) {
                    errno::SUCCESS
                } else {
                    errno::FAULT
                }
            }
        ),
    );
    i.define(
        w,
        "random_get",
        f!(
            |mut env: FunctionEnvMut<HostState>, p: i32, l: i32| -> Result<i32, RuntimeError> {
                let len = l as u32 as usize;
                if len > abi::MAX_TRANSFER {
                    return Ok(errno::INVAL);
                }
                // The range is checked and the fill charged before any byte is made; the bytes go
                // straight into the plugin's memory, a block at a time, with no buffer of `len`.
                if !fits(&env, p, len) {
                    return Ok(errno::FAULT);
                }
                charge(&mut env, len)?;
                const BLOCK: usize = 4096;
                let mut block = [0u8; BLOCK];
                let mut at = p as u32 as usize;
                for n in (0..len).step_by(BLOCK).map(|from| (len - from).min(BLOCK)) {
                    rand::RngCore::fill_bytes(&mut rand::rng(), &mut block[..n]);
                    if !write(&env, at as i32, &block[..n]) {
                        return Ok(errno::FAULT);
                    }
                    at += n;
                }
                Ok(errno::SUCCESS)
            }
        ),
    );
    for name in ["environ_sizes_get", "args_sizes_get"] {
        // No environment and no arguments: a plugin sees nothing of the gateway's process.
        i.define(
            w,
            name,
            f!(
                |env: FunctionEnvMut<HostState>, count: i32, size: i32| -> i32 {
                    if write_u32(&env, count, 0) && write_u32(&env, size, 0) {
                        errno::SUCCESS
                    } else {
                        errno::FAULT
                    }
                }
            ),
        );
    }
    for name in ["environ_get", "args_get"] {
        i.define(
            w,
            name,
            f!(|_env: FunctionEnvMut<HostState>, _a: i32, _b: i32| -> i32 { errno::SUCCESS }),
        );
    }
    i.define(
        w,
        "proc_exit",
        f!(
            |_env: FunctionEnvMut<HostState>, code: i32| -> Result<(), RuntimeError> {
                Err(RuntimeError::new(format!("proc_exit({code})")))
            }
        ),
    );
    i
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The route of the current call, for its log lines; `""` outside a request (start-up).
pub(super) fn route(state: &HostState) -> &str {
    state.call.props.as_deref().map_or("", Props::route)
}
