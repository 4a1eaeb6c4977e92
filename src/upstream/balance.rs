//! Target selection. Every strategy takes a filter saying which targets may be used (healthy,
//! not ejected, not already tried) and never takes a lock: round-robin is one relaxed atomic,
//! the others read the targets' in-flight atomics.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::Target;

/// What a consistent-hash upstream hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Path,
    Header(http::HeaderName),
    Cookie(String),
}

impl HashKey {
    /// Parses `client_ip`, `path`, `header:<name>`, `cookie:<name>`.
    pub fn parse(s: &str) -> Result<HashKey, String> {
        match s {
            "client_ip" => Ok(HashKey::ClientIp),
            "path" => Ok(HashKey::Path),
            _ => {
                if let Some(h) = s.strip_prefix("header:") {
                    http::HeaderName::from_bytes(h.trim().as_bytes())
                        .map(HashKey::Header)
                        .map_err(|_| format!("`{h}` is not a valid header name"))
                } else if let Some(c) = s.strip_prefix("cookie:") {
                    let c = c.trim();
                    if c.is_empty() || c.bytes().any(|b| b <= b' ' || b"=;,\"".contains(&b)) {
                        Err(format!("`{c}` is not a valid cookie name"))
                    } else {
                        Ok(HashKey::Cookie(c.to_owned()))
                    }
                } else {
                    Err(format!(
                        "unknown hash key `{s}`: use client_ip, path, header:<name> or cookie:<name>"
                    ))
                }
            }
        }
    }
}

/// Target selection strategy.
#[derive(Debug)]
pub enum Balancer {
    /// Smooth weighted round-robin (nginx's): weights 5,1,1 give a,a,b,a,c,a,a rather than
    /// a,a,a,a,a,b,c. The sequence is computed once; picking walks it with one atomic (one
    /// more per unusable target's turn passed on).
    RoundRobin(RoundRobin),
    /// Fewest in-flight requests per unit of weight; the scan starts at a rotating offset so
    /// that ties are shared fairly.
    LeastConnections { next: AtomicUsize },
    /// Power of two choices: two targets drawn by weight, the less loaded one wins.
    RandomTwoChoices { cumulative: Vec<u64> },
    /// A ring of points per target (more points for more weight); a key goes to the first
    /// usable target clockwise from its hash. Requests without the key go round-robin.
    ConsistentHash {
        key: HashKey,
        ring: Vec<(u64, usize)>,
        fallback: RoundRobin,
    },
}

#[derive(Debug)]
pub struct RoundRobin {
    sequence: Vec<usize>,
    next: AtomicUsize,
    /// Retries' own turns, so that they never take a first attempt's.
    retry_next: AtomicUsize,
}

impl RoundRobin {
    pub fn new(weights: &[u32]) -> Self {
        Self {
            sequence: smooth_wrr_sequence(weights),
            next: AtomicUsize::new(0),
            retry_next: AtomicUsize::new(0),
        }
    }

    /// Each value of the shared counter is one turn of the cycle. A turn that falls on an
    /// unusable target is passed on to the next value, so the usable targets share the traffic
    /// by weight, as if the cycle held only them (nginx and Envoy round-robin over the usable
    /// set). Walking forward from the turn instead gave the target after a run of k unusable
    /// ones k+1 turns: with one of three targets out, 2/3 and 1/3 rather than 1/2 and 1/2.
    ///
    /// A retry (`retry`) takes its turn from a second counter of its own, in the same way. A
    /// retry that took a first attempt's turn left the next request the turn of the target
    /// that had just failed, which then got one request in two instead of one in N.
    fn pick(&self, ok: &dyn Fn(usize) -> bool, retry: bool) -> Option<usize> {
        let len = self.sequence.len();
        if len == 0 {
            return None;
        }
        let counter = if retry { &self.retry_next } else { &self.next };
        // Every turn goes to exactly one request, so turns passed on stay exact under
        // concurrency. Bounded: past MAX_TURNS unusable turns in a row (or none usable at all),
        // the first usable target after the last turn.
        let mut n = 0;
        for _ in 0..len.min(MAX_TURNS) {
            n = counter.fetch_add(1, Ordering::Relaxed);
            let t = self.sequence[n % len];
            if ok(t) {
                return Some(t);
            }
        }
        (1..len)
            .map(|i| self.sequence[(n + i) % len])
            .find(|&t| ok(t))
    }
}

