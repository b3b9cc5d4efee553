//! Small-sample statistics for results across seeds: mean, sample standard deviation, and
//! the Student-t confidence interval of a mean (or of a mean paired difference).
//!
//! Pure arithmetic on `f64` slices, in a fixed order, so the same values give the same bits
//! on every machine. Why t and not bootstrap: a study has 3 to 10 seeds, where a bootstrap
//! interval is too narrow (it cannot see beyond the few values it resamples) and random;
//! the t interval is exact for normal errors and deterministic.

/// Mean, spread and a confidence interval of one metric over `n` values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation (n - 1 in the denominator); `None` for a single value.
    pub sd: Option<f64>,
    /// Two-sided t interval of the mean at [`LEVEL`]; `None` for a single value.
    pub ci: Option<(f64, f64)>,
}

/// Confidence level of every interval camflow prints.
pub const LEVEL: f64 = 0.95;

pub fn mean(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    Some(xs.iter().sum::<f64>() / xs.len() as f64)
}

/// Sample standard deviation (Bessel's n - 1); `None` below two values.
pub fn sd(xs: &[f64]) -> Option<f64> {
    if xs.len() < 2 {
        return None;
    }
    let m = mean(xs)?;
    let ss: f64 = xs.iter().map(|x| (x - m) * (x - m)).sum();
    Some((ss / (xs.len() - 1) as f64).sqrt())
}

/// Mean, sd and the `level` t interval, mean ± t(1 - (1 - level)/2, n - 1) · sd / √n.
/// `None` for no values or a value that is not finite (a NaN must not pass for a result).
pub fn summarize(xs: &[f64], level: f64) -> Option<Summary> {
    if xs.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let m = mean(xs)?;
    let s = sd(xs);
    let ci = s.map(|s| {
        let half = t_quantile(1.0 - (1.0 - level) / 2.0, (xs.len() - 1) as f64) * s / (xs.len() as f64).sqrt();
        (m - half, m + half)
    });
    Some(Summary { n: xs.len(), mean: m, sd: s, ci })
}

/// Paired differences a[i] - b[i]: their summary is the paired t interval.
pub fn paired(a: &[f64], b: &[f64], level: f64) -> Option<Summary> {
    if a.len() != b.len() {
        return None;
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    summarize(&d, level)
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, 9 terms; relative error about 1e-15).
#[allow(clippy::excessive_precision)]
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1-x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Continued fraction of the incomplete beta function (modified Lentz).
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    // Lentz's method: a denominator that reaches 0 is replaced by a tiny number.
    let away_from_zero = |v: f64| if v.abs() < 1e-300 { 1e-300 } else { v };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = away_from_zero(1.0 - qab * x / qap);
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = away_from_zero(1.0 + aa * d);
        c = away_from_zero(1.0 + aa / c);
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = away_from_zero(1.0 + aa * d);
        c = away_from_zero(1.0 + aa / c);
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-16 {
            break;
        }
    }
    h
}

