//! A token bucket, as AWS throttles: `rate` tokens a second up to `burst`; a request that finds
//! it empty is refused (API Gateway answers 429), not queued.

use parking_lot::Mutex;
use std::time::Instant;

pub struct Bucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64) -> Bucket {
        Bucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&self) -> bool {
        let mut state = self.state.lock();
        let now = Instant::now();
        let (tokens, at) = &mut *state;
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_bucket_refuses() {
        let bucket = Bucket::new(0.001, 3.0);
        assert!((0..3).all(|_| bucket.try_take()));
        assert!(!bucket.try_take());
    }
}