/// Turns one round-robin pick may take before walking the cycle; more than any run of unusable
/// targets unless weights are uneven and several targets are out.
const MAX_TURNS: usize = 32;

/// Ring points per unit of weight, and the most points a ring may have.
const POINTS_PER_WEIGHT: usize = 160;
const MAX_RING_POINTS: usize = 160 * 1024;

impl Balancer {
    pub fn round_robin(weights: &[u32]) -> Self {
        Balancer::RoundRobin(RoundRobin::new(weights))
    }

    pub fn least_connections() -> Self {
        Balancer::LeastConnections {
            next: AtomicUsize::new(0),
        }
    }

    pub fn random_two_choices(weights: &[u32]) -> Self {
        let mut sum = 0u64;
        let cumulative = weights
            .iter()
            .map(|&w| {
                sum += u64::from(w.max(1));
                sum
            })
            .collect();
        Balancer::RandomTwoChoices { cumulative }
    }

    /// A ring over targets identified by `ids` (their URLs, so that a target keeps its points
    /// when others are added or removed).
    pub fn consistent_hash(key: HashKey, ids: &[&str], weights: &[u32]) -> Self {
        let total: usize = weights.iter().map(|&w| w.max(1) as usize).sum();
        let per = MAX_RING_POINTS
            .checked_div(total)
            .map_or(0, |p| p.clamp(1, POINTS_PER_WEIGHT));
        let mut ring = Vec::with_capacity(total * per);
        for (i, (id, &w)) in ids.iter().zip(weights).enumerate() {
            for p in 0..(w.max(1) as usize * per) {
                ring.push((hash_bytes(format!("{id}#{p}").as_bytes()), i));
            }
        }
        ring.sort_unstable();
        Balancer::ConsistentHash {
            key,
            ring,
            fallback: RoundRobin::new(weights),
        }
    }

    /// The key this balancer hashes, if any.
    pub fn hash_key(&self) -> Option<&HashKey> {
        match self {
            Balancer::ConsistentHash { key, .. } => Some(key),
            _ => None,
        }
    }

