//! Bodies through the plugins that export their callback (`proxy_on_request_body`,
//! `proxy_on_response_body`), as Envoy runs them:
//!
//! ```text
//! chunk ─► plugin 1 ─Continue─► plugin 2 ─Continue─► … ─► out (upstream or client)
//!             │ Pause: holds what it was given; its next call sees that and the next chunk
//! ```
//!
//! Each call gets the buffer the plugin holds (`body_size` is its length) and may read it
//! (`proxy_get_buffer_bytes`) and change it (`proxy_set_buffer_bytes`, up to the route's body
//! limit or 1 MiB, whichever is larger); on `Continue` the buffer, as the plugin left it, goes
//! on. What a plugin holds (pauses on) is bounded by the route's body limit; a chunk that only
//! passes through is not. The last call of a body has `end_of_stream` set; pausing there fails the plugin
//! (nothing would ever resume it). A request's plugins run in order, a response's in reverse.
//!
//! A failure is the plugin's `on_error`: `fail_closed` stops the body ([`BodyStop::Failed`]),
//! `fail_open` lets the bytes of that call go on unchanged and calls that plugin no more.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::headers::Headers;
use super::host::{BodyView, Props, ResponseHead, ResponseView};
use super::{Active, Outcome, PluginRun, PluginUse, VmError, abi, failed, local_response, with_vm};
use crate::wire::StaticResponse;

/// Why a body cannot go on.
#[derive(Debug)]
pub enum BodyStop {
    /// A plugin answered the request itself (`proxy_send_local_response`).
    Respond(StaticResponse),
    /// A `fail_closed` plugin failed (logged and counted).
    Failed,
    /// What a plugin holds went over the route's body limit.
    TooLarge,
}

/// One plugin on the body's way.
struct Stage {
    plugin: Arc<PluginUse>,
    generation: u64,
    ctx: i32,
    /// What the plugin paused on, waiting for more.
    held: BytesMut,
    /// Failed open: the body goes past it untouched.
    skipped: bool,
}

/// One body (a request's or a response's) on its way through its plugins.
pub struct BodyFilter {
    request: bool,
    stages: Vec<Stage>,
    limit: usize,
    props: Arc<Props>,
    request_headers: Arc<Headers>,
    response_headers: Option<Arc<ResponseHead>>,
    /// A response body's exchange: its plugins' contexts end (`on_log` …) when the body does.
    _run: Option<PluginRun>,
    ended: bool,
}

impl BodyFilter {
    pub(super) fn new<'a>(
        run: &PluginRun,
        request: bool,
        active: impl Iterator<Item = &'a Active>,
        limit: u64,
    ) -> Option<BodyFilter> {
        let stages: Vec<Stage> = active
            .map(|a| Stage {
                plugin: Arc::clone(&a.plugin),
                generation: a.generation,
                ctx: a.ctx,
                held: BytesMut::new(),
                skipped: false,
            })
            .collect();
        if stages.is_empty() {
            return None;
        }
        Some(BodyFilter {
            request,
            stages,
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            props: Arc::clone(&run.props),
            request_headers: Arc::clone(&run.headers),
            response_headers: None,
            _run: None,
            ended: false,
        })
    }

    /// Makes this response body's filter own the exchange's plugin run, which it sees with
    /// `response_headers`.
    pub(super) fn owning(
        mut self,
        run: PluginRun,
        response_headers: Arc<ResponseHead>,
    ) -> BodyFilter {
        self.response_headers = Some(response_headers);
        self._run = Some(run);
        self
    }

    /// Bytes the plugins hold now (paused on, waiting for more), all stages together: what
    /// this body costs the worker between calls.
    pub fn held(&self) -> u64 {
        self.stages.iter().map(|s| s.held.len() as u64).sum()
    }

    fn hook(&self) -> &'static str {
        if self.request {
            "on_request_body"
        } else {
            "on_response_body"
        }
    }

    /// Passes one chunk (`end`: the body's last; it may be empty) through the plugins and
    /// returns what goes on now (often nothing, while a plugin pauses).
    pub fn chunk(&mut self, mut data: Bytes, end: bool) -> Result<Bytes, BodyStop> {
        if self.ended {
            return Ok(data);
        }
        if self.props.is_closed() {
            // The exchange is over (its answer was given): the rest of a request body has
            // nowhere to go. Not the plugin's failure, so not counted as one.
            return Err(BodyStop::Failed);
        }
        self.ended = end;
        let hook = self.hook();
        let id = if self.request {
            abi::buffer::HTTP_REQUEST_BODY
        } else {
            abi::buffer::HTTP_RESPONSE_BODY
        };
        for i in 0..self.stages.len() {
            if data.is_empty() && !end {
                // A plugin before this one holds the bytes.
                return Ok(Bytes::new());
            }
            let stage = &mut self.stages[i];
            if stage.skipped {
                continue;
            }
            let view = if stage.held.is_empty() {
                data
            } else {
                stage.held.extend_from_slice(&data);
                let view = stage.held.split().freeze();
                // What it held and what came: more than a plugin may hold.
                if view.len() > self.limit {
                    return Err(BodyStop::TooLarge);
                }
                view
            };
            let at = Some((stage.generation, stage.ctx));
            let called = with_vm(&stage.plugin, at, |vm, _| {
                vm.in_call(|vm| {
                    let d = vm.data();
                    d.request = Some(Arc::clone(&self.request_headers));
                    d.response = match &self.response_headers {
                        Some(h) => ResponseView::Seen(Arc::clone(h)),
                        None => ResponseView::None,
                    };
                    d.props = Some(Arc::clone(&self.props));
                    d.body = Some(BodyView {
                        id,
                        data: view.clone(),
                        edited: false,
                        // A chunk that only passes may be edited past a small route limit; the
                        // bound is on host memory, and holding is checked below.
                        limit: self.limit.max(abi::MAX_TRANSFER),
                    });
                    let action = vm.on_body(self.request, stage.ctx, end)?;
                    let d = vm.data();
                    let local = d.local.take();
                    if local.is_none() && action != abi::ACTION_CONTINUE && end {
                        return Err(VmError::Refused(
                            "paused at the end of the body (Action::Pause), which nothing would \
                             resume"
                                .into(),
                        ));
                    }
                    // The plugin's version when it changed the body.
                    let edited = d.body.take().filter(|b| b.edited).map(|b| b.data);
                    Ok((local, edited, action))
                })
            });
            match called {
                Ok(((local, edited, action), _)) => {
                    if let Some(local) = local {
                        return Err(BodyStop::Respond(local_response(*local)));
                    }
                    // Otherwise the same bytes (and, the call's view cleared, the only reference
                    // to them, so holding them again copies nothing).
                    let now = edited.unwrap_or(view);
                    if action == abi::ACTION_CONTINUE {
                        data = now;
                    } else if now.len() > self.limit {
                        return Err(BodyStop::TooLarge);
                    } else {
                        stage.held = now
                            .try_into_mut()
                            .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
                        return Ok(Bytes::new());
                    }
                }
                Err(e) => {
                    if let Outcome::Failed = failed(&stage.plugin, self.props.route(), hook, &e) {
                        return Err(BodyStop::Failed);
                    }
                    // Fail open: what it was given goes on as it was; it is called no more.
                    stage.skipped = true;
                    data = view;
                }
            }
        }
        Ok(data)
    }
}
