//! Exponential backoff with "equal jitter" for the controller's redials.
//!
//! The base delay starts at `initial` and doubles after every draw up to
//! `max`; each drawn delay is `base/2 + uniform(0..=base/2)`, so retries of
//! many nodes after a coordinator restart spread out instead of arriving in
//! lock step, while no delay is ever shorter than half the base. Randomness
//! comes from a seeded RNG (an input, so schedules are reproducible in tests).
//!
//! The controller calls [`Backoff::reset`] only once a session has proven
//! healthy (the coordinator's first snapshot arrived), never merely after a
//! successful websocket upgrade: a coordinator that accepts and then fails
//! every session must not be hammered at the initial rate.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Delay schedule for redials. Sans-IO: it only computes durations.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    base: Duration,
    draws: u32,
    rng: StdRng,
}

impl Backoff {
    /// A schedule starting at `initial`, doubling up to `max` (if `initial`
    /// exceeds `max` it is lowered to `max`), drawing jitter from `seed`.
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Self {
        let initial = initial.min(max);
        Backoff {
            initial,
            max,
            base: initial,
            draws: 0,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The delay before the next attempt; advances the schedule. Always in
    /// `[base/2, base]` where `base = min(initial * 2^n, max)` for the `n`th
    /// draw since the last reset, hence never more than `max`.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.base;
        let half = base / 2;
        let spread = u64::try_from((base - half).as_nanos()).unwrap_or(u64::MAX);
        let jitter = if spread == 0 {
            0
        } else {
            self.rng.gen_range(0..=spread)
        };
        self.base = base.saturating_mul(2).min(self.max);
        self.draws = self.draws.saturating_add(1);
        half + Duration::from_nanos(jitter)
    }

    /// Back to the initial delay (after a healthy session).
    pub fn reset(&mut self) {
        self.base = self.initial;
        self.draws = 0;
    }

    /// How many delays were drawn since the last reset.
    pub fn draws(&self) -> u32 {
        self.draws
    }

    /// The largest delay this schedule produces.
    pub fn max(&self) -> Duration {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn expected_base(initial: Duration, max: Duration, n: u32) -> Duration {
        let mut b = initial.min(max);
        for _ in 0..n {
            b = b.saturating_mul(2).min(max);
        }
        b
    }

    #[test]
    fn default_like_schedule_grows_to_the_cap() {
        let mut b = Backoff::new(100 * MS, 10_000 * MS, 7);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= 50 * MS && delays[0] <= 100 * MS, "{delays:?}");
        assert!(delays[3] >= 400 * MS && delays[3] <= 800 * MS, "{delays:?}");
        for d in &delays[8..] {
            assert!(*d >= 5_000 * MS && *d <= 10_000 * MS, "{delays:?}");
        }
        assert_eq!(b.draws(), 12);
    }

    #[test]
    fn zero_initial_gives_zero_delays() {
        let mut b = Backoff::new(Duration::ZERO, 10_000 * MS, 1);
        for _ in 0..5 {
            assert_eq!(b.next_delay(), Duration::ZERO);
        }
    }

    #[test]
    fn same_seed_same_schedule() {
        let mut a = Backoff::new(100 * MS, 10_000 * MS, 42);
        let mut b = Backoff::new(100 * MS, 10_000 * MS, 42);
        for _ in 0..20 {
            assert_eq!(a.next_delay(), b.next_delay());
        }
    }

    proptest! {
        #[test]
        fn delays_stay_within_half_base_and_cap(
            initial_ms in 0u64..5_000,
            max_ms in 1u64..60_000,
            seed in any::<u64>(),
            draws in 1u32..40,
        ) {
            let (initial, max) = (Duration::from_millis(initial_ms), Duration::from_millis(max_ms));
            let mut b = Backoff::new(initial, max, seed);
            for n in 0..draws {
                let d = b.next_delay();
                let base = expected_base(initial, max, n);
                prop_assert!(d <= max, "draw {} = {:?} > cap {:?}", n, d, max);
                prop_assert!(d <= base && d >= base / 2, "draw {} = {:?}, base {:?}", n, d, base);
            }
        }

        #[test]
        fn there_is_jitter(seed in any::<u64>()) {
            let mut b = Backoff::new(10_000 * MS, 10_000 * MS, seed);
            let first = b.next_delay();
            let all_equal = (0..50).all(|_| b.next_delay() == first);
            prop_assert!(!all_equal);
        }

        #[test]
        fn reset_starts_over(seed in any::<u64>(), draws in 1usize..30) {
            let (initial, max) = (100 * MS, 10_000 * MS);
            let mut b = Backoff::new(initial, max, seed);
            for _ in 0..draws {
                b.next_delay();
            }
            b.reset();
            prop_assert_eq!(b.draws(), 0);
            let d = b.next_delay();
            prop_assert!(d >= initial / 2 && d <= initial, "{:?}", d);
        }
    }
}
