//! Latencies drawn from a log-normal distribution fitted to a published median and 99th
//! percentile: service latencies are skewed to the right, and two percentiles are what AWS-LIMITS.md
//! has for each.

use std::time::Duration;

/// z of the 99th percentile of the standard normal distribution.
const Z99: f64 = 2.326_347_874;

#[derive(Clone, Copy, Debug)]
pub struct Latency {
    median: f64,
    sigma: f64,
}

impl Latency {
    pub fn new(p50: Duration, p99: Duration) -> Latency {
        let median = p50.as_secs_f64();
        let sigma = (p99.as_secs_f64() / median).ln() / Z99;
        Latency { median, sigma }
    }

    /// One draw.
    pub fn sample(&self) -> Duration {
        // Box–Muller: a standard normal from two uniform draws.
        let u1: f64 = rand::random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rand::random();
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        Duration::from_secs_f64(self.median * (self.sigma * z).exp())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_have_the_percentiles_they_were_fitted_to() {
        let latency = Latency::new(Duration::from_millis(10), Duration::from_millis(50));
        let mut draws: Vec<Duration> = (0..100_000).map(|_| latency.sample()).collect();
        draws.sort();
        let p50 = draws[50_000].as_secs_f64();
        let p99 = draws[99_000].as_secs_f64();
        assert!((p50 - 0.010).abs() < 0.0005, "{p50}");
        assert!((p99 - 0.050).abs() < 0.004, "{p99}");
    }
}
