//! K classifiers of one architecture as one model: every parameter of the K members is stacked
//! along its first axis, and a forward pass takes the K members' batches stacked along the
//! batch axis (layout: `super::stacked_ops`). One forward pass, one autodiff graph, one backward
//! pass and one optimizer step then train all K: this is HFTA's horizontally fused model.
//!
//! Members never mix: every stacked layer acts on each member's rows with that member's
//! parameters, batch-norm statistics are per member, and the K losses are summed, so a
//! member's gradient is the gradient of its own loss. Element-wise optimizers (Adam, AdamW,
//! SGD with momentum) then give each member the update it would get alone.

use burn::module::{Module, Param, RunningState};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;

use super::model::{ArchConfig, Classifier, Unit, update_running};
use super::stacked_ops::StackedOps;

/// A stacked convolution: weight [K*Co, Cin, kh, kw], bias [K*Co] when the members have one.
#[derive(Module, Debug)]
pub struct StackedConv<B: Backend> {
    pub weight: Param<Tensor<B, 4>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
}

/// Stacked batch norm: every vector [K*C].
#[derive(Module, Debug)]
pub struct StackedNorm<B: Backend> {
    pub gamma: Param<Tensor<B, 1>>,
    pub beta: Param<Tensor<B, 1>>,
    pub running_mean: RunningState<Tensor<B, 1>>,
    pub running_var: RunningState<Tensor<B, 1>>,
    #[module(skip)]
    pub momentum: f64,
    #[module(skip)]
    pub epsilon: f64,
}

#[derive(Module, Debug)]
pub struct StackedUnit<B: Backend> {
    pub conv1: StackedConv<B>,
    pub bn1: Option<StackedNorm<B>>,
    pub conv2: Option<StackedConv<B>>,
    pub bn2: Option<StackedNorm<B>>,
    pub shortcut: Option<StackedConv<B>>,
    #[module(skip)]
    pub residual: bool,
    #[module(skip)]
    pub pool_after: bool,
}

#[derive(Module, Debug)]
pub struct StackedClassifier<B: Backend> {
    pub units: Vec<StackedUnit<B>>,
    /// [K*Kin, O]
    pub fc_weight: Param<Tensor<B, 2>>,
    /// [K*O]
    pub fc_bias: Param<Tensor<B, 1>>,
    #[module(skip)]
    pub members: usize,
}

/// Why a set of models cannot be stacked.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StackError {
    #[error("no models to stack")]
    Empty,
    #[error("member {0} differs in architecture from member 0")]
    Mismatch(usize),
    #[error("a layer has no stacked version ({0}); members train alone")]
    Unsupported(&'static str),
}

/// A parameter made of the members' values, stacked along the first axis: a fresh leaf (it
/// requires gradients on an autodiff backend, as a model's own parameters do).
fn stacked_param<B: Backend, const D: usize>(parts: Vec<Tensor<B, D>>) -> Param<Tensor<B, D>> {
    Param::from_tensor(Tensor::cat(parts, 0).detach())
}

fn stack_conv<B: Backend>(convs: &[&Conv2d<B>], kernel: usize) -> Result<StackedConv<B>, StackError> {
    let padding = if kernel == 3 { PaddingConfig2d::Explicit(1, 1, 1, 1) } else { PaddingConfig2d::Explicit(0, 0, 0, 0) };
    for c in convs {
        let padding_ok = c.padding == padding || (kernel == 1 && c.padding == PaddingConfig2d::Valid);
        if c.kernel_size != [kernel, kernel] || c.stride != [1, 1] || c.dilation != [1, 1] || c.groups != 1 || !padding_ok {
            return Err(StackError::Unsupported("a convolution other than 3x3 same or 1x1"));
        }
        if (kernel == 3) != c.bias.is_some() {
            return Err(StackError::Unsupported("a 3x3 convolution without bias or a 1x1 with one"));
        }
    }
    Ok(StackedConv {
        weight: stacked_param(convs.iter().map(|c| c.weight.val()).collect()),
        bias: (kernel == 3).then(|| stacked_param(convs.iter().filter_map(|c| c.bias.as_ref().map(Param::val)).collect())),
    })
}

fn stack_norm<B: Backend>(norms: &[&burn::nn::BatchNorm<B>]) -> StackedNorm<B> {
    StackedNorm {
        gamma: stacked_param(norms.iter().map(|n| n.gamma.val()).collect()),
        beta: stacked_param(norms.iter().map(|n| n.beta.val()).collect()),
        running_mean: RunningState::new(Tensor::cat(norms.iter().map(|n| n.running_mean.value_sync()).collect(), 0)),
        running_var: RunningState::new(Tensor::cat(norms.iter().map(|n| n.running_var.value_sync()).collect(), 0)),
        momentum: norms[0].momentum,
        epsilon: norms[0].epsilon,
    }
}

