//! CNN classifiers: `vgg-small` (the reference architecture), a configurable `vgg`, and a
//! small `resnet`. All are a stack of conv *units* followed by global average pooling and one
//! linear layer to two logits, so Grad-CAM can cut any of them after any unit.
//!
//! A unit is conv3x3 [+BN] + ReLU (vgg) or a basic residual block (resnet), optionally
//! followed by a 2x2 max pool. Its "activation" for Grad-CAM is the post-ReLU map *before*
//! the pool (the last conv's ReLU output for the default layer).

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::Tensor;
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use super::fast_ops::FastOps;

/// What to build; goes into `config.json` beside the weights and into cache keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchConfig {
    /// `vgg-small`, `vgg` or `resnet`.
    pub name: String,
    pub in_channels: usize,
    /// Output channels of each unit.
    pub widths: Vec<usize>,
    /// Max-pool after unit i.
    pub pool_after: Vec<bool>,
    pub batch_norm: bool,
    pub residual: bool,
}

impl ArchConfig {
    /// conv3x3(C->16) pool, conv(16->32) pool, conv(32->64) pool, conv(64->64), GAP, fc(64->2).
    pub fn vgg_small(in_channels: usize) -> Self {
        ArchConfig {
            name: "vgg-small".into(),
            in_channels,
            widths: vec![16, 32, 64, 64],
            pool_after: vec![true, true, true, false],
            batch_norm: false,
            residual: false,
        }
    }

    /// A VGG of any widths; pools after every unit but the last.
    pub fn vgg(in_channels: usize, widths: Vec<usize>, batch_norm: bool) -> Self {
        let n = widths.len();
        ArchConfig { name: "vgg".into(), in_channels, pool_after: (0..n).map(|i| i + 1 < n).collect(), widths, batch_norm, residual: false }
    }

    /// A ResNet: a stem conv, then `blocks` basic blocks per stage with a pool between stages.
    pub fn resnet(in_channels: usize, stage_widths: &[usize], blocks: usize) -> Self {
        let mut widths = vec![stage_widths.first().copied().unwrap_or(16)];
        let mut pool_after = vec![false];
        for (s, &w) in stage_widths.iter().enumerate() {
            for b in 0..blocks.max(1) {
                widths.push(w);
                pool_after.push(b + 1 == blocks.max(1) && s + 1 < stage_widths.len());
            }
        }
        ArchConfig { name: "resnet".into(), in_channels, widths, pool_after, batch_norm: true, residual: true }
    }

    pub fn units(&self) -> usize {
        self.widths.len()
    }

    /// The smallest square input every unit gets at least one pixel of: each 2x2 max pool
    /// halves the side (rounding down), so `pools` of them need a side of `2^pools`.
    pub fn min_input_size(&self) -> usize {
        1usize.checked_shl(self.pools() as u32).unwrap_or(usize::MAX)
    }

    /// How many 2x2 max pools the units apply.
    fn pools(&self) -> usize {
        self.pool_after.iter().filter(|&&p| p).count()
    }

