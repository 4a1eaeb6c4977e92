//! Upstreams and how a target is picked for a request.
//!
//! The balancer is chosen per upstream at compile time. Picking must never take a lock shared by
//! all workers: round-robin is one relaxed atomic increment into a precomputed sequence.
//! Health checks and least-connections plug in here (issue #6) without touching the proxy.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::{Authority, Scheme};

/// One address an upstream can send requests to.
#[derive(Debug)]
pub struct Target {
    /// As written in config, e.g. `http://127.0.0.1:8001`; safe to log, never sent to clients.
    pub url: String,
    pub scheme: Scheme,
    pub authority: Authority,
    /// `host:port` to connect to (the scheme's default port filled in).
    pub connect_addr: String,
    pub weight: u32,
}

/// A named group of targets.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub targets: Vec<Target>,
    pub balancer: Balancer,
    pub connect_timeout: Duration,
    /// Response-header timeout, unless the route sets its own.
    pub timeout: Option<Duration>,
}

impl Upstream {
    /// The target for the next request, or `None` when there is none to send to.
    pub fn pick(&self) -> Option<(usize, &Target)> {
        let i = self.balancer.pick()?;
        self.targets.get(i).map(|t| (i, t))
    }
}

/// Target selection strategy.
#[derive(Debug)]
pub enum Balancer {
    /// Smooth weighted round-robin (nginx's): weights 5,1,1 give a,a,b,a,c,a,a rather than
    /// a,a,a,a,a,b,c. The sequence is computed once; picking walks it with one atomic.
    RoundRobin {
        sequence: Vec<usize>,
        next: AtomicUsize,
    },
}

impl Balancer {
    /// Builds a smooth weighted round-robin over targets with these weights (each >= 1).
    pub fn round_robin(weights: &[u32]) -> Self {
        Balancer::RoundRobin {
            sequence: smooth_wrr_sequence(weights),
            next: AtomicUsize::new(0),
        }
    }

    fn pick(&self) -> Option<usize> {
        match self {
            Balancer::RoundRobin { sequence, next } => {
                if sequence.is_empty() {
                    return None;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                Some(sequence[n % sequence.len()])
            }
        }
    }
}

/// One full cycle of smooth weighted round-robin, with weights reduced by their gcd.
fn smooth_wrr_sequence(weights: &[u32]) -> Vec<usize> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let w: Vec<i64> = weights.iter().map(|&x| i64::from(x.max(1) / g)).collect();
    let total: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut seq = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (c, wi) in current.iter_mut().zip(&w) {
            *c += wi;
        }
        let Some(best) = (0..w.len()).max_by_key(|&i| (current[i], std::cmp::Reverse(i))) else {
            break;
        };
        current[best] -= total;
        seq.push(best);
    }
    seq
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picks(b: &Balancer, n: usize) -> Vec<usize> {
        (0..n).filter_map(|_| b.pick()).collect()
    }

    #[test]
    fn smooth_sequence_interleaves() {
        assert_eq!(smooth_wrr_sequence(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_wrr_sequence(&[1, 1]), vec![0, 1]);
        assert_eq!(smooth_wrr_sequence(&[2, 4]), vec![1, 0, 1]);
    }

    #[test]
    fn distribution_follows_weights() {
        let b = Balancer::round_robin(&[1, 2, 3]);
        let p = picks(&b, 600);
        let count = |t| p.iter().filter(|&&x| x == t).count();
        assert_eq!((count(0), count(1), count(2)), (100, 200, 300));
    }

    #[test]
    fn empty_upstream_picks_nothing() {
        assert_eq!(Balancer::round_robin(&[]).pick(), None);
    }
}
