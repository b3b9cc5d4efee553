//! Grad-CAM, Grad-CAM++ and HiResCAM heatmaps.
//!
//! The approach (BURN-NOTES.md): run the network up to the chosen unit on the inner
//! (non-autodiff) backend to get activations A; lift A into the autodiff backend as a fresh
//! tracked leaf; run only the rest of the network on it, batch norm with its running
//! statistics as in the inner pass (`Norm::Running`: the network as it classifies, as
//! pytorch-grad-cam explains a model in `eval()` mode); back-propagate the sum over the batch
//! of the target logit (images do not interact, so each gets its own gradient); read dA.
//! The weighting, ReLU, normalisation and upsampling follow pytorch-grad-cam exactly:
//! ReLU -> per-image `(x - min) / (max + 1e-7)` -> bilinear (half-pixel) resize to the input
//! -> the same min-max again. The reference test in `tests/` holds us to 1e-4 of it.

use burn::module::{AutodiffModule, Module};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::dataset::Dataset;
use super::fast_ops::TrainBackend;
use super::model::{Classifier, Norm};
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

/// One heatmap per sample of `idx`, each `height * width` values in [0, 1]: the heatmaps of
/// one layer and method alone ([`heatmaps_for`] with one request).
pub fn heatmaps<B: TrainBackend>(
    model: &Classifier<B>,
    ds: &Dataset,
    idx: &[usize],
    layer: usize,
    method: CamMethod,
    target: CamTarget,
    batch: usize,
) -> Vec<Vec<f32>> {
    heatmaps_for(model, ds, idx, &[(layer, method)], target, batch, &mut |_, _| {}).pop().unwrap_or_default()
}