    /// Picks among the targets for which `ok` holds. A `retry` pick leaves round-robin's turn
    /// to the next request (see `RoundRobin::pick`).
    pub fn pick(
        &self,
        targets: &[Target],
        key: Option<u64>,
        ok: &dyn Fn(usize) -> bool,
        retry: bool,
    ) -> Option<usize> {
        match self {
            Balancer::RoundRobin(rr) => rr.pick(ok, retry),
            Balancer::LeastConnections { next } => {
                let len = targets.len();
                if len == 0 {
                    return None;
                }
                let turn = next.fetch_add(1, Ordering::Relaxed) as u64;
                let load = |i: usize| {
                    let t = &targets[i];
                    (u64::from(t.state.in_flight()), u64::from(t.weight.max(1)))
                };
                // The least load per unit of weight (compared without division), and the
                // weight of the targets that share it.
                let mut best: Option<(usize, u64, u64)> = None;
                let mut tied_weight = 0u64;
                for i in (0..len).filter(|&i| ok(i)) {
                    let (l, w) = load(i);
                    match best {
                        Some((_, bl, bw)) if l * bw > bl * w => {}
                        Some((_, bl, bw)) if l * bw == bl * w => tied_weight += w,
                        _ => {
                            best = Some((i, l, w));
                            tied_weight = w;
                        }
                    }
                }
                let (first, bl, bw) = best?;
                // Ties are shared by weight, in turn (as nginx's `least_conn`): idle targets of
                // weights 1 and 3 take one and three of every four requests.
                let mut at = turn % tied_weight;
                (0..len)
                    .filter(|&i| ok(i))
                    .find(|&i| {
                        let (l, w) = load(i);
                        if l * bw != bl * w {
                            return false;
                        }
                        if at < w {
                            return true;
                        }
                        at -= w;
                        false
                    })
                    // Loads moved between the two looks (other workers): the first look's pick.
                    .or(Some(first))
            }
            Balancer::RandomTwoChoices { cumulative } => {
                let total = *cumulative.last()?;
                let draw = || {
                    let r = rand::random_range(0..total);
                    cumulative.partition_point(|&c| c <= r)
                };
                let mut chosen: [Option<usize>; 2] = [None, None];
                let mut found = 0;
                for _ in 0..8 {
                    let i = draw();
                    if ok(i) && chosen[0] != Some(i) {
                        chosen[found] = Some(i);
                        found += 1;
                        if found == 2 {
                            break;
                        }
                    }
                }
                if found == 0 {
                    // Most targets are unusable: take the first usable one from a random start.
                    let start = draw();
                    let len = cumulative.len();
                    return (0..len).map(|k| (start + k) % len).find(|&i| ok(i));
                }
                match chosen {
                    [Some(a), Some(b)] => {
                        let load = |i: usize| {
                            let t = &targets[i];
                            (u64::from(t.state.in_flight()) + 1, u64::from(t.weight))
                        };
                        let ((la, wa), (lb, wb)) = (load(a), load(b));
                        Some(if lb * wa < la * wb { b } else { a })
                    }
                    [a, _] => a,
                }
            }
            Balancer::ConsistentHash { ring, fallback, .. } => {
                let Some(h) = key else {
                    return fallback.pick(ok, retry);
                };
                if ring.is_empty() {
                    return None;
                }
                let start = ring.partition_point(|&(p, _)| p < h);
                let len = ring.len();
                let mut last = usize::MAX;
                for k in 0..len {
                    let t = ring[(start + k) % len].1;
                    if t != last && ok(t) {
                        return Some(t);
                    }
                    last = t;
                }
                None
            }
        }
    }
}

