//! Weighted random choice: a binary search over cumulative weights.

use crate::rng::Rng;

#[derive(Debug, Clone)]
pub struct WeightedRandom {
    cumulative: Vec<u64>,
}

impl WeightedRandom {
    pub fn new(weights: &[u32]) -> WeightedRandom {
        let mut sum = 0u64;
        let cumulative = weights
            .iter()
            .map(|w| {
                sum += u64::from(*w);
                sum
            })
            .collect();
        WeightedRandom { cumulative }
    }

    pub fn pick(&self, rng: &mut Rng) -> Option<usize> {
        let total = *self.cumulative.last()?;
        if total == 0 {
            return None;
        }
        let x = rng.below(total);
        Some(self.cumulative.partition_point(|c| *c <= x))
    }
}

/// A weighted random choice straight from a list of weights, without building anything: two passes
/// over the weights, no allocation. For short lists picked from rarely enough that a prebuilt
/// [`WeightedRandom`] is not worth keeping (a route's few destinations).
pub fn pick_weighted<I>(weights: I, rng: &mut Rng) -> Option<usize>
where
    I: IntoIterator<Item = u32>,
    I::IntoIter: Clone,
{
    let weights = weights.into_iter();
    let total: u64 = weights.clone().map(u64::from).sum();
    if total == 0 {
        return None;
    }
    let mut x = rng.below(total);
    for (i, w) in weights.enumerate() {
        let w = u64::from(w);
        if x < w {
            return Some(i);
        }
        x -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn honours_weights_within_tolerance() {
        let wr = WeightedRandom::new(&[50, 25, 25, 0]);
        let mut rng = Rng::new(42);
        let mut counts = [0u32; 4];
        for _ in 0..100_000 {
            counts[wr.pick(&mut rng).unwrap()] += 1;
        }
        assert_eq!(counts[3], 0, "zero weight is never picked");
        for (c, expect) in counts.iter().zip([50_000.0, 25_000.0, 25_000.0]) {
            assert!((f64::from(*c) - expect).abs() < expect * 0.03, "{counts:?}");
        }
    }

    #[test]
    fn pick_weighted_matches_the_weights() {
        let mut rng = Rng::new(7);
        let mut counts = [0u32; 4];
        for _ in 0..100_000 {
            counts[pick_weighted([50u32, 25, 25, 0], &mut rng).unwrap()] += 1;
        }
        assert_eq!(counts[3], 0);
        for (c, expect) in counts.iter().zip([50_000.0, 25_000.0, 25_000.0]) {
            assert!((f64::from(*c) - expect).abs() < expect * 0.03, "{counts:?}");
        }
        assert_eq!(pick_weighted([0u32, 0], &mut rng), None);
        assert_eq!(pick_weighted(std::iter::empty::<u32>(), &mut rng), None);
    }

    #[test]
    fn nothing_to_pick() {
        assert_eq!(WeightedRandom::new(&[]).pick(&mut Rng::new(1)), None);
        assert_eq!(WeightedRandom::new(&[0]).pick(&mut Rng::new(1)), None);
    }
}
