//! Device-memory estimates of a training or a Grad-CAM run, from the architecture, the input
//! size and the batch size: what the executor needs to pack several instances on one GPU
//! without running it out of memory.
//!
//! What is counted (f32 values, 4 bytes each):
//! - parameters, and for training their gradients and the optimizer's state (Adam and AdamW
//!   keep two moments per parameter, SGD with momentum one);
//! - activations: every tensor the forward pass of one batch keeps for the backward pass, as
//!   burn's generic (GPU) path computes it: a conv's output and its ReLU as two tensors, a batch
//!   norm as the five elementwise tensors of its training formula, a pool's output and its
//!   indices, a residual block's sum. Training counts them twice (their gradients exist at the
//!   same time at worst), and so does Grad-CAM (a shared pass keeps every explained unit's
//!   activations and gradients; one alone, its unit's and the graph after it);
//! - the largest convolution's im2col workspace (what a GEMM-based conv kernel allocates).
//!
//! The sum is multiplied by [`MARGIN`] and [`FIXED_BYTES`] is added, for what is not counted:
//! the memory pools' rounding to pages, autotuning's trial buffers, the input batch and its
//! staging copy, small tensors (loss, targets, statistics). The estimate is meant to be an upper
//! bound for packing, not a measurement; its parts are checked against the real model in tests
//! (the parameter count exactly, the activation shapes unit by unit).

use super::model::ArchConfig;

const BYTES: u64 = 4;

/// Headroom over the counted bytes: 50%.
pub const MARGIN: f64 = 1.5;

/// Added to every estimate: 64 MiB.
pub const FIXED_BYTES: u64 = 64 << 20;

/// What runs on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Training with an optimizer keeping `optimizer_states` values per parameter.
    Training { optimizer_states: u64 },
    /// Grad-CAM heatmaps (inference and the gradients of the explained units' activations).
    GradCam,
}

/// An estimate and its parts, in bytes (`parameters` is a count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    pub parameters: u64,
    pub parameter_bytes: u64,
    pub gradient_bytes: u64,
    pub optimizer_bytes: u64,
    pub activation_bytes: u64,
    pub workspace_bytes: u64,
    /// (sum of the parts) x [`MARGIN`] + [`FIXED_BYTES`].
    pub total: u64,
}

/// The number of trainable parameters: weights and biases, batch norm's gamma and beta. burn's
/// `Module::num_params` also counts batch norm's running statistics ([`running_statistics`]),
/// which take memory but no gradient or optimizer state.
pub fn parameter_count(arch: &ArchConfig) -> u64 {
    let mut n = 0u64;
    let mut cin = arch.in_channels as u64;
    for (i, &w) in arch.widths.iter().enumerate() {
        let w = w as u64;
        let residual = arch.residual && i > 0;
        let bn = if arch.batch_norm { 2 * w } else { 0 };
        n += cin * w * 9 + w + bn;
        if residual {
            n += w * w * 9 + w + bn;
            if cin != w {
                n += cin * w;
            }
        }
        cin = w;
    }
    n + cin * 2 + 2
}

/// Batch norm's running mean and variance: on the device, not trained.
pub fn running_statistics(arch: &ArchConfig) -> u64 {
    if !arch.batch_norm {
        return 0;
    }
    arch.widths.iter().enumerate().map(|(i, &w)| if arch.residual && i > 0 { 4 * w as u64 } else { 2 * w as u64 }).sum()
}

/// `[channels, height, width]` of each unit's output (post-ReLU, before its pool) for a square
/// input of `image_size`: the shapes `Classifier::features` gives.
pub fn unit_shapes(arch: &ArchConfig, image_size: usize) -> Vec<[usize; 3]> {
    let mut s = image_size;
    let mut out = Vec::with_capacity(arch.widths.len());
    for (i, &w) in arch.widths.iter().enumerate() {
        out.push([w, s, s]);
        if arch.pool_after.get(i).copied().unwrap_or(false) {
            s /= 2;
        }
    }
    out
}

/// Values per image that a forward pass keeps (see the module's list), and the largest
/// im2col workspace per image.
fn forward_values(arch: &ArchConfig, image_size: usize) -> (u64, u64) {
    let mut kept = (arch.in_channels * image_size * image_size) as u64;
    let mut workspace = 0u64;
    let mut cin = arch.in_channels as u64;
    for (i, [w, h, _]) in unit_shapes(arch, image_size).into_iter().enumerate() {
        let (w, plane) = (w as u64, (h * h) as u64);
        let map = w * plane;
        let residual = arch.residual && i > 0;
        // conv + ReLU (or conv + batch norm + ReLU).
        kept += if arch.batch_norm { map * 7 } else { map * 2 };
        workspace = workspace.max(cin * 9 * plane);
        if residual {
            // conv2 + batch norm, the shortcut, the sum and its ReLU.
            kept += map * 6 + map * 2 + if cin != w { map } else { 0 };
            workspace = workspace.max(w * 9 * plane);
        }
        if arch.pool_after.get(i).copied().unwrap_or(false) {
            // The pooled map and the index of each window's maximum.
            kept += 2 * map / 4;
        }
        cin = w;
    }
    (kept, workspace)
}

