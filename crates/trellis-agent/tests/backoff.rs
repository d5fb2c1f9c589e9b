//! Reconnect backoff: full jitter under a growing ceiling, capped, reset
//! after a healthy connection, reproducible from a seed.

use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use trellis_agent::link::{Backoff, BackoffConfig};

fn config() -> BackoffConfig {
    BackoffConfig {
        base: Duration::from_millis(500),
        cap: Duration::from_secs(30),
        reset_after: Duration::from_secs(30),
    }
}

#[test]
fn every_delay_is_within_zero_and_the_capped_ceiling() {
    for seed in 0..50 {
        let mut backoff = Backoff::new(config(), StdRng::seed_from_u64(seed));
        for attempt in 0..40u32 {
            let ceiling = backoff.ceiling();
            let expected = Duration::from_millis(500)
                .saturating_mul(1u32 << attempt.min(20))
                .min(Duration::from_secs(30));
            assert_eq!(ceiling, expected, "attempt {attempt}");
            let delay = backoff.next_delay();
            assert!(delay <= ceiling, "seed {seed} attempt {attempt}: {delay:?}");
        }
    }
}

#[test]
fn delays_grow_on_average_until_the_cap() {
    let mean_at = |attempt: u32| {
        let total: Duration = (0..400)
            .map(|seed| {
                let mut backoff = Backoff::new(config(), StdRng::seed_from_u64(seed));
                for _ in 0..attempt {
                    backoff.next_delay();
                }
                backoff.next_delay()
            })
            .sum();
        total / 400
    };
    let means: Vec<Duration> = (0..8).map(mean_at).collect();
    for pair in means.windows(2) {
        assert!(pair[1] > pair[0], "{means:?}");
    }
    // Full jitter: the mean is about half the ceiling.
    let capped = mean_at(30);
    assert!(
        capped > Duration::from_secs(12) && capped < Duration::from_secs(18),
        "{capped:?}"
    );
}

#[test]
fn reset_starts_over() {
    let mut backoff = Backoff::new(config(), StdRng::seed_from_u64(1));
    for _ in 0..10 {
        backoff.next_delay();
    }
    assert_eq!(backoff.ceiling(), Duration::from_secs(30));
    backoff.reset();
    assert_eq!(backoff.ceiling(), Duration::from_millis(500));
}

#[test]
fn retry_after_waits_at_least_as_long_as_asked_plus_some_spread() {
    let mut backoff = Backoff::new(config(), StdRng::seed_from_u64(3));
    let delays: Vec<Duration> = (0..100)
        .map(|_| backoff.retry_after(Duration::from_secs(40)))
        .collect();
    assert!(delays.iter().all(|d| *d >= Duration::from_secs(40)));
    assert!(delays.iter().all(|d| *d <= Duration::from_secs(42)));
    assert!(delays.iter().any(|d| *d != delays[0]), "jittered");
    // Honouring the hub does not advance the exponential backoff.
    assert_eq!(backoff.ceiling(), Duration::from_millis(500));
}

#[test]
fn the_same_seed_gives_the_same_delays() {
    let run = |seed| {
        let mut backoff = Backoff::new(config(), StdRng::seed_from_u64(seed));
        (0..10).map(|_| backoff.next_delay()).collect::<Vec<_>>()
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
}
