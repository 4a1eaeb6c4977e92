//! Forwarding to upstreams: the pooled hyper client, header rules and streaming bodies.
//!
//! Connection pools live in the client, outside any snapshot, keyed by target address: a config
//! swap that keeps a target keeps its warm connections.

pub mod body;
pub mod headers;

use std::cell::RefCell;
use std::error::Error as _;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use body::{BodyError, ProxyBody};

type HttpClient = Client<HttpConnector, ProxyBody>;

/// How long an idle upstream connection is kept in the pool.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const POOL_MAX_IDLE_PER_TARGET: usize = 512;

/// One worker's upstream clients. The connect timeout lives in the connector, so there is one
/// client per distinct connect timeout (in practice one or two).
#[derive(Default)]
pub struct UpstreamClients {
    clients: RefCell<Vec<(Duration, HttpClient)>>,
}

impl UpstreamClients {
    pub fn get(&self, connect_timeout: Duration) -> HttpClient {
        let mut clients = self.clients.borrow_mut();
        if let Some((_, c)) = clients.iter().find(|(t, _)| *t == connect_timeout) {
            return c.clone();
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_TARGET)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        clients.push((connect_timeout, client.clone()));
        client
    }
}

/// Why forwarding failed, and so which status the client gets.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// 502: the target refused or reset the connection.
    #[error("connecting to the upstream failed: {0}")]
    Connect(String),
    /// 504: connecting or waiting for the response headers took too long.
    #[error("the upstream did not answer in {0:?}")]
    Timeout(Duration),
    /// 413: the client's body went over the route's limit while streaming.
    #[error("the request body is too large")]
    BodyTooLarge,
    /// 400: the client's body broke off or was malformed.
    #[error("{0}")]
    ClientBody(String),
    /// 502: the upstream broke the protocol or the connection.
    #[error("the upstream failed: {0}")]
    Upstream(String),
}

impl ForwardError {
    pub fn status(&self) -> u16 {
        match self {
            ForwardError::Connect(_) | ForwardError::Upstream(_) => 502,
            ForwardError::Timeout(_) => 504,
            ForwardError::BodyTooLarge => 413,
            ForwardError::ClientBody(_) => 400,
        }
    }

    /// A short kind for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            ForwardError::Connect(_) => "connect",
            ForwardError::Timeout(_) => "timeout",
            ForwardError::BodyTooLarge => "body_too_large",
            ForwardError::ClientBody(_) => "client_body",
            ForwardError::Upstream(_) => "upstream",
        }
    }
}

/// Sends a request and waits at most `timeout` for the response headers.
pub async fn send(
    client: &HttpClient,
    req: http::Request<ProxyBody>,
    timeout: Duration,
) -> Result<http::Response<Incoming>, ForwardError> {
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Err(ForwardError::Timeout(timeout)),
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => Err(classify(&e, timeout)),
    }
}

fn classify(e: &hyper_util::client::legacy::Error, timeout: Duration) -> ForwardError {
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(b) = s.downcast_ref::<BodyError>() {
            return match b {
                BodyError::TooLarge { .. } => ForwardError::BodyTooLarge,
                BodyError::Client(m) => ForwardError::ClientBody(m.clone()),
            };
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return ForwardError::Timeout(timeout);
        }
        source = s.source();
    }
    if e.is_connect() {
        ForwardError::Connect(chain(e))
    } else {
        ForwardError::Upstream(chain(e))
    }
}

/// The error and its causes on one line, for logs.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
