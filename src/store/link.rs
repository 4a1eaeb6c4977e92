//! The store's connection, owned by the gateway and replaced when it stops answering.
//!
//! redis-rs reconnects only when the socket reports an error. A connection whose replies stop
//! coming (a black-holed path, a stalled peer behind a proxy that still acknowledges bytes) never
//! errors, and since Redis answers in order, every later call waits behind the reply that does
//! not come. So a call that timed out, or failed on the connection itself, retires the
//! connection ([`Link::replace`]): dropping it closes the socket and stops whatever redis-rs
//! was still reading from it. The next call connects afresh, once for every caller that asks
//! meanwhile: the connection is made by one background task whose result they all share, so a
//! burst of requests never opens a connection each.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::Shared;
use redis::ConnectionInfo;
use redis::aio::MultiplexedConnection;

use super::{CONNECT_TIMEOUT, StoreError, socket};

/// A connection, and the task reading its replies: that task is stopped (and the socket
/// closed) when the link lets go of the connection, even while calls still hold clones of it
/// (theirs then fail at once). redis-rs would otherwise keep reading until every call in flight
/// had its answer, which a stalled or hostile store never gives.
#[derive(Clone)]
struct Live {
    conn: MultiplexedConnection,
    _reader: Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Connected = Result<Live, Arc<str>>;
type Connecting = Shared<Pin<Box<dyn Future<Output = Connected> + Send>>>;

/// Where the link stands. `generation` counts the connections retired so far: a caller that
/// found a connection broken retires it only if no one has replaced it already.
enum State {
    Idle,
    Connecting(Connecting),
    Ready(Live),
}

/// One multiplexed connection to the store, made lazily and replaced after a failure.
pub struct Link {
    info: ConnectionInfo,
    state: Mutex<(u64, State)>,
}

impl Link {
    pub fn new(info: ConnectionInfo) -> Link {
        Link {
            info,
            state: Mutex::new((0, State::Idle)),
        }
    }

    /// Connects (socket, TLS, `AUTH`, `SELECT`) within [`CONNECT_TIMEOUT`], replies capped
    /// ([`socket::Capped`]), and starts the task that reads them.
    async fn connect(info: ConnectionInfo) -> Connected {
        let made = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let stream = socket::connect(&info).await?;
            let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
            let (conn, reader) =
                MultiplexedConnection::new_with_config(info.redis_settings(), stream, config)
                    .await?;
            let reader = Arc::new(AbortOnDrop(tokio::spawn(reader)));
            Ok::<_, redis::RedisError>(Live {
                conn,
                _reader: reader,
            })
        })
        .await;
        match made {
            Ok(Ok(live)) => Ok(live),
            Ok(Err(e)) => Err(Arc::from(e.to_string())),
            Err(_) => Err(Arc::from(format!(
                "no connection within {CONNECT_TIMEOUT:?}"
            ))),
        }
    }

    /// The connection and its generation, connecting if there is none. The connection is made
    /// in a task of its own: a caller that gives up (its timeout) does not stop it, and every
    /// caller meanwhile waits for the same attempt. A failed attempt leaves the link idle; the
    /// store's pause after an error spaces the attempts.
    pub async fn get(&self) -> Result<(u64, MultiplexedConnection), StoreError> {
        let (generation, connecting) = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let generation = s.0;
            match &s.1 {
                State::Ready(live) => return Ok((generation, live.conn.clone())),
                State::Connecting(f) => (generation, f.clone()),
                State::Idle => {
                    let attempt = tokio::spawn(Link::connect(self.info.clone()));
                    let f: Pin<Box<dyn Future<Output = Connected> + Send>> = Box::pin(async move {
                        attempt
                            .await
                            .unwrap_or_else(|e| Err(Arc::from(e.to_string())))
                    });
                    let f = f.shared();
                    s.1 = State::Connecting(f.clone());
                    (generation, f)
                }
            }
        };
        let r = connecting.await;
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.0 == generation && matches!(s.1, State::Connecting(_)) {
            s.1 = match &r {
                Ok(c) => State::Ready(c.clone()),
                Err(_) => State::Idle,
            };
        }
        r.map(|live| (generation, live.conn))
            .map_err(|e| StoreError::Connect(e.to_string()))
    }

    /// Retires the connection of `generation`, found stalled or broken: it is dropped (its
    /// socket closed once the calls still holding it end) and the next call connects afresh.
    /// A connection that already replaced it is left alone.
    pub fn replace(&self, generation: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.0 == generation {
            s.0 += 1;
            s.1 = State::Idle;
        }
    }
}

/// Whether a failed call says the connection itself is unusable (rather than Redis refusing
/// one command, e.g. `OOM` or a script error).
pub fn connection_failed(e: &StoreError) -> bool {
    match e {
        StoreError::Timeout(_) => true,
        StoreError::Redis(e) => {
            e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error()
        }
        StoreError::Paused | StoreError::Answer(_) | StoreError::Connect(_) => false,
    }
}
