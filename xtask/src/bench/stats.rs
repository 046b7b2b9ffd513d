//! Summary statistics over repetitions.
use serde::Serialize;

/// One figure over all repetitions of one set-up.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Interquartile range (p75 - p25, linear interpolation).
    pub iqr: f64,
    pub n: usize,
    pub samples: Vec<f64>,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.len() == 1 {
        return sorted[0];
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

pub fn summarize(samples: &[f64]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    Some(Summary {
        median: quantile(&s, 0.5),
        min: s[0],
        max: s[s.len() - 1],
        iqr: quantile(&s, 0.75) - quantile(&s, 0.25),
        n: s.len(),
        samples: samples.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let s = summarize(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (3.0, 1.0, 5.0, 3));
        assert_eq!(s.iqr, 2.0);
        let s = summarize(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!(s.iqr, 1.5);
        assert!(summarize(&[]).is_none());
        assert_eq!(summarize(&[7.0]).unwrap().iqr, 0.0);
    }
}
