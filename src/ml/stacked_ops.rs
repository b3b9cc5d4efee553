//! The layers of K same-shaped classifiers *stacked* into one model (`super::stacked`), for
//! fused training: one forward pass, one autodiff graph and one optimizer step serve all K.
//!
//! Layout: member m's images are rows `[m*N, (m+1)*N)` of a `[K*N, C, H, W]` activation, and
//! its parameters are rows `[m*P, (m+1)*P)` of each stacked parameter (a conv weight
//! `[K*Co, Cin, kh, kw]`, a bias or batch-norm vector `[K*C]`, the head `[K*Kin, O]`). Layers
//! that act per image plane (ReLU, max pool, the residual sum) need no stacked version.
//!
//! Two implementations:
//! - the default, for every backend (CUDA, wgpu): burn's operations, the HFTA way: the K
//!   convolutions are one grouped convolution (`groups = K`), the K heads one batched matmul,
//!   batch norm a reduction per (member, channel). Numerically a member's result is what it
//!   would compute alone, up to the backend's rounding.
//! - the CPU backend (flex) with autodiff: each stacked op calls camflow's own kernels
//!   (`super::cpu_kernels`) on each member's slice, members in parallel. Those kernels' bytes
//!   depend only on the member's own operands, so a member of a stack computes exactly the bytes
//!   it computes alone (tested in `super::fused`).

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::relu;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Tensor, TensorPrimitive};
use rayon::prelude::*;

use super::cpu_kernels::{self as kernels, Conv1x1Shape, Conv3x3Shape};
use super::fast_ops::{FastOps, conv_shape, conv1x1_shape, flex_from, register, values};

/// Layers of K stacked models (see the module docs for the layout). Defaults are burn's
/// operations (a grouped convolution, a batched matmul).
pub trait StackedOps: FastOps {
    /// The most bytes a stack's largest activation may take, `None` for no limit: more
    /// members form another stack, trained after it in the same task.
    fn stack_budget() -> Option<usize> {
        None
    }

    /// Per member `relu(conv3x3(x_m, w_m) + b_m)` (or without the ReLU), stride 1, padding 1.
    /// # Shapes
    /// x [K*N, Cin, H, W], weight [K*Co, Cin, 3, 3], bias [K*Co] -> [K*N, Co, H, W]
    fn conv3x3_stacked(
        x: Tensor<Self, 4>,
        weight: Tensor<Self, 4>,
        bias: Tensor<Self, 1>,
        members: usize,
        with_relu: bool,
    ) -> Tensor<Self, 4> {
        grouped::conv3x3(x, weight, bias, members, with_relu)
    }

    /// Per member 1x1 convolution without bias.
    /// # Shapes
    /// x [K*N, Cin, H, W], weight [K*Co, Cin, 1, 1] -> [K*N, Co, H, W]
    fn conv1x1_stacked(x: Tensor<Self, 4>, weight: Tensor<Self, 4>, members: usize) -> Tensor<Self, 4> {
        grouped::conv1x1(x, weight, members)
    }

    /// Per member [`FastOps::batch_norm_train`]: each member normalises with its own batch
    /// statistics, which come back stacked.
    /// # Shapes
    /// x [K*N, C, H, W], gamma [K*C], beta [K*C] -> ([K*N, C, H, W], [K*C], [K*C])
    fn batch_norm_train_stacked(
        x: Tensor<Self, 4>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        eps: f64,
        members: usize,
    ) -> (Tensor<Self, 4>, Tensor<Self, 1>, Tensor<Self, 1>) {
        grouped::batch_norm_train(x, gamma, beta, eps, members)
    }

    /// Per member [`FastOps::gap_linear`].
    /// # Shapes
    /// x [K*N, Kin, H, W], weight [K*Kin, O], bias [K*O] -> [K*N, O]
    fn gap_linear_stacked(x: Tensor<Self, 4>, weight: Tensor<Self, 2>, bias: Tensor<Self, 1>, members: usize) -> Tensor<Self, 2> {
        grouped::gap_linear(x, weight, bias, members)
    }

    /// Per member [`FastOps::cross_entropy`] of its rows against its `targets` (K*N of them, in
    /// row order) with its own class weights: the K losses.
    /// # Shapes
    /// logits [K*N, C] -> [K]
    fn cross_entropy_stacked(logits: Tensor<Self, 2>, targets: &[usize], weights: &[Option<Vec<f32>>]) -> Tensor<Self, 1> {
        grouped::cross_entropy(logits, targets, weights)
    }
}