/// `Some(f(each))` when every member has the part, `None` when none has it.
fn all_or_none<'a, T: 'a, U>(
    parts: Vec<Option<&'a T>>,
    f: impl FnOnce(&[&'a T]) -> Result<U, StackError>,
) -> Result<Option<U>, StackError> {
    match parts.iter().filter(|p| p.is_some()).count() {
        0 => Ok(None),
        n if n == parts.len() => f(&parts.into_iter().flatten().collect::<Vec<_>>()).map(Some),
        _ => Err(StackError::Unsupported("members differ in their layers")),
    }
}

impl<B: Backend> StackedClassifier<B> {
    /// Stacks `models` (all of `arch`), member m at rows m of every parameter.
    pub fn stack(arch: &ArchConfig, models: &[Classifier<B>]) -> Result<Self, StackError> {
        let first = models.first().ok_or(StackError::Empty)?;
        // Equal depth and equal parameter shapes, unit by unit and in the head.
        let shapes = |c: &Classifier<B>| -> Vec<Vec<usize>> {
            let mut v: Vec<Vec<usize>> = c.units.iter().map(|u| u.conv1.weight.dims().to_vec()).collect();
            v.extend(c.units.iter().filter_map(|u| u.conv2.as_ref().map(|c| c.weight.dims().to_vec())));
            v.push(c.fc.weight.dims().to_vec());
            v
        };
        for (m, model) in models.iter().enumerate() {
            if model.units.len() != arch.units() || shapes(model) != shapes(first) {
                return Err(StackError::Mismatch(m));
            }
        }
        let mut units = Vec::with_capacity(first.units.len());
        for (i, u) in first.units.iter().enumerate() {
            let of = |f: &dyn Fn(&Unit<B>) -> Option<&Conv2d<B>>| models.iter().map(|m| f(&m.units[i])).collect::<Vec<_>>();
            let norms = |f: &dyn Fn(&Unit<B>) -> Option<&burn::nn::BatchNorm<B>>| models.iter().map(|m| f(&m.units[i])).collect::<Vec<_>>();
            units.push(StackedUnit {
                conv1: stack_conv(&models.iter().map(|m| &m.units[i].conv1).collect::<Vec<_>>(), 3)?,
                bn1: all_or_none(norms(&|u| u.bn1.as_ref()), |n| Ok(stack_norm(n)))?,
                conv2: all_or_none(of(&|u| u.conv2.as_ref()), |c| stack_conv(c, 3))?,
                bn2: all_or_none(norms(&|u| u.bn2.as_ref()), |n| Ok(stack_norm(n)))?,
                shortcut: all_or_none(of(&|u| u.shortcut.as_ref()), |c| stack_conv(c, 1))?,
                residual: u.residual,
                pool_after: u.pool_after,
            });
        }
        let device = first.fc.weight.val().device();
        let bias = |m: &Classifier<B>| match &m.fc.bias {
            Some(b) => b.val(),
            None => Tensor::zeros([m.fc.weight.dims()[1]], &device),
        };
        Ok(StackedClassifier {
            units,
            fc_weight: stacked_param(models.iter().map(|m| m.fc.weight.val()).collect()),
            fc_bias: stacked_param(models.iter().map(bias).collect()),
            members: models.len(),
        })
    }

    /// Member `m`, written into `template` (a model of the same architecture, e.g. that member's
    /// initial one) in place of its parameters and running statistics.
    pub fn member(&self, m: usize, mut template: Classifier<B>) -> Classifier<B> {
        let k = self.members;
        fn rows<B: Backend, const D: usize>(t: Tensor<B, D>, k: usize, m: usize) -> Tensor<B, D> {
            let n = t.dims()[0] / k;
            t.narrow(0, m * n, n)
        }
        let put_conv = |c: &mut Conv2d<B>, s: &StackedConv<B>| {
            c.weight = c.weight.clone().map(|_| rows(s.weight.val(), k, m));
            if let Some(sb) = &s.bias
                && let Some(b) = c.bias.take()
            {
                c.bias = Some(b.map(|_| rows(sb.val(), k, m)));
            }
        };
        let put_norm = |n: &mut burn::nn::BatchNorm<B>, s: &StackedNorm<B>| {
            n.gamma = n.gamma.clone().map(|_| rows(s.gamma.val(), k, m));
            n.beta = n.beta.clone().map(|_| rows(s.beta.val(), k, m));
            n.running_mean = RunningState::new(rows(s.running_mean.value_sync(), k, m));
            n.running_var = RunningState::new(rows(s.running_var.value_sync(), k, m));
        };
        for (u, s) in template.units.iter_mut().zip(&self.units) {
            put_conv(&mut u.conv1, &s.conv1);
            if let (Some(c), Some(sc)) = (u.conv2.as_mut(), &s.conv2) {
                put_conv(c, sc);
            }
            if let (Some(c), Some(sc)) = (u.shortcut.as_mut(), &s.shortcut) {
                put_conv(c, sc);
            }
            if let (Some(n), Some(sn)) = (u.bn1.as_mut(), &s.bn1) {
                put_norm(n, sn);
            }
            if let (Some(n), Some(sn)) = (u.bn2.as_mut(), &s.bn2) {
                put_norm(n, sn);
            }
        }
        template.fc.weight = template.fc.weight.clone().map(|_| rows(self.fc_weight.val(), k, m));
        if let Some(b) = template.fc.bias.take() {
            template.fc.bias = Some(b.map(|_| rows(self.fc_bias.val(), k, m)));
        }
        template
    }
}

impl<B: StackedOps> StackedNorm<B> {
    /// Training-mode batch norm, each member with its own statistics; updates the running
    /// statistics as burn's `BatchNorm` does (element-wise, so per member).
    fn forward_train(&self, x: Tensor<B, 4>, members: usize) -> Tensor<B, 4> {
        let (y, mean, var) = B::batch_norm_train_stacked(x, self.gamma.val(), self.beta.val(), self.epsilon, members);
        update_running(&self.running_mean, mean, self.momentum);
        update_running(&self.running_var, var, self.momentum);
        y
    }
}

impl<B: StackedOps> StackedUnit<B> {
    /// The stacked [`Unit::forward`], in training mode.
    fn forward(&self, x: Tensor<B, 4>, k: usize) -> Tensor<B, 4> {
        // `stack` gives every stacked 3x3 convolution a bias.
        let conv = |c: &StackedConv<B>, x: Tensor<B, 4>, with_relu: bool| {
            let bias = c.bias.as_ref().map(Param::val).unwrap_or_else(|| Tensor::zeros([c.weight.dims()[0]], &x.device()));
            B::conv3x3_stacked(x, c.weight.val(), bias, k, with_relu)
        };
        let mut y = conv(&self.conv1, x.clone(), self.bn1.is_none());
        if let Some(bn) = &self.bn1 {
            y = relu(bn.forward_train(y, k));
        }
        if !self.residual {
            return y;
        }
        if let Some(c2) = &self.conv2 {
            y = conv(c2, y, false);
        }
        if let Some(bn) = &self.bn2 {
            y = bn.forward_train(y, k);
        }
        let skip = match &self.shortcut {
            Some(s) => B::conv1x1_stacked(x, s.weight.val(), k),
            None => x,
        };
        relu(y + skip)
    }
}

impl<B: StackedOps> StackedClassifier<B> {
    /// Training-mode forward pass of all members.
    /// # Shapes
    /// [K*N, C, H, W] -> [K*N, 2] logits
    pub fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 2> {
        for u in &self.units {
            x = u.forward(x, self.members);
            if u.pool_after {
                x = B::max_pool2x2(x);
            }
        }
        B::gap_linear_stacked(x, self.fc_weight.val(), self.fc_bias.val(), self.members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::train::seeded_init;
    use crate::ml::weights::to_safetensors;
    use burn::backend::{Autodiff, Flex};
    use burn::module::AutodiffModule;

    fn architectures() -> Vec<ArchConfig> {
        vec![ArchConfig::vgg_small(1), ArchConfig::vgg(2, vec![4, 8], true), ArchConfig::resnet(1, &[4, 8], 1)]
    }

    /// Stacking then taking member m back out gives member m's bytes, for every architecture.
    #[test]
    fn a_member_taken_out_of_a_stack_is_the_model_put_in() {
        let dev = Default::default();
        for arch in architectures() {
            let models: Vec<Classifier<Autodiff<Flex>>> = (0..3).map(|s| seeded_init(&arch, 40 + s, &dev)).collect();
            let stacked = StackedClassifier::stack(&arch, &models).unwrap();
            assert_eq!(stacked.members, 3);
            let inner = stacked.valid();
            for (m, model) in models.iter().enumerate() {
                let template = seeded_init::<Flex>(&arch, 99, &dev);
                let back = inner.member(m, template);
                assert_eq!(
                    to_safetensors(&arch, &back).unwrap(),
                    to_safetensors(&arch, &model.valid()).unwrap(),
                    "{} member {m}",
                    arch.name
                );
            }
        }
    }

    #[test]
    fn models_of_different_architectures_do_not_stack() {
        let dev = Default::default();
        let a = seeded_init::<Flex>(&ArchConfig::vgg(1, vec![4, 8], false), 1, &dev);
        let b = seeded_init::<Flex>(&ArchConfig::vgg(1, vec![4, 8, 8], false), 1, &dev);
        let arch = ArchConfig::vgg(1, vec![4, 8], false);
        assert_eq!(StackedClassifier::stack(&arch, &[a, b]).err(), Some(StackError::Mismatch(1)));
        assert_eq!(StackedClassifier::<Flex>::stack(&arch, &[]).err(), Some(StackError::Empty));
        // Same depth, other widths.
        let c = seeded_init::<Flex>(&ArchConfig::vgg(1, vec![4, 16], false), 1, &dev);
        let a = seeded_init::<Flex>(&arch, 1, &dev);
        assert_eq!(StackedClassifier::stack(&arch, &[a, c]).err(), Some(StackError::Mismatch(1)));
    }
}
