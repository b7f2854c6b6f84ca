//! Exact per-channel moments: `(count, mean, M2)` triples and their merge.
//!
//! A batch's variance is never computed as `E[x²] − E[x]²` (which cancels catastrophically
//! when the mean is large against the spread). Each small block of data is reduced by two
//! passes (mean, then Σ(x − mean)², both in f64 while the block sits in L1), and blocks
//! are combined with Chan, Golub and LeVeque's pairwise update
//!
//! ```text
//! n = na + nb,   δ = mean_b − mean_a,
//! mean = mean_a + δ·nb/n,   M2 = M2a + M2b + δ²·na·nb/n
//! ```
//!
//! in an order fixed by the shape alone, so results are bitwise identical whatever the
//! number of threads.

/// Count, mean and sum of squared deviations (M2) of a set of values.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Moments {
    /// Number of values.
    pub count: f64,
    /// Their mean (0 for an empty set).
    pub mean: f64,
    /// Σ(x − mean)².
    pub m2: f64,
}

impl Moments {
    /// Moments of a slice, by two passes in f64.
    ///
    /// ```
    /// let m = bnorm::expert::Moments::of(&[1.0, 2.0, 3.0, 4.0]);
    /// assert_eq!((m.count, m.mean, m.m2), (4.0, 2.5, 5.0));
    /// ```
    pub fn of(values: &[f64]) -> Moments {
        if values.is_empty() {
            return Moments::default();
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let m2 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
        Moments { count: n, mean, m2 }
    }

    /// Merges the moments of two disjoint sets (Chan et al.). Merging with an empty set
    /// returns the other operand unchanged.
    ///
    /// ```
    /// use bnorm::expert::Moments;
    /// let all = Moments::of(&[1.0, 2.0, 3.0, 10.0, 20.0]);
    /// let merged = Moments::of(&[1.0, 2.0, 3.0]).merge(Moments::of(&[10.0, 20.0]));
    /// assert!((all.mean - merged.mean).abs() < 1e-12 && (all.m2 - merged.m2).abs() < 1e-9);
    /// ```
    #[inline]
    pub fn merge(self, other: Moments) -> Moments {
        if other.count == 0.0 {
            return self;
        }
        if self.count == 0.0 {
            return other;
        }
        let n = self.count + other.count;
        let delta = other.mean - self.mean;
        Moments {
            count: n,
            mean: self.mean + delta * (other.count / n),
            m2: self.m2 + other.m2 + delta * delta * (self.count * other.count / n),
        }
    }

    /// Biased (population) variance `M2 / n`; NaN for an empty set.
    pub fn variance_biased(&self) -> f64 {
        self.m2 / self.count
    }

    /// Unbiased (sample) variance `M2 / (n − 1)`; NaN or infinite for n ≤ 1.
    pub fn variance_unbiased(&self) -> f64 {
        self.m2 / (self.count - 1.0)
    }
}
