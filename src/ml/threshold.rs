//! Heatmap -> binary mask, per image: a fixed value, Otsu's threshold, or the top p% of pixels.

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ThresholdMethod {
    Fixed(f32),
    Otsu,
    /// Keep the top `p` percent of pixels (0..100).
    Percentile(f32),
}

/// The cut for one heatmap: pixels with `h >= cut` are foreground.
pub fn cut(h: &[f32], method: ThresholdMethod) -> f32 {
    match method {
        ThresholdMethod::Fixed(v) => v,
        ThresholdMethod::Otsu => otsu(h),
        ThresholdMethod::Percentile(p) => {
            let mut v = h.to_vec();
            v.sort_by(|a, b| b.total_cmp(a));
            let k = ((p as f64 / 100.0) * v.len() as f64).ceil() as usize;
            if k == 0 { f32::INFINITY } else { v[(k - 1).min(v.len() - 1)] }
        }
    }
}

pub fn mask(h: &[f32], method: ThresholdMethod) -> Vec<u8> {
    let c = cut(h, method);
    // An all-zero heatmap (the model saw nothing) yields an empty mask, whatever the method.
    let max = h.iter().cloned().fold(0f32, f32::max);
    if max <= 0.0 {
        return vec![0; h.len()];
    }
    h.iter().map(|&v| (v >= c) as u8).collect()
}

/// Otsu's threshold on values in [0,1], 256 bins; returns the lower edge of the first bin
/// above the cut, so `h >= t` selects the upper class.
pub fn otsu(h: &[f32]) -> f32 {
    const BINS: usize = 256;
    let mut hist = [0u64; BINS];
    for &v in h {
        hist[((v.clamp(0.0, 1.0) * (BINS - 1) as f32).round()) as usize] += 1;
    }
    let total = h.len() as f64;
    let sum_all: f64 = hist.iter().enumerate().map(|(i, &c)| i as f64 * c as f64).sum();
    let (mut w0, mut sum0) = (0f64, 0f64);
    let (mut best, mut best_t) = (-1f64, 0usize);
    for (t, &count) in hist.iter().enumerate().take(BINS - 1) {
        w0 += count as f64;
        sum0 += t as f64 * count as f64;
        let w1 = total - w0;
        if w0 == 0.0 || w1 == 0.0 {
            continue;
        }
        let m0 = sum0 / w0;
        let m1 = (sum_all - sum0) / w1;
        let between = w0 * w1 * (m0 - m1) * (m0 - m1);
        if between > best {
            best = between;
            best_t = t;
        }
    }
    (best_t + 1) as f32 / (BINS - 1) as f32 - 0.5 / (BINS - 1) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otsu_splits_two_modes() {
        let h: Vec<f32> = (0..100).map(|i| if i < 70 { 0.1 } else { 0.8 }).collect();
        let t = otsu(&h);
        assert!(t > 0.1 && t <= 0.8, "{t}");
        let m = mask(&h, ThresholdMethod::Otsu);
        assert_eq!(m.iter().filter(|&&v| v == 1).count(), 30);
    }

    #[test]
    fn percentile_and_fixed() {
        let h: Vec<f32> = (0..10).map(|i| i as f32 / 9.0).collect();
        assert_eq!(mask(&h, ThresholdMethod::Percentile(20.0)).iter().filter(|&&v| v == 1).count(), 2);
        assert_eq!(mask(&h, ThresholdMethod::Fixed(0.5)).iter().filter(|&&v| v == 1).count(), 5);
        assert!(mask(&[0.0; 4], ThresholdMethod::Otsu).iter().all(|&v| v == 0));
    }
}
