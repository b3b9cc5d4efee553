//! Segmentation and classification scores.
//!
//! Conventions (GUIDE.md): Dice of an empty prediction against an empty truth is 1, of a
//! non-empty prediction against an empty truth 0. *Mean-Dice* averages only over images whose
//! truth is non-empty (the paper's measure); *Dice-all* averages over every image.

/// Pixel counts of one predicted mask against its truth.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Overlap {
    pub tp: u64,
    pub fp: u64,
    pub fn_: u64,
}

impl Overlap {
    pub fn of(pred: &[u8], truth: &[u8]) -> Self {
        let mut o = Overlap::default();
        for (&p, &t) in pred.iter().zip(truth) {
            match (p > 0, t > 0) {
                (true, true) => o.tp += 1,
                (true, false) => o.fp += 1,
                (false, true) => o.fn_ += 1,
                _ => {}
            }
        }
        o
    }

    pub fn dice(&self) -> f64 {
        let d = 2 * self.tp + self.fp + self.fn_;
        if d == 0 { 1.0 } else { 2.0 * self.tp as f64 / d as f64 }
    }

    pub fn iou(&self) -> f64 {
        let d = self.tp + self.fp + self.fn_;
        if d == 0 { 1.0 } else { self.tp as f64 / d as f64 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SegmentationScores {
    /// Mean Dice over images with a non-empty truth (NaN if there are none).
    pub mean_dice: f64,
    /// Mean Dice over all images (empty/empty = 1).
    pub dice_all: f64,
    /// Mean IoU over images with a non-empty truth.
    pub mean_iou: f64,
    /// Pixel precision and recall pooled over all images.
    pub precision: f64,
    pub recall: f64,
    pub images: usize,
    pub images_with_tumor: usize,
}

pub fn segmentation(pairs: &[(Overlap, bool)]) -> SegmentationScores {
    let with: Vec<&Overlap> = pairs.iter().filter(|p| p.1).map(|p| &p.0).collect();
    let mean = |v: &mut dyn Iterator<Item = f64>, n: usize| if n == 0 { f64::NAN } else { v.sum::<f64>() / n as f64 };
    let (tp, fp, fn_) = pairs.iter().fold((0u64, 0u64, 0u64), |a, p| (a.0 + p.0.tp, a.1 + p.0.fp, a.2 + p.0.fn_));
    SegmentationScores {
        mean_dice: mean(&mut with.iter().map(|o| o.dice()), with.len()),
        dice_all: mean(&mut pairs.iter().map(|p| p.0.dice()), pairs.len()),
        mean_iou: mean(&mut with.iter().map(|o| o.iou()), with.len()),
        precision: if tp + fp == 0 { f64::NAN } else { tp as f64 / (tp + fp) as f64 },
        recall: if tp + fn_ == 0 { f64::NAN } else { tp as f64 / (tp + fn_) as f64 },
        images: pairs.len(),
        images_with_tumor: with.len(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassificationScores {
    pub accuracy: f64,
    pub sensitivity: f64,
    pub specificity: f64,
    pub auc: f64,
    pub n: usize,
    /// Images predicted positive (probability >= 0.5).
    pub predicted_positive: usize,
    /// Images whose truth is positive.
    pub positives: usize,
    /// The accuracy of always answering the split's more frequent class: the bar a
    /// classifier has to clear before its accuracy means anything.
    pub majority_rate: f64,
    /// Mean of sensitivity and specificity; 0.5 for any constant answer.
    pub balanced_accuracy: f64,
}

/// Scores for predicted positive-class probabilities; the decision threshold is 0.5.
pub fn classification(probs: &[f32], labels: &[u8]) -> ClassificationScores {
    let (mut tp, mut tn, mut fp, mut fn_) = (0usize, 0usize, 0usize, 0usize);
    for (&p, &l) in probs.iter().zip(labels) {
        match (p >= 0.5, l == 1) {
            (true, true) => tp += 1,
            (false, false) => tn += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
        }
    }
    let ratio = |a: usize, b: usize| if b == 0 { f64::NAN } else { a as f64 / b as f64 };
    ClassificationScores {
        accuracy: ratio(tp + tn, probs.len()),
        sensitivity: ratio(tp, tp + fn_),
        specificity: ratio(tn, tn + fp),
        auc: roc_auc(probs, labels),
        n: probs.len(),
        predicted_positive: tp + fp,
        positives: tp + fn_,
        majority_rate: ratio((tp + fn_).max(tn + fp), probs.len()),
        balanced_accuracy: (ratio(tp, tp + fn_) + ratio(tn, tn + fp)) / 2.0,
    }
}

/// A sign that a classifier learnt nothing useful, with a short stable name (`flag`, what
/// `show` lists) and a sentence for the run output and the report.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Warning {
    pub flag: String,
    pub message: String,
}

/// How much the last epoch's mean training loss must be below the first's, relative to the
/// first, for the loss to count as falling: 1 %. Smaller drops are the noise of a new batch
/// order and flips over the same weights (a training with `lr: 0` moves by about 0.1 %).
pub const LOSS_FALL_TOLERANCE: f64 = 0.01;

/// Whether the split's truth holds one class only: then a single predicted class and an
/// accuracy equal to the majority rate say nothing about the classifier ([`one_class_split`]
/// says what is wrong: the data).
fn truth_is_one_class(s: &ClassificationScores) -> bool {
    s.n > 0 && (s.positives == 0 || s.positives == s.n)
}

/// `one-class-split` when a non-empty split holds images of one class only: accuracy cannot
/// show learning there and AUC is undefined.
pub fn one_class_split(split: &str, s: &ClassificationScores) -> Option<Warning> {
    if !truth_is_one_class(s) {
        return None;
    }
    let class = if s.positives == 0 { "negative" } else { "positive" };
    Some(Warning {
        flag: "one-class-split".into(),
        message: format!("all {} {split} images are {class}, so accuracy cannot show learning and AUC is undefined; check the data and its split", s.n),
    })
}

/// `single-class` when every image of a non-empty split got the same predicted class (and
/// the split itself holds both classes).
pub fn single_class(split: &str, s: &ClassificationScores) -> Option<Warning> {
    if s.n == 0 || truth_is_one_class(s) || (s.predicted_positive != 0 && s.predicted_positive != s.n) {
        return None;
    }
    let class = if s.predicted_positive == 0 { "negative" } else { "positive" };
    Some(Warning { flag: "single-class".into(), message: format!("predicts {class} for all {} {split} images", s.n) })
}

/// `below-majority` when accuracy does not beat always answering the majority class.
pub fn below_majority(split: &str, s: &ClassificationScores) -> Option<Warning> {
    if !(s.accuracy.is_finite() && s.majority_rate.is_finite()) || s.accuracy > s.majority_rate || truth_is_one_class(s) {
        return None;
    }
    Some(Warning {
        flag: "below-majority".into(),
        message: format!(
            "{split} accuracy {:.4} does not beat the majority-class rate {:.4} (balanced accuracy {})",
            s.accuracy,
            s.majority_rate,
            if s.balanced_accuracy.is_finite() { format!("{:.4}", s.balanced_accuracy) } else { "undefined: one class only".into() }
        ),
    })
}

/// `loss-flat` when the last epoch's mean training loss is not below the first epoch's by
/// more than [`LOSS_FALL_TOLERANCE`] of it (or is not finite). Needs two epochs: one
/// epoch's mean says nothing about a trend.
pub fn loss_not_falling(epoch_losses: &[f64]) -> Option<Warning> {
    let (&first, &last) = (epoch_losses.first()?, epoch_losses.last()?);
    if epoch_losses.len() < 2 || (first.is_finite() && last.is_finite() && last < first - LOSS_FALL_TOLERANCE * first.abs()) {
        return None;
    }
    Some(Warning {
        flag: "loss-flat".into(),
        message: format!(
            "training loss did not fall: {first:.4} in epoch 1, {last:.4} in epoch {} (needs a drop of more than {:.0} %)",
            epoch_losses.len(),
            LOSS_FALL_TOLERANCE * 100.0
        ),
    })
}

/// ROC AUC by the rank statistic (Mann-Whitney U), ties counted half. NaN when a class is absent.
pub fn roc_auc(probs: &[f32], labels: &[u8]) -> f64 {
    let mut idx: Vec<usize> = (0..probs.len()).collect();
    idx.sort_by(|&a, &b| probs[a].total_cmp(&probs[b]));
    let mut ranks = vec![0f64; probs.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && probs[idx[j + 1]] == probs[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            ranks[idx[k]] = r;
        }
        i = j + 1;
    }
    let npos = labels.iter().filter(|&&l| l == 1).count();
    let nneg = labels.len() - npos;
    if npos == 0 || nneg == 0 {
        return f64::NAN;
    }
    let sum_pos: f64 = ranks.iter().zip(labels).filter(|(_, l)| **l == 1).map(|(r, _)| r).sum();
    (sum_pos - (npos * (npos + 1)) as f64 / 2.0) / (npos * nneg) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dice_and_iou_by_hand() {
        // pred {0,1}, truth {1,2}: tp 1, fp 1, fn 1 -> dice 2/4, iou 1/3.
        let o = Overlap::of(&[1, 1, 0, 0], &[0, 1, 1, 0]);
        assert_eq!((o.tp, o.fp, o.fn_), (1, 1, 1));
        assert!((o.dice() - 0.5).abs() < 1e-12);
        assert!((o.iou() - 1.0 / 3.0).abs() < 1e-12);
        // Empty/empty is a perfect 1; non-empty prediction of an empty truth is 0.
        assert_eq!(Overlap::of(&[0, 0], &[0, 0]).dice(), 1.0);
        assert_eq!(Overlap::of(&[1, 0], &[0, 0]).dice(), 0.0);
        assert_eq!(Overlap::of(&[0, 0], &[1, 0]).iou(), 0.0);
    }

    #[test]
    fn mean_dice_ignores_empty_truth() {
        let s = segmentation(&[
            (Overlap::of(&[1, 1], &[1, 1]), true),  // 1
            (Overlap::of(&[0, 0], &[1, 1]), true),  // 0
            (Overlap::of(&[0, 0], &[0, 0]), false), // 1 (dice-all only)
        ]);
        assert!((s.mean_dice - 0.5).abs() < 1e-12);
        assert!((s.dice_all - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.images_with_tumor, 2);
        assert!((s.precision - 1.0).abs() < 1e-12);
        assert!((s.recall - 0.5).abs() < 1e-12);
    }

    #[test]
    fn auc_by_hand() {
        // One inversion of four pairs: AUC 3/4.
        assert!((roc_auc(&[0.1, 0.6, 0.4, 0.9], &[0, 0, 1, 1]) - 0.75).abs() < 1e-12);
        assert_eq!(roc_auc(&[0.1, 0.9], &[0, 1]), 1.0);
        assert_eq!(roc_auc(&[0.5, 0.5], &[0, 1]), 0.5);
        assert!(roc_auc(&[0.5], &[1]).is_nan());
        let c = classification(&[0.2, 0.7, 0.8, 0.3], &[0, 1, 0, 1]);
        assert_eq!((c.accuracy, c.sensitivity, c.specificity), (0.5, 0.5, 0.5));
    }

    #[test]
    fn majority_rate_and_balanced_accuracy_by_hand() {
        // 3 positives, 1 negative, everything called positive: accuracy 0.75 = majority rate.
        let c = classification(&[0.9, 0.8, 0.7, 0.6], &[1, 1, 1, 0]);
        assert_eq!((c.accuracy, c.majority_rate, c.balanced_accuracy), (0.75, 0.75, 0.5));
        assert_eq!((c.predicted_positive, c.positives), (4, 3));
        assert_eq!(single_class("test", &c).map(|w| w.flag), Some("single-class".into()));
        assert_eq!(below_majority("test", &c).map(|w| w.flag), Some("below-majority".into()));
        // One right negative: accuracy 1 beats 0.75, two classes predicted.
        let c = classification(&[0.9, 0.8, 0.7, 0.1], &[1, 1, 1, 0]);
        assert_eq!((c.accuracy, c.balanced_accuracy), (1.0, 1.0));
        assert!(single_class("test", &c).is_none() && below_majority("test", &c).is_none());
        // All negative is single-class too, named as such.
        let c = classification(&[0.1, 0.2], &[1, 0]);
        assert!(single_class("val", &c).unwrap().message.contains("negative for all 2 val"));
        // Nothing scored: no warning (an empty split is an error elsewhere).
        assert!(single_class("val", &classification(&[], &[])).is_none());
    }

    #[test]
    fn loss_guard_needs_a_real_drop() {
        assert!(loss_not_falling(&[]).is_none());
        assert!(loss_not_falling(&[0.69]).is_none(), "one epoch shows no trend");
        assert!(loss_not_falling(&[0.69, 0.5]).is_none());
        // A drop under 1 % of the first loss is flat; a rise is flat; NaN is flat.
        assert_eq!(loss_not_falling(&[0.70, 0.695]).map(|w| w.flag), Some("loss-flat".into()));
        assert!(loss_not_falling(&[0.69, 0.70]).is_some());
        assert!(loss_not_falling(&[0.69, f64::NAN]).is_some());
        assert!(loss_not_falling(&[0.69, 0.60, 0.69]).is_some(), "last against first");
    }
}