/// burn's operations on stacked tensors: the defaults of [`StackedOps`], public for the tests
/// that hold the CPU's exact version against them.
pub mod grouped {
    use super::*;

    /// [K*N, C, H, W] (members along the batch) -> [N, K*C, H, W] (members along the channels).
    fn members_to_channels<B: FastOps>(x: Tensor<B, 4>, members: usize) -> Tensor<B, 4> {
        let [kn, c, h, w] = x.dims();
        let n = kn / members;
        x.reshape([members, n, c * h * w]).swap_dims(0, 1).reshape([n, members * c, h, w])
    }

    /// The inverse of [`members_to_channels`].
    fn channels_to_members<B: FastOps>(y: Tensor<B, 4>, members: usize) -> Tensor<B, 4> {
        let [n, kc, h, w] = y.dims();
        let c = kc / members;
        y.reshape([n, members, c * h * w]).swap_dims(0, 1).reshape([members * n, c, h, w])
    }

    pub fn conv3x3<B: FastOps>(x: Tensor<B, 4>, weight: Tensor<B, 4>, bias: Tensor<B, 1>, members: usize, with_relu: bool) -> Tensor<B, 4> {
        let options = ConvOptions::new([1, 1], [1, 1], [1, 1], members);
        let y = channels_to_members(conv2d(members_to_channels(x, members), weight, Some(bias), options), members);
        if with_relu { relu(y) } else { y }
    }

    pub fn conv1x1<B: FastOps>(x: Tensor<B, 4>, weight: Tensor<B, 4>, members: usize) -> Tensor<B, 4> {
        let options = ConvOptions::new([1, 1], [0, 0], [1, 1], members);
        channels_to_members(conv2d(members_to_channels(x, members), weight, None, options), members)
    }

    pub fn batch_norm_train<B: FastOps>(
        x: Tensor<B, 4>,
        gamma: Tensor<B, 1>,
        beta: Tensor<B, 1>,
        eps: f64,
        members: usize,
    ) -> (Tensor<B, 4>, Tensor<B, 1>, Tensor<B, 1>) {
        let [kn, c, h, w] = x.dims();
        let n = kn / members;
        let x = x.reshape([members, n, c, h * w]);
        // Mean over a member's images and pixels, per (member, channel): [K, 1, C, 1].
        let per_channel = |t: Tensor<B, 4>| t.swap_dims(1, 2).reshape([members, c, n * h * w]).mean_dim(2).reshape([members, 1, c, 1]);
        let mean = per_channel(x.clone());
        let var = per_channel(x.clone().sub(mean.clone()).square());
        let std = var.clone().add_scalar(eps).sqrt();
        let y = x.sub(mean.clone()).div(std).mul(gamma.reshape([members, 1, c, 1])).add(beta.reshape([members, 1, c, 1]));
        (y.reshape([kn, c, h, w]), mean.detach().reshape([members * c]), var.detach().reshape([members * c]))
    }

    /// One loss per member (members of K rows each), concatenated.
    pub fn cross_entropy<B: FastOps>(logits: Tensor<B, 2>, targets: &[usize], weights: &[Option<Vec<f32>>]) -> Tensor<B, 1> {
        let members = weights.len();
        let rows = logits.dims()[0];
        assert!(members > 0 && rows % members == 0 && targets.len() == rows, "stacked cross-entropy: {rows} rows over {members} members");
        let n = rows / members;
        let losses = (0..members)
            .map(|m| B::cross_entropy(logits.clone().narrow(0, m * n, n), &targets[m * n..(m + 1) * n], weights[m].as_deref()))
            .collect();
        Tensor::cat(losses, 0)
    }

    pub fn gap_linear<B: FastOps>(x: Tensor<B, 4>, weight: Tensor<B, 2>, bias: Tensor<B, 1>, members: usize) -> Tensor<B, 2> {
        let [kn, k, _, _] = x.dims();
        let o = weight.dims()[1];
        let n = kn / members;
        let pooled = x.mean_dim(3).mean_dim(2).reshape([members, n, k]);
        let logits = pooled.matmul(weight.reshape([members, k, o])) + bias.reshape([members, 1, o]);
        logits.reshape([kn, o])
    }
}