/// The device memory of one run of `workload` at this input size and batch size.
pub fn estimate(arch: &ArchConfig, image_size: usize, batch_size: usize, workload: Workload) -> MemoryEstimate {
    let parameters = parameter_count(arch);
    let parameter_bytes = (parameters + running_statistics(arch)) * BYTES;
    let (kept, workspace) = forward_values(arch, image_size);
    let batch = batch_size.max(1) as u64;
    let (gradient_bytes, optimizer_bytes, activation_copies) = match workload {
        Workload::Training { optimizer_states } => (parameters * BYTES, parameters * optimizer_states * BYTES, 2),
        // Twice too: a shared pass (`ml::gradcam::heatmaps_for`) keeps each requested layer's
        // activations and their gradients, and one alone its unit's and the graph after it.
        Workload::GradCam => (0, 0, 2),
    };
    let activation_bytes = kept * batch * BYTES * activation_copies;
    let workspace_bytes = workspace * batch * BYTES;
    let counted = parameter_bytes + gradient_bytes + optimizer_bytes + activation_bytes + workspace_bytes;
    let total = (counted as f64 * MARGIN).ceil() as u64 + FIXED_BYTES;
    MemoryEstimate { parameters, parameter_bytes, gradient_bytes, optimizer_bytes, activation_bytes, workspace_bytes, total }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::module::Module;
    use burn::tensor::Tensor;

    fn archs() -> Vec<ArchConfig> {
        vec![
            ArchConfig::vgg_small(1),
            ArchConfig::vgg_small(3),
            ArchConfig::vgg(3, vec![8, 16, 24], true),
            ArchConfig::vgg(1, vec![5], false),
            ArchConfig::resnet(1, &[8, 16], 1),
            ArchConfig::resnet(3, &[4, 8, 8], 2),
        ]
    }

    #[test]
    fn the_parameter_count_is_the_real_models() {
        let dev = Default::default();
        for arch in archs() {
            let model = crate::ml::train::seeded_init::<Flex>(&arch, 1, &dev);
            assert_eq!(parameter_count(&arch) + running_statistics(&arch), model.num_params() as u64, "{arch:?}");
        }
        // vgg-small on grayscale: 160 + 4640 + 18496 + 36928 + 130.
        assert_eq!(parameter_count(&ArchConfig::vgg_small(1)), 60_354);
        assert_eq!(running_statistics(&ArchConfig::vgg_small(1)), 0);
        // The resnet (widths 8, 8, 16) keeps 2 running values per channel of each batch norm.
        assert_eq!(running_statistics(&ArchConfig::resnet(1, &[8, 16], 1)), 2 * 8 + 4 * 8 + 4 * 16);
    }

    #[test]
    fn unit_shapes_are_the_real_models() {
        let dev = Default::default();
        for arch in archs() {
            let model = crate::ml::train::seeded_init::<Flex>(&arch, 1, &dev);
            for size in [16, 32] {
                let x = Tensor::<Flex, 4>::zeros([2, arch.in_channels, size, size], &dev);
                for (layer, [c, h, w]) in unit_shapes(&arch, size).into_iter().enumerate() {
                    assert_eq!(model.features(x.clone(), layer).dims(), [2, c, h, w], "{arch:?} at {size}, unit {layer}");
                }
            }
        }
    }

    #[test]
    fn the_estimate_adds_its_parts_with_the_stated_margin() {
        let arch = ArchConfig::vgg_small(1);
        let e = estimate(&arch, 64, 32, Workload::Training { optimizer_states: 2 });
        assert_eq!(e.parameter_bytes, 60_354 * 4);
        assert_eq!(e.gradient_bytes, 60_354 * 4);
        assert_eq!(e.optimizer_bytes, 2 * 60_354 * 4);
        let counted = e.parameter_bytes + e.gradient_bytes + e.optimizer_bytes + e.activation_bytes + e.workspace_bytes;
        assert_eq!(e.total, (counted as f64 * MARGIN).ceil() as u64 + FIXED_BYTES);
        // The input (4096) and the first conv's output and ReLU (16 x 4096 x 2) alone are kept
        // per image, twice (with their gradients), for 32 images.
        assert!(e.activation_bytes >= (4096 + 2 * 16 * 4096) * 32 * 4 * 2);
        // Grad-CAM keeps no parameter gradients or optimizer state; activations and their
        // gradients (of every layer a shared pass explains) as training does.
        let g = estimate(&arch, 64, 32, Workload::GradCam);
        assert_eq!((g.gradient_bytes, g.optimizer_bytes), (0, 0));
        assert_eq!(g.activation_bytes, e.activation_bytes);
        assert!(g.total < e.total);
    }

    #[test]
    fn the_estimate_grows_with_batch_size_image_size_and_width() {
        let t = Workload::Training { optimizer_states: 2 };
        let small = estimate(&ArchConfig::vgg_small(1), 64, 32, t).total;
        assert!(estimate(&ArchConfig::vgg_small(1), 64, 64, t).total > small);
        assert!(estimate(&ArchConfig::vgg_small(1), 128, 32, t).total > small);
        assert!(estimate(&ArchConfig::vgg(1, vec![32, 64, 128, 128], false), 64, 32, t).total > small);
        // Activations scale with pixels: 4x the pixels, about 4x the activation bytes.
        let a64 = estimate(&ArchConfig::vgg_small(1), 64, 32, t).activation_bytes;
        let a128 = estimate(&ArchConfig::vgg_small(1), 128, 32, t).activation_bytes;
        assert_eq!(a128, 4 * a64);
    }
}