/// A stable 64-bit hash (FNV-1a with a final mix), the same in every gateway process so that
/// replicas agree on where a key goes.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser: spreads FNV's weak low bits over the ring.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
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

    fn targets(weights: &[u32]) -> Vec<Target> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Target::for_tests(&format!("http://10.0.0.{i}:80"), w))
            .collect()
    }

    fn all(_: usize) -> bool {
        true
    }

    fn count(picks: &[usize], t: usize) -> usize {
        picks.iter().filter(|&&x| x == t).count()
    }

    #[test]
    fn smooth_sequence_interleaves() {
        assert_eq!(smooth_wrr_sequence(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_wrr_sequence(&[1, 1]), vec![0, 1]);
        assert_eq!(smooth_wrr_sequence(&[2, 4]), vec![1, 0, 1]);
    }

    #[test]
    fn round_robin_follows_weights_and_skips_unusable() {
        let ts = targets(&[1, 2, 3]);
        let b = Balancer::round_robin(&[1, 2, 3]);
        let p: Vec<usize> = (0..600)
            .filter_map(|_| b.pick(&ts, None, &all, false))
            .collect();
        assert_eq!((count(&p, 0), count(&p, 1), count(&p, 2)), (100, 200, 300));
        let p: Vec<usize> = (0..600)
            .filter_map(|_| b.pick(&ts, None, &|i| i != 2, false))
            .collect();
        assert_eq!(count(&p, 2), 0);
        assert_eq!(p.len(), 600);
        assert_eq!(b.pick(&ts, None, &|_| false, false), None);
        assert_eq!(
            Balancer::round_robin(&[]).pick(&[], None, &all, false),
            None
        );
    }

    /// Usable targets share the turns of an unusable one equally: walking forward from the
    /// turn gave the target after the unusable one its turn too (400/200 instead of 300/300).
    #[test]
    fn round_robin_shares_an_unusable_targets_turns_by_weight() {
        let ts = targets(&[1, 1, 1]);
        let b = Balancer::round_robin(&[1, 1, 1]);
        let p: Vec<usize> = (0..600)
            .filter_map(|_| b.pick(&ts, None, &|i| i != 0, false))
            .collect();
        assert_eq!((count(&p, 0), count(&p, 1), count(&p, 2)), (0, 300, 300));
        // Weighted, two of four out (a run of two in the cycle): the rest keep their 1:2.
        let ts = targets(&[1, 1, 1, 2]);
        let b = Balancer::round_robin(&[1, 1, 1, 2]);
        let p: Vec<usize> = (0..600)
            .filter_map(|_| b.pick(&ts, None, &|i| i == 0 || i == 3, false))
            .collect();
        assert_eq!((count(&p, 0), count(&p, 3)), (200, 400));
    }

    /// A retry does not take the next request's turn: a target that fails every request it
    /// gets (before it is ejected) gets one request in three, not one in two.
    #[test]
    fn round_robin_retries_leave_the_turns_alone() {
        let ts = targets(&[1, 1, 1]);
        let b = Balancer::round_robin(&[1, 1, 1]);
        let mut first = Vec::new();
        let mut retried = Vec::new();
        for _ in 0..300 {
            let i = b.pick(&ts, None, &all, false).unwrap();
            first.push(i);
            if i == 0 {
                retried.push(b.pick(&ts, None, &|t| t != 0, true).unwrap());
            }
        }
        assert_eq!(count(&first, 0), 100);
        assert_eq!(count(&retried, 0), 0);
        assert_eq!(retried.len(), 100);
    }

    #[test]
    fn least_connections_prefers_the_idle_and_shares_ties() {
        let ts = targets(&[1, 1, 1]);
        let b = Balancer::least_connections();
        let _busy: Vec<_> = (0..3).map(|_| ts[0].state.begin()).collect();
        let _one = ts[1].state.begin();
        assert_eq!(b.pick(&ts, None, &all, false), Some(2));
        // A tie between 1 and 2 after this one: both get picked over time.
        let _two = ts[2].state.begin();
        let p: Vec<usize> = (0..10)
            .filter_map(|_| b.pick(&ts, None, &all, false))
            .collect();
        assert!(
            count(&p, 1) > 0 && count(&p, 2) > 0 && count(&p, 0) == 0,
            "{p:?}"
        );
        // Weight: 4 in flight on a weight-4 target is as loaded as 1 on a weight-1 target.
        let ts = targets(&[4, 1]);
        let _w: Vec<_> = (0..3).map(|_| ts[0].state.begin()).collect();
        let _x = ts[1].state.begin();
        assert_eq!(b.pick(&ts, None, &all, false), Some(0));
    }

    /// Idle targets tie: they share requests by weight, not one each in turn (a weight of 3
    /// was ignored by sequential traffic, which split 20/20).
    #[test]
    fn least_connections_shares_ties_by_weight() {
        let ts = targets(&[1, 3]);
        let b = Balancer::least_connections();
        let p: Vec<usize> = (0..40)
            .filter_map(|_| b.pick(&ts, None, &all, false))
            .collect();
        assert_eq!((count(&p, 0), count(&p, 1)), (10, 30), "{p:?}");
        // Only usable targets count, and a lone usable one is picked.
        let p: Vec<usize> = (0..8)
            .filter_map(|_| b.pick(&ts, None, &|i| i == 0, false))
            .collect();
        assert_eq!(count(&p, 0), 8);
        assert_eq!(b.pick(&ts, None, &|_| false, false), None);
    }

    #[test]
    fn two_choices_avoids_the_loaded_target() {
        let ts = targets(&[1, 1]);
        let b = Balancer::random_two_choices(&[1, 1]);
        let _busy: Vec<_> = (0..50).map(|_| ts[0].state.begin()).collect();
        let p: Vec<usize> = (0..200)
            .filter_map(|_| b.pick(&ts, None, &all, false))
            .collect();
        // Target 0 only wins when both draws land on it (about a quarter of the time).
        assert!(count(&p, 0) < 90, "{}", count(&p, 0));
        let p: Vec<usize> = (0..50)
            .filter_map(|_| b.pick(&ts, None, &|i| i == 0, false))
            .collect();
        assert_eq!(count(&p, 0), 50);
        assert_eq!(b.pick(&ts, None, &|_| false, false), None);
    }

    #[test]
    fn consistent_hash_is_stable_and_remaps_about_one_nth() {
        let urls: Vec<String> = (0..4).map(|i| format!("http://10.0.0.{i}:80")).collect();
        let ids: Vec<&str> = urls.iter().map(String::as_str).collect();
        let ts = targets(&[1, 1, 1, 1]);
        let b4 = Balancer::consistent_hash(HashKey::ClientIp, &ids, &[1, 1, 1, 1]);
        let keys: Vec<u64> = (0..10_000u32)
            .map(|k| hash_bytes(&k.to_be_bytes()))
            .collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|&k| b4.pick(&ts, Some(k), &all, false).unwrap())
            .collect();
        // Same key, same target.
        for (k, t) in keys.iter().zip(&before).take(100) {
            assert_eq!(b4.pick(&ts, Some(*k), &all, false), Some(*t));
        }
        // Roughly even spread.
        for t in 0..4 {
            let n = count(&before, t);
            assert!((1800..3200).contains(&n), "target {t} got {n}");
        }
        // Add a fifth target: about 1/5 of keys move, all of them to the new one.
        let urls5: Vec<String> = (0..5).map(|i| format!("http://10.0.0.{i}:80")).collect();
        let ids5: Vec<&str> = urls5.iter().map(String::as_str).collect();
        let ts5 = targets(&[1, 1, 1, 1, 1]);
        let b5 = Balancer::consistent_hash(HashKey::ClientIp, &ids5, &[1, 1, 1, 1, 1]);
        let after: Vec<usize> = keys
            .iter()
            .map(|&k| b5.pick(&ts5, Some(k), &all, false).unwrap())
            .collect();
        let moved: Vec<usize> = (0..keys.len()).filter(|&i| before[i] != after[i]).collect();
        assert!(moved.iter().all(|&i| after[i] == 4));
        assert!((1400..2600).contains(&moved.len()), "{} moved", moved.len());
        // An unusable target's keys go to the next one on the ring; others stay.
        let skipped: Vec<usize> = keys
            .iter()
            .map(|&k| b4.pick(&ts, Some(k), &|i| i != 1, false).unwrap())
            .collect();
        for i in 0..keys.len() {
            if before[i] != 1 {
                assert_eq!(skipped[i], before[i]);
            } else {
                assert_ne!(skipped[i], 1);
            }
        }
        // No key: round-robin.
        assert!(b4.pick(&ts, None, &all, false).is_some());
    }

    #[test]
    fn hash_keys_parse() {
        assert_eq!(HashKey::parse("client_ip"), Ok(HashKey::ClientIp));
        assert_eq!(HashKey::parse("path"), Ok(HashKey::Path));
        assert!(matches!(
            HashKey::parse("header:x-user"),
            Ok(HashKey::Header(_))
        ));
        assert_eq!(
            HashKey::parse("cookie:session"),
            Ok(HashKey::Cookie("session".into()))
        );
        assert!(HashKey::parse("header:bad name").is_err());
        assert!(HashKey::parse("cookie:a=b").is_err());
        assert!(HashKey::parse("ip").is_err());
    }

    #[test]
    fn hash_is_stable_across_builds() {
        // Replicas must agree: this value may never change.
        assert_eq!(hash_bytes(b"tenant-42"), 6_741_133_026_525_241_303);
        assert_eq!(hash_bytes(b""), 17_665_956_581_633_026_203);
    }
}