#[cfg(feature = "cuda")]
impl StackedOps for burn::backend::Cuda {}
#[cfg(feature = "cuda")]
impl StackedOps for Autodiff<burn::backend::Cuda> {}
#[cfg(feature = "wgpu")]
impl StackedOps for burn::backend::Wgpu {}
#[cfg(feature = "wgpu")]
impl StackedOps for Autodiff<burn::backend::Wgpu> {}

/// Without autodiff the CPU backend keeps the defaults: nothing trains a stack there, and the
/// tests use it to run burn's grouped operations beside the exact ones.
impl StackedOps for Flex {}

/// `f(m)` for every member, in parallel, in member order.
fn per_member<T: Send>(members: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    (0..members).into_par_iter().map(f).collect()
}

/// A stacked output of `len` floats whose member m's part `f(m, part)` writes, members in
/// parallel (no serial copy of a large tensor), with each member's other results in order.
fn per_member_into<T: Send>(members: usize, len: usize, f: impl Fn(usize, &mut [f32]) -> T + Sync + Send) -> (Vec<f32>, Vec<T>) {
    assert!(members > 0 && len % members == 0, "a stacked output of {len} values is not {members} equal parts");
    let mut out = vec![0f32; len];
    let each = len / members;
    if each == 0 {
        return (out, per_member(members, |m| f(m, &mut [])));
    }
    let rest = out.par_chunks_mut(each).enumerate().map(|(m, part)| f(m, part)).collect();
    (out, rest)
}

/// Member m's part of a stacked slice of `members` equal parts.
fn part(v: &[f32], members: usize, m: usize) -> &[f32] {
    debug_assert!(v.len() % members == 0, "{} values are not {members} equal parts", v.len());
    let len = v.len() / members;
    &v[m * len..(m + 1) * len]
}

/// One member's share of a stacked conv: its batch and output channels.
fn member_conv_shape(x: [usize; 4], weight: [usize; 4], members: usize) -> Conv3x3Shape {
    assert!(members > 0 && x[0] % members == 0 && weight[0] % members == 0, "stacked conv: {x:?} / {weight:?} over {members} members");
    conv_shape([x[0] / members, x[1], x[2], x[3]], [weight[0] / members, weight[1], weight[2], weight[3]])
}

fn member_conv1x1_shape(x: [usize; 4], weight: [usize; 4], members: usize) -> Conv1x1Shape {
    assert!(members > 0 && x[0] % members == 0 && weight[0] % members == 0, "stacked 1x1 conv: {x:?} / {weight:?} over {members} members");
    conv1x1_shape([x[0] / members, x[1], x[2], x[3]], [weight[0] / members, weight[1], weight[2], weight[3]])
}

impl StackedOps for Autodiff<Flex> {
    /// glibc serves allocations of 32 MiB and more (its largest mmap threshold, which
    /// `malloc_tuning` sets) with fresh mmaps, so a stacked tensor that large is paged in anew
    /// every step: measured at 64x64 with K = 16 (`camflow bench fuse`), 18% of the CPU time
    /// went to the kernel's page faults and the stack trained at 0.84x the total throughput of
    /// one model. Half of it leaves room for the tensors a step holds beside the largest
    /// activation (on the paper pipeline's retrainings a 32 MiB budget still doubled the
    /// system time, 16 MiB did not).
    fn stack_budget() -> Option<usize> {
        Some(16 << 20)
    }