    /// Why images of `height` x `width` are too small for this architecture, if they are.
    pub fn input_too_small(&self, height: usize, width: usize) -> Option<String> {
        let need = self.min_input_size();
        (height.min(width) < need).then(|| {
            format!(
                "`{}` with {} conv units halves the image {} time(s) (2x2 max pools): it needs images of at least {need}x{need}, \
                 and these are {height}x{width}",
                self.name,
                self.units(),
                self.pools()
            )
        })
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> Classifier<B> {
        let mut units = Vec::new();
        let mut cin = self.in_channels;
        for (i, &w) in self.widths.iter().enumerate() {
            // The resnet stem (unit 0) is a plain conv; later units are residual blocks.
            let residual = self.residual && i > 0;
            let conv =
                |a: usize, b: usize| Conv2dConfig::new([a, b], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(device);
            let bn = |c: usize| if self.batch_norm { Some(BatchNormConfig::new(c).init(device)) } else { None };
            units.push(Unit {
                conv1: conv(cin, w),
                bn1: bn(w),
                conv2: if residual { Some(conv(w, w)) } else { None },
                bn2: if residual { bn(w) } else { None },
                shortcut: if residual && cin != w { Some(Conv2dConfig::new([cin, w], [1, 1]).with_bias(false).init(device)) } else { None },
                residual,
                pool_after: self.pool_after.get(i).copied().unwrap_or(false),
            });
            cin = w;
        }
        Classifier { units, fc: LinearConfig::new(cin, 2).init(device) }
    }
}

#[derive(Module, Debug)]
pub struct Unit<B: Backend> {
    pub conv1: Conv2d<B>,
    pub bn1: Option<BatchNorm<B>>,
    pub conv2: Option<Conv2d<B>>,
    pub bn2: Option<BatchNorm<B>>,
    pub shortcut: Option<Conv2d<B>>,
    #[module(skip)]
    pub residual: bool,
    #[module(skip)]
    pub pool_after: bool,
}

/// A 3x3 conv with bias [+ ReLU] through [`FastOps`]; other convs through burn.
fn conv<B: FastOps>(c: &Conv2d<B>, x: Tensor<B, 4>, with_relu: bool) -> Tensor<B, 4> {
    let same_3x3 = c.kernel_size == [3, 3]
        && c.stride == [1, 1]
        && c.dilation == [1, 1]
        && c.groups == 1
        && matches!(c.padding, PaddingConfig2d::Explicit(1, 1, 1, 1));
    match &c.bias {
        Some(bias) if same_3x3 => B::conv3x3(x, c.weight.val(), bias.val(), with_relu),
        _ => {
            let y = c.forward(x);
            if with_relu { relu(y) } else { y }
        }
    }
}

/// Which statistics batch norm normalises with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// As burn does: with autodiff (training) the batch's own, updating the running
    /// statistics; without autodiff the running ones.
    Auto,
    /// The running statistics, with autodiff too: the trained network as it classifies, so
    /// that Grad-CAM's gradients are those of the network whose activations it weighs (and do
    /// not depend on which images share a batch), and nothing is updated.
    Running,
}

/// burn's `BatchNorm::forward` with the training-mode statistics through [`FastOps`] (their
/// sums are reductions that must not depend on the CPU). Without autodiff, or with
/// [`Norm::Running`], burn's inference path: elementwise with the running statistics, exact on
/// any CPU.
fn batch_norm<B: FastOps>(bn: &BatchNorm<B>, x: Tensor<B, 4>, norm: Norm) -> Tensor<B, 4> {
    if !B::ad_enabled(&x.device()) {
        return bn.forward(x);
    }
    if norm == Norm::Running {
        return batch_norm_running(bn, x);
    }
    let (y, mean, var) = B::batch_norm_train(x, bn.gamma.val(), bn.beta.val(), bn.epsilon);
    update_running(&bn.running_mean, mean, bn.momentum);
    update_running(&bn.running_var, var, bn.momentum);
    y
}

/// burn's `BatchNorm` inference path (`forward_inference`, private there), op for op, so that
/// on an autodiff backend it gives the bits the inner backend's `forward` gives.
fn batch_norm_running<B: Backend>(bn: &BatchNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let shape = [1, x.dims()[1], 1, 1];
    // `value_sync`: the statistics as the last training update left them (`value` may be one
    // update behind in the thread that did not make it; `valid()` syncs the same way).
    let mean = bn.running_mean.value_sync().to_device(&x.device()).reshape(shape);
    let var = bn.running_var.value_sync().to_device(&x.device()).reshape(shape);
    let std = var.add_scalar(bn.epsilon).sqrt();
    x.sub(mean).div(std).mul(bn.gamma.val().reshape(shape)).add(bn.beta.val().reshape(shape))
}

/// burn's `BatchNorm` update of a running statistic from a batch's, element-wise (so a stacked
/// model's members each get the update they would get alone).
pub(super) fn update_running<B: Backend>(state: &burn::module::RunningState<Tensor<B, 1>>, batch: Tensor<B, 1>, momentum: f64) {
    state.update(state.value_sync().mul_scalar(1.0 - momentum).add(batch.mul_scalar(momentum)).detach());
}

/// A 1x1 conv without bias through [`FastOps`]; any other through burn.
fn shortcut<B: FastOps>(c: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let plain_1x1 = c.kernel_size == [1, 1] && c.stride == [1, 1] && c.dilation == [1, 1] && c.groups == 1 && c.bias.is_none();
    let no_padding = matches!(c.padding, PaddingConfig2d::Valid | PaddingConfig2d::Explicit(0, 0, 0, 0));
    if plain_1x1 && no_padding { B::conv1x1(x, c.weight.val()) } else { c.forward(x) }
}

impl<B: FastOps> Unit<B> {
    /// # Shapes
    /// [N, Cin, H, W] -> [N, Cout, H, W] (post-ReLU, before any pool)
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.forward_with(x, Norm::Auto)
    }

