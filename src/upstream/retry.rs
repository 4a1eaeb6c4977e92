//! Retry rules: what is retried, how often, how long to wait between attempts.

use std::time::Duration;

/// Why an attempt failed, as far as retrying goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// No connection could be made; nothing reached the target.
    ConnectFailure,
    /// Connecting or waiting for the response head took too long.
    Timeout,
    /// The connection broke before a response head arrived.
    Reset,
    /// The target answered with this status.
    Status(u16),
}

impl RetryReason {
    /// The label for logs and `rustygate_upstream_retries_total{reason}`.
    pub fn label(self) -> std::borrow::Cow<'static, str> {
        match self {
            RetryReason::ConnectFailure => "connect_failure".into(),
            RetryReason::Timeout => "timeout".into(),
            RetryReason::Reset => "reset".into(),
            RetryReason::Status(s) => s.to_string().into(),
        }
    }
}

/// The effective retry rules for a request (`Copy`: merged per request without allocating).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub on_connect_failure: bool,
    pub on_timeout: bool,
    pub on_reset: bool,
    /// Statuses 500-599 that are retried, one bit each (bit `s - 500`).
    pub statuses: u128,
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub non_idempotent: bool,
    pub replay_body_limit: u64,
}

/// Most retries a policy may ask for.
pub const MAX_ATTEMPTS: u32 = 10;

impl Default for RetryPolicy {
    /// One retry, on connect failures only, for idempotent methods: nothing reached the target,
    /// so another target can take the request.
    fn default() -> Self {
        Self {
            attempts: 1,
            on_connect_failure: true,
            on_timeout: false,
            on_reset: false,
            statuses: 0,
            backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(250),
            non_idempotent: false,
            replay_body_limit: 64 * 1024,
        }
    }
}

impl RetryPolicy {
    /// Sets the retry conditions from `on` entries; returns the first one not understood.
    pub fn set_conditions<'a>(
        &mut self,
        on: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), &'a str> {
        self.on_connect_failure = false;
        self.on_timeout = false;
        self.on_reset = false;
        self.statuses = 0;
        for c in on {
            match c {
                "connect_failure" => self.on_connect_failure = true,
                "timeout" => self.on_timeout = true,
                "reset" => self.on_reset = true,
                "5xx" => self.statuses = u128::MAX >> 28,
                s => match s.parse::<u16>() {
                    Ok(code @ 500..=599) => self.statuses |= 1u128 << (code - 500),
                    _ => return Err(c),
                },
            }
        }
        Ok(())
    }

    /// Whether this failure is one the policy retries.
    pub fn retries_on(&self, reason: RetryReason) -> bool {
        match reason {
            RetryReason::ConnectFailure => self.on_connect_failure,
            RetryReason::Timeout => self.on_timeout,
            RetryReason::Reset => self.on_reset,
            RetryReason::Status(s) => {
                (500..600).contains(&s) && self.statuses & (1u128 << (s - 500)) != 0
            }
        }
    }

    /// Whether requests with this method may be retried at all.
    pub fn allows_method(&self, method: &http::Method) -> bool {
        self.attempts > 0 && (self.non_idempotent || is_idempotent(method))
    }

    /// The wait before retry number `retry` (1-based): exponential, capped, with jitter
    /// (uniform between half and all of the capped value).
    pub fn backoff_for(&self, retry: u32) -> Duration {
        let exp = self
            .backoff
            .saturating_mul(1u32 << retry.saturating_sub(1).min(16));
        let capped = exp.min(self.max_backoff);
        let half = capped / 2;
        half + capped.mul_f64(rand::random::<f64>() * 0.5)
    }
}

/// RFC 9110 idempotent methods.
pub fn is_idempotent(m: &http::Method) -> bool {
    matches!(
        *m,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::TRACE
    )
}

/// A route's retry settings over the upstream's: only the fields it sets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOverride {
    pub attempts: Option<u32>,
    /// (connect_failure, timeout, reset, statuses) when the route sets `on`.
    pub conditions: Option<(bool, bool, bool, u128)>,
    pub backoff: Option<Duration>,
    pub max_backoff: Option<Duration>,
    pub non_idempotent: Option<bool>,
    pub replay_body_limit: Option<u64>,
}

impl RetryOverride {
    pub fn apply(&self, base: &RetryPolicy) -> RetryPolicy {
        let mut p = *base;
        if let Some(a) = self.attempts {
            p.attempts = a;
        }
        if let Some((c, t, r, s)) = self.conditions {
            p.on_connect_failure = c;
            p.on_timeout = t;
            p.on_reset = r;
            p.statuses = s;
        }
        if let Some(b) = self.backoff {
            p.backoff = b;
        }
        if let Some(b) = self.max_backoff {
            p.max_backoff = b;
        }
        if let Some(n) = self.non_idempotent {
            p.non_idempotent = n;
        }
        if let Some(l) = self.replay_body_limit {
            p.replay_body_limit = l;
        }
        p
    }
}

/// The upstream's retry budget settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBudget {
    /// Retries may be at most this percentage of retry-eligible requests...
    pub percent: u32,
    /// ...plus this many per second.
    pub min_per_second: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            percent: 20,
            min_per_second: 10,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions() {
        let mut p = RetryPolicy::default();
        assert!(p.retries_on(RetryReason::ConnectFailure));
        assert!(!p.retries_on(RetryReason::Timeout));
        assert!(!p.retries_on(RetryReason::Status(503)));
        p.set_conditions(["timeout", "503"]).unwrap();
        assert!(!p.retries_on(RetryReason::ConnectFailure));
        assert!(p.retries_on(RetryReason::Timeout));
        assert!(p.retries_on(RetryReason::Status(503)));
        assert!(!p.retries_on(RetryReason::Status(502)));
        p.set_conditions(["5xx"]).unwrap();
        assert!(p.retries_on(RetryReason::Status(500)) && p.retries_on(RetryReason::Status(599)));
        assert!(!p.retries_on(RetryReason::Status(404)));
        assert_eq!(p.set_conditions(["connect_failure", "404"]), Err("404"));
        assert_eq!(p.set_conditions(["sometimes"]), Err("sometimes"));
    }

    #[test]
    fn methods() {
        let p = RetryPolicy::default();
        assert!(p.allows_method(&http::Method::GET));
        assert!(p.allows_method(&http::Method::PUT));
        assert!(!p.allows_method(&http::Method::POST));
        assert!(!p.allows_method(&http::Method::PATCH));
        let p = RetryPolicy {
            non_idempotent: true,
            ..p
        };
        assert!(p.allows_method(&http::Method::POST));
        let p = RetryPolicy { attempts: 0, ..p };
        assert!(!p.allows_method(&http::Method::GET));
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let p = RetryPolicy {
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            ..RetryPolicy::default()
        };
        for _ in 0..50 {
            let b1 = p.backoff_for(1);
            assert!(b1 >= Duration::from_millis(50) && b1 <= Duration::from_millis(100));
            let b2 = p.backoff_for(2);
            assert!(b2 >= Duration::from_millis(100) && b2 <= Duration::from_millis(200));
            let b5 = p.backoff_for(5);
            assert!(b5 >= Duration::from_millis(150) && b5 <= Duration::from_millis(300));
        }
    }

    #[test]
    fn route_override() {
        let base = RetryPolicy::default();
        let o = RetryOverride {
            attempts: Some(3),
            ..RetryOverride::default()
        };
        let p = o.apply(&base);
        assert_eq!(p.attempts, 3);
        assert_eq!(p.backoff, base.backoff);
        assert!(p.on_connect_failure);
    }
}
