//! Hedged shard requests. The coordinator keeps the recent search times of every shard replica
//! it asked; when the replica asked first has not answered within its recent p95, the same
//! request goes to another replica of the shard and the first answer wins (the other call is
//! dropped: its reply, if it ever comes, is ignored). Hedges are capped by a token bucket at
//! `query.hedge_max_ratio` of shard requests, and counted. A replica that lost to a hedge is
//! asked last for a while (as Cassandra's dynamic snitch does), so a replica that stays slow
//! stops costing every request a hedge.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ractor::ActorId;
use ragfleet_proto::HedgeStatus;

use crate::health::Member;

/// Search times kept per replica.
const WINDOW: usize = 128;
/// Times needed before a p95 is trusted.
const MIN_SAMPLES: usize = 16;
/// Hedges that may be sent in a burst (the bucket's size).
const BURST: f64 = 10.0;
/// How long a replica that lost to a hedge is asked last.
const DEMOTED_FOR: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Times(VecDeque<f64>);

impl Times {
    fn push(&mut self, ms: f64) {
        if self.0.len() == WINDOW {
            self.0.pop_front();
        }
        self.0.push_back(ms);
    }

    fn p95(&self) -> Option<f64> {
        if self.0.len() < MIN_SAMPLES {
            return None;
        }
        let mut v: Vec<f64> = self.0.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        Some(v[((v.len() as f64 * 0.95).ceil() as usize).min(v.len()) - 1])
    }
}

/// The coordinator's hedging state.
pub(crate) struct Hedging {
    times: Mutex<(HashMap<ActorId, Times>, Times)>,
    bucket: Mutex<f64>,
    demoted: Mutex<HashMap<ActorId, Instant>>,
    requests: AtomicU64,
    sent: AtomicU64,
    won: AtomicU64,
    capped: AtomicU64,
}

impl Hedging {
    pub(crate) fn new() -> Self {
        Hedging {
            times: Mutex::default(),
            bucket: Mutex::new(BURST),
            demoted: Mutex::default(),
            requests: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            won: AtomicU64::new(0),
            capped: AtomicU64::new(0),
        }
    }

    /// Records how long `replica` took to answer a search.
    pub(crate) fn record(&self, replica: ActorId, took: Duration) {
        let ms = took.as_secs_f64() * 1000.0;
        let mut g = self.times.lock().expect("hedge times");
        g.0.entry(replica).or_default().push(ms);
        g.1.push(ms);
    }

    /// How long to wait for `replica` before hedging: its recent p95 (or, while it has too few
    /// answers on record, the p95 of all replicas), at least `min`; `None` while nothing is
    /// known.
    pub(crate) fn delay(&self, replica: ActorId, min: Duration) -> Option<Duration> {
        let g = self.times.lock().expect("hedge times");
        let p95 =
            g.0.get(&replica)
                .and_then(Times::p95)
                .or_else(|| g.1.p95())?;
        Some(Duration::from_secs_f64(p95 / 1000.0).max(min))
    }

    /// Counts a shard request: the bucket earns `ratio` of a hedge.
    pub(crate) fn request(&self, ratio: f64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut b = self.bucket.lock().expect("hedge bucket");
        *b = (*b + ratio).min(BURST);
    }

    /// Takes a hedge from the bucket; `false` (counted as capped) when it is empty.
    pub(crate) fn try_hedge(&self) -> bool {
        let mut b = self.bucket.lock().expect("hedge bucket");
        let m = &crate::metrics::get().hedges;
        if *b >= 1.0 {
            *b -= 1.0;
            self.sent.fetch_add(1, Ordering::Relaxed);
            m.with_label_values(&["sent"]).inc();
            true
        } else {
            self.capped.fetch_add(1, Ordering::Relaxed);
            m.with_label_values(&["capped"]).inc();
            false
        }
    }

    /// The hedge answered first; `slow` is asked last for a while.
    pub(crate) fn won(&self, slow: ActorId) {
        self.won.fetch_add(1, Ordering::Relaxed);
        crate::metrics::get()
            .hedges
            .with_label_values(&["won"])
            .inc();
        self.demoted
            .lock()
            .expect("demoted")
            .insert(slow, Instant::now() + DEMOTED_FOR);
    }

    /// Moves recently demoted replicas to the end, keeping the order otherwise.
    pub(crate) fn order(&self, replicas: &mut [Member]) {
        let mut d = self.demoted.lock().expect("demoted");
        if d.is_empty() {
            return;
        }
        let now = Instant::now();
        d.retain(|_, until| *until > now);
        replicas.sort_by_key(|m| d.contains_key(&m.actor.get_id()));
    }

    pub(crate) fn status(&self) -> HedgeStatus {
        HedgeStatus {
            requests: self.requests.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            won: self.won.load(Ordering::Relaxed),
            capped: self.capped.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> ActorId {
        ActorId::Local(n)
    }

    #[test]
    fn the_delay_is_the_replicas_recent_p95_and_waits_for_enough_samples() {
        let h = Hedging::new();
        let min = Duration::from_millis(2);
        assert_eq!(h.delay(id(1), min), None, "nothing known yet");
        for i in 1..=(MIN_SAMPLES as u64 - 1) {
            h.record(id(1), Duration::from_millis(i));
        }
        assert_eq!(h.delay(id(1), min), None, "too few samples");
        for i in 0..100u64 {
            // 95 fast answers and 5 slow ones among the last 128
            let ms = if i % 20 == 0 { 400 } else { 10 };
            h.record(id(1), Duration::from_millis(ms));
        }
        let d = h.delay(id(1), min).unwrap();
        assert!(
            d >= Duration::from_millis(10) && d < Duration::from_millis(400),
            "{d:?}"
        );
        // a replica with no answers of its own borrows every replica's p95
        assert!(h.delay(id(2), min).is_some());
        // the floor
        let fast = Hedging::new();
        for _ in 0..MIN_SAMPLES {
            fast.record(id(3), Duration::from_micros(100));
        }
        assert_eq!(fast.delay(id(3), min), Some(min));
    }

    #[test]
    fn hedges_are_capped_at_their_share_of_requests() {
        let h = Hedging::new();
        let mut sent = 0;
        for _ in 0..1000 {
            h.request(0.1);
            if h.try_hedge() {
                sent += 1;
            }
        }
        // the burst, then one in ten
        assert!((100..=111).contains(&sent), "{sent}");
        let s = h.status();
        assert_eq!(s.requests, 1000);
        assert_eq!(s.sent, sent);
        assert_eq!(s.sent + s.capped, 1000);
    }
}