    /// [`Unit::forward`] with batch norm's statistics chosen.
    pub fn forward_with(&self, x: Tensor<B, 4>, norm: Norm) -> Tensor<B, 4> {
        // Without batch norm the ReLU fuses into the conv.
        let mut y = conv(&self.conv1, x.clone(), self.bn1.is_none());
        if let Some(bn) = &self.bn1 {
            y = relu(batch_norm(bn, y, norm));
        }
        if !self.residual {
            return y;
        }
        if let Some(c2) = &self.conv2 {
            y = conv(c2, y, false);
        }
        if let Some(bn) = &self.bn2 {
            y = batch_norm(bn, y, norm);
        }
        let skip = match &self.shortcut {
            Some(s) => shortcut(s, x),
            None => x,
        };
        relu(y + skip)
    }
}

#[derive(Module, Debug)]
pub struct Classifier<B: Backend> {
    pub units: Vec<Unit<B>>,
    pub fc: Linear<B>,
}

impl<B: FastOps> Classifier<B> {
    /// # Shapes
    /// [N, C, H, W] -> [N, 2] logits
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let last = self.units.len() - 1;
        let a = self.features(x, last);
        self.forward_from(a, last, Norm::Auto)
    }

    /// Activations of unit `layer` (post-ReLU, pre-pool; `layer` < the number of units).
    /// # Shapes
    /// [N, C, H, W] -> [N, K, h, w]
    pub fn features(&self, x: Tensor<B, 4>, layer: usize) -> Tensor<B, 4> {
        self.segment(self.units[0].forward(x), 0, layer, Norm::Auto)
    }

    /// Runs units `from + 1 ..= to` (`from <= to`) on the activations of unit `from` (its
    /// pooling first): `segment(features(x, from), from, to, Norm::Auto)` is `features(x, to)`,
    /// op for op; without autodiff, whatever `norm`.
    /// # Shapes
    /// [N, K, h, w] -> [N, K', h', w']
    pub fn segment(&self, mut x: Tensor<B, 4>, from: usize, to: usize, norm: Norm) -> Tensor<B, 4> {
        debug_assert!(from <= to, "segment from unit {from} back to unit {to}");
        for i in from..to {
            if self.units[i].pool_after {
                x = B::max_pool2x2(x);
            }
            x = self.units[i + 1].forward_with(x, norm);
        }
        x
    }

    /// Runs the rest of the network from the activations of unit `layer`.
    /// # Shapes
    /// [N, K, h, w] -> [N, 2]
    pub fn forward_from(&self, x: Tensor<B, 4>, layer: usize, norm: Norm) -> Tensor<B, 2> {
        let last = self.units.len() - 1;
        let mut x = self.segment(x, layer, last, norm);
        if self.units[last].pool_after {
            x = B::max_pool2x2(x);
        }
        // Global average pooling + the linear layer in one op, whose sums run in a fixed order.
        let bias = match &self.fc.bias {
            Some(b) => b.val(),
            None => Tensor::zeros([self.fc.weight.dims()[1]], &x.device()),
        };
        B::gap_linear(x, self.fc.weight.val(), bias) // [N, 2]
    }
}