    fn conv3x3_stacked(
        x: Tensor<Self, 4>,
        weight: Tensor<Self, 4>,
        bias: Tensor<Self, 1>,
        members: usize,
        with_relu: bool,
    ) -> Tensor<Self, 4> {
        let s = member_conv_shape(x.dims(), weight.dims(), members);
        let (x, weight, bias) = (x.into_primitive().tensor(), weight.into_primitive().tensor(), bias.into_primitive().tensor());
        let (xv, wv, bv) = (x.primitive.to_contiguous(), weight.primitive.to_contiguous(), bias.primitive.to_contiguous());
        let (out, _) = per_member_into(members, members * s.batch * s.out_channels * s.height * s.width, |m, dst| {
            let (x, w, b) = (part(values(&xv), members, m), part(values(&wv), members, m), part(values(&bv), members, m));
            kernels::conv3x3_forward_into(s, x, w, b, with_relu, dst)
        });
        let out = flex_from(out, &[members * s.batch, s.out_channels, s.height, s.width]);
        let tracked = match StackedConv3x3Backward
            .prepare::<NoCheckpointing>([x.node.clone(), weight.node.clone(), bias.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish(StackedConv3x3State { shape: s, members, x: xv, weight: wv, out: out.clone(), with_relu }, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(tracked))
    }

    fn conv1x1_stacked(x: Tensor<Self, 4>, weight: Tensor<Self, 4>, members: usize) -> Tensor<Self, 4> {
        let s = member_conv1x1_shape(x.dims(), weight.dims(), members);
        let [kn, _, h, w] = x.dims();
        let (x, weight) = (x.into_primitive().tensor(), weight.into_primitive().tensor());
        let (xv, wv) = (x.primitive.to_contiguous(), weight.primitive.to_contiguous());
        let (out, _) = per_member_into(members, kn * s.out_channels * h * w, |m, dst| {
            dst.copy_from_slice(&kernels::conv1x1_forward(s, part(values(&xv), members, m), part(values(&wv), members, m)))
        });
        let out = flex_from(out, &[kn, s.out_channels, h, w]);
        let tracked =
            match StackedConv1x1Backward.prepare::<NoCheckpointing>([x.node.clone(), weight.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    prep.finish(StackedConv1x1State { shape: s, members, x: xv, weight: wv, x_dims: [kn, s.in_channels, h, w] }, out)
                }
                OpsKind::UnTracked(prep) => prep.finish(out),
            };
        Tensor::from_primitive(TensorPrimitive::Float(tracked))
    }

    fn batch_norm_train_stacked(
        x: Tensor<Self, 4>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        eps: f64,
        members: usize,
    ) -> (Tensor<Self, 4>, Tensor<Self, 1>, Tensor<Self, 1>) {
        let dims = x.dims();
        let (n, c, hw) = (dims[0] / members, dims[1], dims[2] * dims[3]);
        let (x, gamma, beta) = (x.into_primitive().tensor(), gamma.into_primitive().tensor(), beta.into_primitive().tensor());
        let (xv, gv, bv) = (x.primitive.to_contiguous(), gamma.primitive.to_contiguous(), beta.primitive.to_contiguous());
        let (y, stats) = per_member_into(members, values(&xv).len(), |m, dst| {
            let (x, g, b) = (part(values(&xv), members, m), part(values(&gv), members, m), part(values(&bv), members, m));
            let (y, mean, var) = kernels::batch_norm_forward(x, n, hw, g, b, eps as f32);
            dst.copy_from_slice(&y);
            (mean, var)
        });
        let (mean, var): (Vec<Vec<f32>>, Vec<Vec<f32>>) = stats.into_iter().unzip();
        let (mean, var) = (mean.concat(), var.concat());
        let out = flex_from(y, &dims);
        let state = StackedBatchNormState {
            x: xv,
            gamma: gv,
            mean: Arc::new(mean.clone()),
            var: Arc::new(var.clone()),
            eps: eps as f32,
            dims,
            members,
        };
        let tracked = match StackedBatchNormBackward
            .prepare::<NoCheckpointing>([x.node.clone(), gamma.node.clone(), beta.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        let stat = |v: Vec<f32>| Tensor::from_inner(Tensor::from_primitive(TensorPrimitive::Float(flex_from(v, &[members * c]))));
        (Tensor::from_primitive(TensorPrimitive::Float(tracked)), stat(mean), stat(var))
    }

    fn gap_linear_stacked(x: Tensor<Self, 4>, weight: Tensor<Self, 2>, bias: Tensor<Self, 1>, members: usize) -> Tensor<Self, 2> {
        let [kn, k, h, w] = x.dims();
        let o = weight.dims()[1];
        let n = kn / members;
        let (x, weight, bias) = (x.into_primitive().tensor(), weight.into_primitive().tensor(), bias.into_primitive().tensor());
        let (xv, wv, bv) = (x.primitive.to_contiguous(), weight.primitive.to_contiguous(), bias.primitive.to_contiguous());
        let parts = per_member(members, |m| {
            kernels::gap_linear_forward(
                part(values(&xv), members, m),
                n,
                k,
                h * w,
                part(values(&wv), members, m),
                part(values(&bv), members, m),
            )
        });
        let (mut gap, mut logits) = (Vec::with_capacity(kn * k), Vec::with_capacity(kn * o));
        for (g, l) in parts {
            gap.extend(g);
            logits.extend(l);
        }
        let out = flex_from(logits, &[kn, o]);
        let tracked = match StackedGapLinearBackward
            .prepare::<NoCheckpointing>([x.node.clone(), weight.node.clone(), bias.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish(StackedGapLinearState { gap: Arc::new(gap), weight: wv, x_dims: [kn, k, h, w], outputs: o, members }, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(tracked))
    }

    fn cross_entropy_stacked(logits: Tensor<Self, 2>, targets: &[usize], weights: &[Option<Vec<f32>>]) -> Tensor<Self, 1> {
        let members = weights.len();
        let dims = logits.dims();
        assert!(members > 0 && dims[0] % members == 0 && targets.len() == dims[0], "stacked cross-entropy: {dims:?} over {members} members");
        let n = dims[0] / members;
        let logits = logits.into_primitive().tensor();
        let lv = logits.primitive.to_contiguous();
        let parts = per_member(members, |m| {
            kernels::cross_entropy(part(values(&lv), members, m), dims[1], &targets[m * n..(m + 1) * n], weights[m].as_deref())
        });
        let (losses, grads): (Vec<f32>, Vec<Vec<f32>>) = parts.into_iter().unzip();
        let out = flex_from(losses, &[members]);
        let tracked = match StackedCrossEntropyBackward.prepare::<NoCheckpointing>([logits.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(StackedCrossEntropyState { grads: Arc::new(grads), dims }, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(tracked))
    }
}

#[derive(Debug)]
struct StackedConv3x3Backward;

#[derive(Debug, Clone)]
struct StackedConv3x3State {
    /// One member's shape.
    shape: Conv3x3Shape,
    members: usize,
    x: FlexTensor,
    weight: FlexTensor,
    out: FlexTensor,
    with_relu: bool,
}

impl Backward<Flex, 3> for StackedConv3x3Backward {
    type State = StackedConv3x3State;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let st = ops.state;
        let (s, k) = (st.shape, st.members);
        let member = |m: usize, dx: Option<&mut [f32]>| {
            let (x, w, out) = (part(values(&st.x), k, m), part(values(&st.weight), k, m), part(values(&st.out), k, m));
            kernels::conv3x3_backward_into(s, x, w, out, st.with_relu, part(values(&grad), k, m), dx, true)
        };
        let (dx, parts) = if node_x.is_some() {
            per_member_into(k, values(&st.x).len(), |m, dst| member(m, Some(dst)))
        } else {
            (Vec::new(), per_member(k, |m| member(m, None)))
        };
        let (dw, db): (Vec<Vec<f32>>, Vec<Vec<f32>>) = parts.into_iter().unzip();
        let (dw, db) = (dw.concat(), db.concat());
        register(grads, node_x.map(|n| n.id), dx, &[k * s.batch, s.in_channels, s.height, s.width]);
        register(grads, node_weight.map(|n| n.id), dw, &[k * s.out_channels, s.in_channels, 3, 3]);
        register(grads, node_bias.map(|n| n.id), db, &[k * s.out_channels]);
    }
}

#[derive(Debug)]
struct StackedConv1x1Backward;

#[derive(Debug, Clone)]
struct StackedConv1x1State {
    shape: Conv1x1Shape,
    members: usize,
    x: FlexTensor,
    weight: FlexTensor,
    x_dims: [usize; 4],
}

impl Backward<Flex, 2> for StackedConv1x1Backward {
    type State = StackedConv1x1State;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let st = ops.state;
        let k = st.members;
        let want_x = node_x.is_some();
        let (dx, dw) = per_member_into(k, if want_x { values(&st.x).len() } else { 0 }, |m, dst| {
            let (x, w, g) = (part(values(&st.x), k, m), part(values(&st.weight), k, m), part(values(&grad), k, m));
            let (dx, dw) = kernels::conv1x1_backward(st.shape, x, w, g, want_x);
            if let Some(dx) = dx {
                dst.copy_from_slice(&dx);
            }
            dw
        });
        let dw = dw.concat();
        register(grads, node_x.map(|n| n.id), dx, &st.x_dims);
        register(grads, node_weight.map(|n| n.id), dw, &[k * st.shape.out_channels, st.shape.in_channels, 1, 1]);
    }
}

#[derive(Debug)]
struct StackedBatchNormBackward;

#[derive(Debug, Clone)]
struct StackedBatchNormState {
    x: FlexTensor,
    gamma: FlexTensor,
    mean: Arc<Vec<f32>>,
    var: Arc<Vec<f32>>,
    eps: f32,
    /// The stacked input's dims.
    dims: [usize; 4],
    members: usize,
}

impl Backward<Flex, 3> for StackedBatchNormBackward {
    type State = StackedBatchNormState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let st = ops.state;
        let [kn, c, h, w] = st.dims;
        let k = st.members;
        let (dx, parts) = per_member_into(k, values(&st.x).len(), |m, dst| {
            let (x, gamma, g) = (part(values(&st.x), k, m), part(values(&st.gamma), k, m), part(values(&grad), k, m));
            let (mean, var) = (part(&st.mean, k, m), part(&st.var, k, m));
            let (dx, dgamma, dbeta) = kernels::batch_norm_backward(x, kn / k, h * w, gamma, mean, var, st.eps, g);
            dst.copy_from_slice(&dx);
            (dgamma, dbeta)
        });
        let (dgamma, dbeta): (Vec<Vec<f32>>, Vec<Vec<f32>>) = parts.into_iter().unzip();
        let (dgamma, dbeta) = (dgamma.concat(), dbeta.concat());
        register(grads, node_x.map(|n| n.id), dx, &st.dims);
        register(grads, node_gamma.map(|n| n.id), dgamma, &[k * c]);
        register(grads, node_beta.map(|n| n.id), dbeta, &[k * c]);
    }
}

#[derive(Debug)]
struct StackedGapLinearBackward;

#[derive(Debug, Clone)]
struct StackedGapLinearState {
    /// The pooled features [K*N, Kin].
    gap: Arc<Vec<f32>>,
    weight: FlexTensor,
    x_dims: [usize; 4],
    outputs: usize,
    members: usize,
}

impl Backward<Flex, 3> for StackedGapLinearBackward {
    type State = StackedGapLinearState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let st = ops.state;
        let [_, kin, h, w] = st.x_dims;
        let k = st.members;
        let parts = per_member(k, |m| {
            kernels::gap_linear_backward(part(&st.gap, k, m), h * w, part(values(&st.weight), k, m), part(values(&grad), k, m), st.outputs)
        });
        let (mut dx, mut dw, mut db) = (Vec::new(), Vec::new(), Vec::new());
        for (x, wgt, b) in parts {
            dx.extend(x);
            dw.extend(wgt);
            db.extend(b);
        }
        register(grads, node_x.map(|n| n.id), dx, &st.x_dims);
        register(grads, node_weight.map(|n| n.id), dw, &[k * kin, st.outputs]);
        register(grads, node_bias.map(|n| n.id), db, &[k * st.outputs]);
    }
}

#[derive(Debug)]
struct StackedCrossEntropyBackward;

#[derive(Debug, Clone)]
struct StackedCrossEntropyState {
    /// Per member, d loss_m / d logits_m, computed with the loss.
    grads: Arc<Vec<Vec<f32>>>,
    dims: [usize; 2],
}

impl Backward<Flex, 1> for StackedCrossEntropyBackward {
    type State = StackedCrossEntropyState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let upstream = grads.consume::<Flex>(&ops.node).to_contiguous();
        if let Some(node) = node {
            // Each member's loss gets its own upstream factor (1 when the losses are summed),
            // applied exactly as the single-model op applies its one factor.
            let g = values(&upstream);
            let dlogits: Vec<f32> = ops.state.grads.iter().zip(g).flat_map(|(grad, &g)| grad.iter().map(move |v| v * g)).collect();
            grads.register::<Flex>(node.id, flex_from(dlogits, &ops.state.dims));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    type Ad = Autodiff<Flex>;
    const K: usize = 3;

    fn param<const D: usize>(rng: &mut crate::ml::rng::Rng, shape: [usize; D]) -> Tensor<Ad, D> {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        Tensor::<Ad, D>::from_data(TensorData::new(v, shape.to_vec()), &Default::default()).require_grad()
    }

    fn max_diff<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// The CPU's exact stacked ops give the values and gradients of burn's grouped operations
    /// (the path CUDA and wgpu take), and member m's rows equal the single-model op on its
    /// slice bit for bit.
    #[test]
    fn exact_stacked_ops_agree_with_grouped_operations_and_with_each_member_alone() {
        let mut rng = crate::ml::rng::Rng::new(5);
        let (n, cin, co, h, w) = (2, 3, 4, 6, 4);
        let x = param(&mut rng, [K * n, cin, h, w]);
        let w3 = param(&mut rng, [K * co, cin, 3, 3]);
        let b3 = param(&mut rng, [K * co]);
        let w1 = param(&mut rng, [K * co, cin, 1, 1]);
        let gamma = param(&mut rng, [K * co]);
        let beta = param(&mut rng, [K * co]);
        let fc_w = param(&mut rng, [K * co, 2]);
        let fc_b = param(&mut rng, [K * 2]);
        let targets: Vec<usize> = (0..K * n).map(|i| i % 2).collect();
        let weights = vec![Some(vec![0.7f32, 1.3]), None, Some(vec![1.0, 1.0])];

        let run = |exact: bool| {
            let y = if exact {
                Ad::conv3x3_stacked(x.clone(), w3.clone(), b3.clone(), K, true)
            } else {
                grouped::conv3x3(x.clone(), w3.clone(), b3.clone(), K, true)
            };
            let s = if exact { Ad::conv1x1_stacked(x.clone(), w1.clone(), K) } else { grouped::conv1x1(x.clone(), w1.clone(), K) };
            let (z, mean, var) = if exact {
                Ad::batch_norm_train_stacked(y + s, gamma.clone(), beta.clone(), 1e-5, K)
            } else {
                grouped::batch_norm_train(y + s, gamma.clone(), beta.clone(), 1e-5, K)
            };
            let logits = if exact {
                Ad::gap_linear_stacked(relu(z), fc_w.clone(), fc_b.clone(), K)
            } else {
                grouped::gap_linear(relu(z), fc_w.clone(), fc_b.clone(), K)
            };
            let losses = if exact {
                Ad::cross_entropy_stacked(logits.clone(), &targets, &weights)
            } else {
                grouped::cross_entropy(logits.clone(), &targets, &weights)
            };
            (logits, losses, mean, var)
        };
        let (exact, theirs) = (run(true), run(false));
        assert!(max_diff(exact.0.clone().inner(), theirs.0.clone().inner()) < 1e-4, "logits");
        assert!(max_diff(exact.1.clone().inner(), theirs.1.clone().inner()) < 1e-5, "losses");
        assert!(max_diff(exact.2.inner(), theirs.2.inner()) < 1e-5, "batch means");
        assert!(max_diff(exact.3.inner(), theirs.3.inner()) < 1e-4, "batch variances");
        let (g_exact, g_theirs) = (exact.1.sum().backward(), theirs.1.sum().backward());
        for (what, p) in [("x", &x), ("w3", &w3)] {
            assert!(max_diff(p.grad(&g_exact).expect(what), p.grad(&g_theirs).expect(what)) < 1e-4, "{what}");
        }
        for (what, p) in [("b3", &b3), ("gamma", &gamma), ("beta", &beta), ("fc_b", &fc_b)] {
            assert!(max_diff(p.grad(&g_exact).expect(what), p.grad(&g_theirs).expect(what)) < 1e-4, "{what}");
        }
        assert!(max_diff(w1.grad(&g_exact).expect("w1"), w1.grad(&g_theirs).expect("w1")) < 1e-4);
        assert!(max_diff(fc_w.grad(&g_exact).expect("fc_w"), fc_w.grad(&g_theirs).expect("fc_w")) < 1e-4);

        // Member by member, the exact stacked conv is the single-model op, bit for bit.
        let stacked = Ad::conv3x3_stacked(x.clone(), w3.clone(), b3.clone(), K, true).inner().into_data().to_vec::<f32>().unwrap();
        for m in 0..K {
            let alone =
                Ad::conv3x3(x.clone().narrow(0, m * n, n), w3.clone().narrow(0, m * co, co), b3.clone().narrow(0, m * co, co), true);
            let alone = alone.inner().into_data().to_vec::<f32>().unwrap();
            let len = alone.len();
            assert!(stacked[m * len..(m + 1) * len].iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits()), "member {m}");
        }
    }
}