/// The heatmaps of several (layer, method) requests from one pass: one list per request, each
/// what [`heatmaps`] gives for that layer and method alone, bit for bit. `progress(done,
/// total)` is called in images after every batch.
///
/// Why it is exact and cheap. The methods differ only in how they weigh a layer's activations
/// A by their gradients dA (`combine`). A and dA depend on the model, images, layer, target and
/// batching alone, so each batch computes them once per layer: the activations of the
/// shallowest layer, then each deeper layer's from the one before (`Classifier::segment`, the
/// same ops as `features`); dA of the deepest layer from the logits, then each shallower
/// layer's by back-propagating the deeper layer's dA through the segment between them (a
/// backward of `sum(segment(A) * dA_deeper)`, whose upstream gradient is exactly dA_deeper, so
/// the segment's backward runs on the same values as in a pass from the logits).
pub fn heatmaps_for<B: TrainBackend>(
    model: &Classifier<B>,
    ds: &Dataset,
    idx: &[usize],
    requests: &[(usize, CamMethod)],
    target: CamTarget,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Vec<Vec<Vec<f32>>> {
    let inner = model.valid();
    // Only the activations' gradients are needed: with the parameters untracked, the backward
    // skips their gradients (d A is the same bits either way).
    let model = &model.clone().no_grad();
    let device = model.fc.weight.val().device();
    let mut layers: Vec<usize> = requests.iter().map(|r| r.0).collect();
    layers.sort_unstable();
    layers.dedup();
    let mut out: Vec<Vec<Vec<f32>>> = requests.iter().map(|_| Vec::with_capacity(idx.len())).collect();
    let (Some(&first), Some(&deepest)) = (layers.first(), layers.last()) else { return out };
    let mut done = 0;
    for chunk in idx.chunks(batch.max(1)) {
        let x = batch_tensor::<B::InnerBackend>(ds, chunk, &[], &device);
        // Activations, shallowest layer first.
        let mut acts = vec![inner.features(x, first)];
        for w in layers.windows(2) {
            let next = inner.segment(acts[acts.len() - 1].clone(), w[0], w[1], Norm::Running);
            acts.push(next);
        }
        // Gradients, deepest layer first: from the logits, then through each segment.
        let [n, ..] = acts[0].dims();
        let leaf = Tensor::<B, 4>::from_inner(acts[layers.len() - 1].clone()).require_grad();
        let logits = model.forward_from(leaf.clone(), deepest, Norm::Running); // [n, 2]
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
        let mut grads: Vec<Option<Tensor<B::InnerBackend, 4>>> = vec![None; layers.len()];
        grads[layers.len() - 1] = leaf.grad(&(logits * sel).sum().backward());
        for j in (0..layers.len() - 1).rev() {
            let leaf = Tensor::<B, 4>::from_inner(acts[j].clone()).require_grad();
            grads[j] = match grads[j + 1].clone() {
                Some(deeper) => {
                    let upstream = Tensor::<B, 4>::from_inner(deeper);
                    leaf.grad(&(model.segment(leaf.clone(), layers[j], layers[j + 1], Norm::Running) * upstream).sum().backward())
                }
                None => None,
            };
        }
        let values = |t: Tensor<B::InnerBackend, 4>| t.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
        let per_layer: Vec<(Vec<f32>, Vec<f32>, [usize; 4])> = acts
            .into_iter()
            .zip(grads)
            .map(|(a, g)| {
                let dims = a.dims();
                let g = g.map(values).unwrap_or_else(|| vec![0.0; dims.iter().product()]);
                (values(a), g, dims)
            })
            .collect();
        for i in 0..n {
            for (maps, &(layer, method)) in out.iter_mut().zip(requests) {
                let Ok(at) = layers.binary_search(&layer) else { continue };
                let (av, g, [_, k, h, w]) = &per_layer[at];
                let hw = h * w;
                let cam = combine(method, &av[i * k * hw..(i + 1) * k * hw], &g[i * k * hw..(i + 1) * k * hw], *k, hw);
                let cam: Vec<f32> = cam.into_iter().map(|v| v.max(0.0)).collect();
                let up = resize::bilinear(&scale(&cam), *w, *h, ds.width, ds.height);
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

    /// A batch-norm network is explained as it classifies: with its running statistics, so an
    /// image's heatmap does not depend on which images share its batch, and explaining it
    /// changes nothing in the model.
    #[test]
    fn batch_norm_models_are_explained_with_their_running_statistics() {
        use crate::ml::model::ArchConfig;
        use crate::ml::synthetic::{SyntheticConfig, generate};
        use crate::ml::train::seeded_init;
        use burn::backend::{Autodiff, Flex};
        type Ad = Autodiff<Flex>;

        let dev = Default::default();
        let ds = generate(&SyntheticConfig { count: 6, size: 16, tumor_fraction: 0.5, contrast: 0.6, noise: 0.05, slices_per_patient: 1, seed: 4 });
        let idx: Vec<usize> = (0..ds.samples.len()).collect();
        for arch in [ArchConfig::resnet(1, &[4, 8], 1), ArchConfig::vgg(1, vec![4, 8], true)] {
            let model = crate::ml::model::scramble_batch_norm(seeded_init::<Ad>(&arch, 9, &dev), 2);
            // Every running statistic of every unit.
            let stats = |m: &Classifier<Ad>| -> Vec<u32> {
                let values = |t: Tensor<Ad, 1>| t.into_data().convert::<f32>().to_vec::<f32>().unwrap();
                m.units
                    .iter()
                    .flat_map(|u| [&u.bn1, &u.bn2])
                    .flatten()
                    .flat_map(|bn| [values(bn.running_mean.value()), values(bn.running_var.value())].concat())
                    .map(f32::to_bits)
                    .collect()
            };
            let before = stats(&model);
            for layer in 0..arch.units() {
                let together = heatmaps(&model, &ds, &idx, layer, CamMethod::GradCamPlusPlus, CamTarget::Predicted, 6);
                let one_by_one = heatmaps(&model, &ds, &idx, layer, CamMethod::GradCamPlusPlus, CamTarget::Predicted, 1);
                for (a, b) in together.iter().flatten().zip(one_by_one.iter().flatten()) {
                    assert!((a - b).abs() < 1e-5, "{} layer {layer}: a heatmap depends on its batch ({a} vs {b})", arch.name);
                }
            }
            assert_eq!(stats(&model), before, "{}: explaining the model changed its running statistics", arch.name);
        }
    }

    /// What a shared pass gives each (layer, method) request is, bit for bit, what that
    /// layer and method give alone: the invariant behind fusing a `gradcam` sweep over methods
    /// and layers (`stages::gradcam`). Every architecture (resnet: gradients through residual
    /// units), all layers at once and a subset, requests out of order, both targets, and a
    /// batch size that leaves a partial batch.
    #[test]
    fn requests_from_one_pass_equal_each_layer_and_method_alone() {
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
            // Batch norm with drawn statistics, scale and shift (a fresh model's hide mistakes).
            let model = crate::ml::model::scramble_batch_norm(seeded_init::<Ad>(&arch, 5, &dev), 8);
            let units = arch.units();
            // Every layer, deepest first; and every other layer from the top.
            let all: Vec<usize> = (0..units).rev().collect();
            let some: Vec<usize> = (0..units).rev().step_by(2).collect();
            for layers in [all, some] {
                let requests: Vec<(usize, CamMethod)> = layers.iter().flat_map(|&l| methods.iter().map(move |&m| (l, m))).collect();
                for target in [CamTarget::Class(1), CamTarget::Predicted] {
                    let shared = heatmaps_for(&model, &ds, &idx, &requests, target, 4, &mut |_, _| {});
                    assert_eq!(shared.len(), requests.len());
                    for (&(layer, m), maps) in requests.iter().zip(&shared) {
                        let alone = heatmaps(&model, &ds, &idx, layer, m, target, 4);
                        assert_eq!(maps.len(), ds.samples.len());
                        assert!(bits(maps) == bits(&alone), "{} layer {layer} {target:?} {m:?}: the shared pass differs", arch.name);
                    }
                    // The methods and layers really differ, or the comparison above proves little
                    // (HiResCAM equals Grad-CAM at a layer followed by global pooling).
                    assert!(bits(&shared[0]) != bits(&shared[1]), "{}: Grad-CAM equals Grad-CAM++", arch.name);
                    if layers.len() > 1 {
                        // Grad-CAM++ (its weights are never negative, so its maps are not all 0).
                        assert!(bits(&shared[1]) != bits(&shared[4]), "{}: two layers give the same heatmaps", arch.name);
                    }
                }
            }
        }
    }
}
