//! Grad-CAM, Grad-CAM++ and HiResCAM heatmaps.
//!
//! The approach (BURN-NOTES.md): run the network up to the chosen unit on the inner
//! (non-autodiff) backend to get activations A; lift A into the autodiff backend as a fresh
//! tracked leaf; run only the rest of the network on it; back-propagate the sum over the batch
//! of the target logit (images do not interact, so each gets its own gradient); read dA.
//! The weighting, ReLU, normalisation and upsampling follow pytorch-grad-cam exactly:
//! ReLU -> per-image `(x - min) / (max + 1e-7)` -> bilinear (half-pixel) resize to the input
//! -> the same min-max again. The reference test in `tests/` holds us to 1e-4 of it.

use burn::module::AutodiffModule;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::dataset::Dataset;
use super::fast_ops::TrainBackend;
use super::model::Classifier;
use super::resize;
use super::train::batch_tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CamMethod {
    GradCam,
    GradCamPlusPlus,
    HiResCam,
}

impl CamMethod {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "gradcam" => Some(CamMethod::GradCam),
            "gradcam++" => Some(CamMethod::GradCamPlusPlus),
            "hirescam" => Some(CamMethod::HiResCam),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CamTarget {
    Class(usize),
    Predicted,
}

/// One heatmap per sample of `idx`, each `height * width` values in [0, 1].
pub fn heatmaps<B: TrainBackend>(
    model: &Classifier<B>,
    ds: &Dataset,
    idx: &[usize],
    layer: usize,
    method: CamMethod,
    target: CamTarget,
    batch: usize,
) -> Vec<Vec<f32>> {
    heatmaps_reporting(model, ds, idx, layer, method, target, batch, &mut |_, _| {})
}

/// [`heatmaps`], calling `progress(done, total)` in images after every batch.
#[allow(clippy::too_many_arguments)]
pub fn heatmaps_reporting<B: TrainBackend>(
    model: &Classifier<B>,
    ds: &Dataset,
    idx: &[usize],
    layer: usize,
    method: CamMethod,
    target: CamTarget,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Vec<Vec<f32>> {
    heatmaps_by_methods(model, ds, idx, layer, &[method], target, batch, progress).pop().unwrap_or_default()
}

/// The heatmaps of several methods from one pass: one list per entry of `methods`, each
/// what [`heatmaps_reporting`] gives for that method alone, bit for bit. Why it is exact and
/// cheap: the methods differ only in how they weigh the activations A by their gradients dA
/// (`combine`), and A and dA depend on the model, images, layer, target and batching alone,
/// so they are computed once per batch and every method reads the same values.
#[allow(clippy::too_many_arguments)]
pub fn heatmaps_by_methods<B: TrainBackend>(
    model: &Classifier<B>,
    ds: &Dataset,
    idx: &[usize],
    layer: usize,
    methods: &[CamMethod],
    target: CamTarget,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Vec<Vec<Vec<f32>>> {
    let inner = model.valid();
    let device = model.fc.weight.val().device();
    let mut out: Vec<Vec<Vec<f32>>> = methods.iter().map(|_| Vec::with_capacity(idx.len())).collect();
    let mut done = 0;
    for chunk in idx.chunks(batch.max(1)) {
        let x = batch_tensor::<B::InnerBackend>(ds, chunk, &[], &device);
        let acts = inner.features(x, layer); // [n, K, h, w]
        let [n, k, h, w] = acts.dims();
        let a = Tensor::<B, 4>::from_inner(acts.clone()).require_grad();
        let logits = model.forward_from(a.clone(), layer); // [n, 2]
        let onehot: Vec<f32> = match target {
            CamTarget::Class(c) => (0..n).flat_map(|_| (0..2).map(move |j| (j == c) as u8 as f32)).collect(),
            CamTarget::Predicted => {
                let l = logits.clone().inner().into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
                l.chunks(2)
                    .flat_map(|r| {
                        let c = (r[1] > r[0]) as usize;
                        [(c == 0) as u8 as f32, (c == 1) as u8 as f32]
                    })
                    .collect()
            }
        };
        let sel = Tensor::<B, 2>::from_data(TensorData::new(onehot, [n, 2]), &device);
        let grads = (logits * sel).sum().backward();
        let g = a
            .grad(&grads)
            .map(|g| g.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default())
            .unwrap_or_else(|| vec![0.0; n * k * h * w]);
        let av = acts.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
        let hw = h * w;
        for i in 0..n {
            let ga = &g[i * k * hw..(i + 1) * k * hw];
            let aa = &av[i * k * hw..(i + 1) * k * hw];
            for (maps, &method) in out.iter_mut().zip(methods) {
                let cam = combine(method, aa, ga, k, hw);
                let cam: Vec<f32> = cam.into_iter().map(|v| v.max(0.0)).collect();
                let up = resize::bilinear(&scale(&cam), w, h, ds.width, ds.height);
                maps.push(scale(&up));
            }
        }
        done += chunk.len();
        progress(done, idx.len());
    }
    out
}

/// Weighted channel sum of one image's activations `a` by its gradients `g` (`k` maps of `hw`).
fn combine(method: CamMethod, a: &[f32], g: &[f32], k: usize, hw: usize) -> Vec<f32> {
    let mut cam = vec![0f32; hw];
    match method {
        CamMethod::GradCam => {
            for c in 0..k {
                let gc = &g[c * hw..(c + 1) * hw];
                let wgt = gc.iter().sum::<f32>() / hw as f32;
                for (o, &v) in cam.iter_mut().zip(&a[c * hw..(c + 1) * hw]) {
                    *o += wgt * v;
                }
            }
        }
        CamMethod::GradCamPlusPlus => {
            for c in 0..k {
                let gc = &g[c * hw..(c + 1) * hw];
                let ac = &a[c * hw..(c + 1) * hw];
                let sum_a: f32 = ac.iter().sum();
                let mut wgt = 0f32;
                for &gv in gc {
                    let g2 = gv * gv;
                    let g3 = g2 * gv;
                    let aij = if gv != 0.0 { g2 / (2.0 * g2 + sum_a * g3 + 1e-6) } else { 0.0 };
                    wgt += gv.max(0.0) * aij;
                }
                for (o, &v) in cam.iter_mut().zip(ac) {
                    *o += wgt * v;
                }
            }
        }
        CamMethod::HiResCam => {
            for c in 0..k {
                for p in 0..hw {
                    cam[p] += g[c * hw + p] * a[c * hw + p];
                }
            }
        }
    }
    cam
}

/// pytorch-grad-cam's `scale_cam_image` without the resize: `(x - min) / (1e-7 + max)`.
fn scale(x: &[f32]) -> Vec<f32> {
    let min = x.iter().cloned().fold(f32::INFINITY, f32::min);
    let shifted: Vec<f32> = x.iter().map(|v| v - min).collect();
    let max = shifted.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    shifted.into_iter().map(|v| v / (1e-7 + max)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_by_hand() {
        // Two channels of two pixels.
        let a = [1.0, 2.0, 3.0, 0.0];
        let g = [0.5, 0.5, -1.0, 1.0];
        // Grad-CAM: weights (0.5, 0.0) -> cam = (0.5, 1.0).
        assert_eq!(combine(CamMethod::GradCam, &a, &g, 2, 2), vec![0.5, 1.0]);
        // HiResCAM: sum_k g*a = (0.5 - 3.0, 1.0 + 0.0).
        assert_eq!(combine(CamMethod::HiResCam, &a, &g, 2, 2), vec![-2.5, 1.0]);
        let s = scale(&[2.0, 4.0, 3.0]);
        assert!(s[0] == 0.0 && (s[1] - 1.0).abs() < 1e-6 && (s[2] - 0.5).abs() < 1e-6);
        assert_eq!(scale(&[0.0, 0.0]), vec![0.0, 0.0]);
    }

    /// What a shared pass gives each method is, bit for bit, what that method gives alone:
    /// the invariant behind fusing a `gradcam` sweep over methods (`stages::gradcam`). Every
    /// architecture, every layer, both targets, and a batch size that leaves a partial batch.
    #[test]
    fn methods_from_one_pass_equal_each_method_alone() {
        use crate::ml::dataset::{SplitConfig, assign_splits};
        use crate::ml::model::ArchConfig;
        use crate::ml::synthetic::{SyntheticConfig, generate};
        use crate::ml::train::seeded_init;
        use burn::backend::{Autodiff, Flex};
        type Ad = Autodiff<Flex>;

        let dev = Default::default();
        let mut ds = generate(&SyntheticConfig { count: 11, size: 16, tumor_fraction: 0.5, contrast: 0.6, noise: 0.05, slices_per_patient: 1, seed: 3 });
        assign_splits(&mut ds.samples, SplitConfig { val: 0.2, test: 0.2, seed: 1 });
        let idx: Vec<usize> = (0..ds.samples.len()).collect();
        let methods = [CamMethod::GradCam, CamMethod::GradCamPlusPlus, CamMethod::HiResCam];
        let bits = |maps: &[Vec<f32>]| -> Vec<u32> { maps.iter().flatten().map(|v| v.to_bits()).collect() };
        let archs = [ArchConfig::vgg_small(1), ArchConfig::vgg(1, vec![4, 8, 8], true), ArchConfig::resnet(1, &[4, 8], 1)];
        for arch in archs {
            let model = seeded_init::<Ad>(&arch, 5, &dev);
            for layer in 0..arch.units() {
                for target in [CamTarget::Class(1), CamTarget::Predicted] {
                    let shared = heatmaps_by_methods(&model, &ds, &idx, layer, &methods, target, 4, &mut |_, _| {});
                    assert_eq!(shared.len(), methods.len());
                    for (m, maps) in methods.iter().zip(&shared) {
                        let alone = heatmaps(&model, &ds, &idx, layer, *m, target, 4);
                        assert_eq!(maps.len(), ds.samples.len());
                        assert!(bits(maps) == bits(&alone), "{} layer {layer} {target:?} {m:?}: the shared pass differs", arch.name);
                    }
                    // The methods really differ, or the comparison above proves little (HiResCAM
                    // equals Grad-CAM at a layer followed by global pooling, so Grad-CAM++).
                    assert!(bits(&shared[0]) != bits(&shared[1]), "{} layer {layer}: Grad-CAM equals Grad-CAM++", arch.name);
                }
            }
        }
    }
}