/// `model` with every batch norm's scale, shift and running statistics drawn at random (a
/// fresh model has 1, 0, 0 and 1, under which a wrong or missing term goes unseen).
#[cfg(test)]
pub(crate) fn scramble_batch_norm<B: Backend>(mut model: Classifier<B>, seed: u64) -> Classifier<B> {
    let mut rng = super::rng::Rng::new(seed);
    for unit in &mut model.units {
        for bn in [&mut unit.bn1, &mut unit.bn2].into_iter().flatten() {
            let device = bn.gamma.val().device();
            let c = bn.gamma.val().dims()[0];
            let mut draw = |lo: f32, hi: f32| {
                let v: Vec<f32> = (0..c).map(|_| lo + (hi - lo) * rng.uniform()).collect();
                Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(v, [c]), &device)
            };
            bn.gamma = burn::module::Param::from_tensor(draw(0.5, 1.5));
            bn.beta = burn::module::Param::from_tensor(draw(-0.5, 0.5));
            bn.running_mean = burn::module::RunningState::new(draw(-0.5, 0.5));
            bn.running_var = burn::module::RunningState::new(draw(0.5, 2.0));
        }
    }
    model
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::module::AutodiffModule;
    use burn::tensor::TensorData;

    /// Each 2x2 pool halves the side: the smallest input is 2^pools, and the message names it.
    #[test]
    fn the_smallest_input_doubles_with_each_pool() {
        assert_eq!(ArchConfig::vgg_small(1).min_input_size(), 8);
        assert_eq!(ArchConfig::vgg(1, vec![4; 5], false).min_input_size(), 16);
        // A stem, then two blocks per stage and a pool between the three stages.
        assert_eq!(ArchConfig::resnet(1, &[16, 32, 64], 2).min_input_size(), 4);
        assert_eq!(ArchConfig::vgg_small(1).input_too_small(8, 8), None);
        let why = ArchConfig::vgg(1, vec![4; 5], false).input_too_small(16, 12).expect("12 < 16");
        assert!(why.contains("halves the image 4 time(s)") && why.contains("at least 16x16") && why.contains("16x12"), "{why}");
    }

    fn bits<const D: usize>(t: Tensor<Flex, D>) -> Vec<u32> {
        t.into_data().convert::<f32>().to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    /// `Norm::Running` on an autodiff backend computes burn's inference path bit for bit (the
    /// activations the inner backend gives), not the training formula, and its gradient is
    /// the affine map's: d/dx = gamma / sqrt(var + eps).
    #[test]
    fn running_batch_norm_with_autodiff_is_the_inference_path() {
        type Ad = Autodiff<Flex>;
        let dev = Default::default();
        let arch = ArchConfig::resnet(1, &[4, 8], 1);
        let model = scramble_batch_norm(crate::ml::train::seeded_init::<Ad>(&arch, 3, &dev), 11);
        let inner = model.valid();
        let mut rng = crate::ml::rng::Rng::new(5);
        let x: Vec<f32> = (0..3 * 16 * 16).map(|_| rng.normal()).collect();
        let a0 = inner.features(Tensor::<Flex, 4>::from_data(TensorData::new(x, [3, 1, 16, 16]), &dev), 0);
        for to in 1..arch.units() {
            let running = model.segment(Tensor::<Ad, 4>::from_inner(a0.clone()), 0, to, Norm::Running).inner();
            assert!(bits(running) == bits(inner.segment(a0.clone(), 0, to, Norm::Auto)), "unit {to}: not the inference path");
        }
        // Training mode differs (it normalises with the batch's statistics), so the check above
        // can tell them apart. Last: it updates the model's running statistics.
        let last = arch.units() - 1;
        let training = model.segment(Tensor::<Ad, 4>::from_inner(a0.clone()), 0, last, Norm::Auto).inner();
        assert!(bits(training) != bits(inner.segment(a0.clone(), 0, last, Norm::Auto)), "batch statistics equal the running ones");
        // The gradient through one batch norm.
        let bn = model.units[2].bn1.as_ref().expect("batch norm"); // 8 channels
        let xs: Vec<f32> = (0..2 * 8 * 9).map(|_| rng.normal()).collect();
        let up: Vec<f32> = (0..2 * 8 * 9).map(|_| rng.normal()).collect();
        let leaf = Tensor::<Ad, 4>::from_data(TensorData::new(xs, [2, 8, 3, 3]), &dev).require_grad();
        let upstream = Tensor::<Ad, 4>::from_data(TensorData::new(up.clone(), [2, 8, 3, 3]), &dev);
        let grads = (batch_norm_running(bn, leaf.clone()) * upstream).sum().backward();
        let g = leaf.grad(&grads).expect("a gradient").into_data().convert::<f32>().to_vec::<f32>().unwrap();
        let value = |t: Tensor<Flex, 1>| t.into_data().convert::<f32>().to_vec::<f32>().unwrap();
        let (gamma, var) = (value(bn.gamma.val().inner()), value(bn.running_var.value().inner()));
        for (i, (gi, ui)) in g.iter().zip(&up).enumerate() {
            let c = (i / 9) % 8;
            let want = gamma[c] / (var[c] + bn.epsilon as f32).sqrt() * ui;
            assert!((gi - want).abs() <= 1e-5 * want.abs().max(1.0), "element {i}: {gi} vs {want}");
        }
    }

    #[test]
    fn vgg_small_shapes() {
        let dev = Default::default();
        let m = crate::ml::train::seeded_init::<Flex>(&ArchConfig::vgg_small(1), 1, &dev);
        let x = Tensor::<Flex, 4>::zeros([2, 1, 32, 32], &dev);
        assert_eq!(m.features(x.clone(), 3).dims(), [2, 64, 4, 4]);
        assert_eq!(m.forward(x).dims(), [2, 2]);
        let r = crate::ml::train::seeded_init::<Flex>(&ArchConfig::resnet(3, &[8, 16], 1), 1, &dev);
        assert_eq!(r.forward(Tensor::<Flex, 4>::zeros([1, 3, 16, 16], &dev)).dims(), [1, 2]);
    }
}