/// Regularized incomplete beta I_x(a, b).
fn beta_inc(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front = (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x < (a + 1.0) / (a + b + 2.0) { front * beta_cf(a, b, x) / a } else { 1.0 - front * beta_cf(b, a, 1.0 - x) / b }
}

/// P(T <= t) for Student's t with `df` degrees of freedom.
pub fn t_cdf(t: f64, df: f64) -> f64 {
    let tail = 0.5 * beta_inc(df / 2.0, 0.5, df / (df + t * t));
    if t >= 0.0 { 1.0 - tail } else { tail }
}

/// The `p` quantile of Student's t with `df` > 0 degrees of freedom (scipy's `t.ppf`), by
/// bisection on [`t_cdf`]: 200 halvings of a bracket reach the last bit, and a fixed count
/// keeps the result the same everywhere.
pub fn t_quantile(p: f64, df: f64) -> f64 {
    // Written so that a NaN `p` or `df` fails the check too.
    let valid = p > 0.0 && p < 1.0 && df > 0.0;
    if !valid {
        return f64::NAN;
    }
    if p < 0.5 {
        return -t_quantile(1.0 - p, df);
    }
    let mut hi = 1.0;
    while t_cdf(hi, df) < p && hi < 1e300 {
        hi *= 2.0;
    }
    let mut lo = 0.0;
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1.0)
    }

    #[test]
    #[allow(clippy::excessive_precision)]
    fn t_quantiles_match_scipy() {
        // scipy.stats.t.ppf(q, df), here to 18 digits from mpmath's betainc at 40 digits.
        let known = [
            (0.975, 1.0, 12.7062047361746933),
            (0.975, 2.0, 4.30265272974946179),
            (0.975, 3.0, 3.18244630528370844),
            (0.975, 4.0, 2.77644510519779349),
            (0.975, 5.0, 2.57058183563631478),
            (0.975, 9.0, 2.262157162798205),
            (0.975, 10.0, 2.22813885198627422),
            (0.975, 29.0, 2.04522964213270387),
            (0.975, 100.0, 1.98397151852355189),
            (0.95, 1.0, 6.3137515146750374),
            (0.95, 10.0, 1.81246112281167587),
            (0.995, 3.0, 5.84090930973335541),
        ];
        for (q, df, want) in known {
            let got = t_quantile(q, df);
            assert!(close(got, want, 1e-9), "t.ppf({q}, {df}) = {want}, got {got}");
            assert!(close(t_quantile(1.0 - q, df), -want, 1e-9));
        }
        // Closed forms: df = 1 is Cauchy, df = 2 has an algebraic inverse.
        for q in [0.6, 0.9, 0.975, 0.999] {
            let cauchy = (std::f64::consts::PI * (q - 0.5)).tan();
            assert!(close(t_quantile(q, 1.0), cauchy, 1e-9), "df 1, q {q}");
            let df2 = (2.0 * q - 1.0) / (2.0 * q * (1.0 - q)).sqrt();
            assert!(close(t_quantile(q, 2.0), df2, 1e-9), "df 2, q {q}");
        }
        // Large df tends to the normal quantile.
        assert!(close(t_quantile(0.975, 1e7), 1.95996398454005386, 1e-6));
        assert!(t_quantile(1.0, 3.0).is_nan() && t_quantile(0.5, 0.0).is_nan());
    }

    #[test]
    #[allow(clippy::excessive_precision)]
    fn mean_sd_and_interval_of_known_values() {
        let xs = [0.80, 0.85, 0.78];
        let s = summarize(&xs, LEVEL).expect("summary");
        assert_eq!(s.n, 3);
        assert!(close(s.mean, 0.81, 1e-12));
        // numpy.std([0.80, 0.85, 0.78], ddof=1)
        let sd = s.sd.expect("sd");
        assert!(close(sd, 0.036055512754639925, 1e-12), "{sd}");
        let (lo, hi) = s.ci.expect("ci");
        let half = 4.30265272974946179 * sd / 3f64.sqrt();
        assert!(close(lo, 0.81 - half, 1e-9) && close(hi, 0.81 + half, 1e-9), "{lo} {hi}");
        // One value: a mean, no spread, no interval.
        let one = summarize(&[0.5], LEVEL).expect("summary");
        assert_eq!((one.mean, one.sd, one.ci), (0.5, None, None));
        assert_eq!(summarize(&[], LEVEL), None);
        assert_eq!(summarize(&[0.5, f64::NAN], LEVEL), None);
        // Equal values: zero width.
        assert_eq!(summarize(&[0.7, 0.7], LEVEL).and_then(|s| s.ci), Some((0.7, 0.7)));
    }

    #[test]
    fn paired_interval_is_the_interval_of_differences() {
        let a = [0.90, 0.88, 0.93, 0.91];
        let b = [0.85, 0.86, 0.84, 0.90];
        let p = paired(&a, &b, LEVEL).expect("paired");
        let d = [0.05, 0.02, 0.09, 0.01];
        let s = summarize(&d, LEVEL).expect("summary");
        assert!(close(p.mean, s.mean, 1e-12) && close(p.sd.unwrap(), s.sd.unwrap(), 1e-12));
        // Pairing removes the shared seed effect: the paired interval is narrower than the
        // difference of two independent means would suggest.
        assert!(close(p.mean, 0.0425, 1e-12));
        assert_eq!(paired(&a, &b[..3], LEVEL), None);
    }

    #[test]
    fn t_cdf_is_symmetric_and_monotone() {
        assert!(close(t_cdf(0.0, 5.0), 0.5, 1e-15));
        let mut last = 0.0;
        for i in -40..=40 {
            let c = t_cdf(i as f64 * 0.25, 3.0);
            assert!(c >= last);
            assert!(close(c + t_cdf(-(i as f64) * 0.25, 3.0), 1.0, 1e-12));
            last = c;
        }
    }
}
