//! Counted places under a bound: the one mechanism of admission control (a coordinator's
//! requests and answers, a generator's answers, an embedder's texts, a shard replica's
//! searches). Work past the bound is refused at once, never queued.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Places taken from a count, given back when dropped (however the work ends).
#[derive(Debug)]
pub(crate) struct Taken {
    count: Arc<AtomicUsize>,
    n: usize,
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.count.fetch_sub(self.n, Ordering::SeqCst);
    }
}

/// Takes `n` places of `count`, at most `max` in all; `Err(held)` (what was held already)
/// when they would go past it. A request larger than `max` alone is taken when nothing is held.
pub(crate) fn take(count: &Arc<AtomicUsize>, n: usize, max: usize) -> Result<Taken, usize> {
    let held = count.fetch_add(n, Ordering::SeqCst);
    let taken = Taken {
        count: count.clone(),
        n,
    };
    if held > 0 && held + n > max {
        return Err(held); // `taken` drops: the places are given back
    }
    Ok(taken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_past_the_bound_are_refused_and_a_finished_one_frees_its_place() {
        let n = Arc::new(AtomicUsize::new(0));
        let a = take(&n, 1, 2).expect("first");
        let b = take(&n, 1, 2).expect("second");
        assert!(take(&n, 1, 2).is_err(), "a third past the bound");
        assert_eq!(n.load(Ordering::SeqCst), 2);
        drop(a);
        let c = take(&n, 1, 2).expect("a place was freed");
        drop((b, c));
        assert_eq!(n.load(Ordering::SeqCst), 0);
    }
}
