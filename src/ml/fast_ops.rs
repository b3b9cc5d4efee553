//! A backend extension for the layers a CNN step spends its time in: 3x3 convolution with bias
//! and optional ReLU, and 2x2 max pooling.
//!
//! Every backend gets burn's own operations by default. The CPU backend (flex) and its autodiff
//! wrapper override them with [`super::cpu_kernels`]: the autodiff version registers one
//! backward step per layer whose gradients come from those kernels, instead of burn's chain of
//! conv + ReLU nodes (why: BENCHMARKS.md). The CUDA and wgpu backends keep burn's kernels.
//!
//! Models are generic over [`FastOps`]; training and Grad-CAM over [`TrainBackend`].

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::activation::{relu, softmax};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};

use super::cpu_kernels::{self as kernels, Conv1x1Shape, Conv3x3Shape};

/// Layers with a faster implementation on some backends. Defaults are burn's operations.
pub trait FastOps: Backend {
    /// `relu(conv3x3(x, weight) + bias)` (or without the ReLU), stride 1, padding 1.
    /// # Shapes
    /// x [N, Cin, H, W], weight [Co, Cin, 3, 3], bias [Co] -> [N, Co, H, W]
    fn conv3x3(x: Tensor<Self, 4>, weight: Tensor<Self, 4>, bias: Tensor<Self, 1>, with_relu: bool) -> Tensor<Self, 4> {
        let y = conv2d(x, weight, Some(bias), ConvOptions::new([1, 1], [1, 1], [1, 1], 1));
        if with_relu { relu(y) } else { y }
    }

    /// 2x2 max pool, stride 2.
    /// # Shapes
    /// [N, C, H, W] -> [N, C, H/2, W/2]
    fn max_pool2x2(x: Tensor<Self, 4>) -> Tensor<Self, 4> {
        max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], false)
    }

    /// 1x1 convolution without bias, stride 1 (the resnet shortcut).
    /// # Shapes
    /// x [N, Cin, H, W], weight [Co, Cin, 1, 1] -> [N, Co, H, W]
    fn conv1x1(x: Tensor<Self, 4>, weight: Tensor<Self, 4>) -> Tensor<Self, 4> {
        conv2d(x, weight, None, ConvOptions::new([1, 1], [0, 0], [1, 1], 1))
    }

    /// Batch normalisation with the batch's own statistics (training mode), as burn's
    /// `BatchNorm` computes it; also returns the batch mean and (biased) variance per channel,
    /// untracked, for the running statistics.
    /// # Shapes
    /// x [N, C, H, W], gamma [C], beta [C] -> ([N, C, H, W], [C], [C])
    fn batch_norm_train(
        x: Tensor<Self, 4>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        eps: f64,
    ) -> (Tensor<Self, 4>, Tensor<Self, 1>, Tensor<Self, 1>) {
        let [n, c, h, w] = x.dims();
        let per_channel = |t: Tensor<Self, 4>| t.swap_dims(0, 1).reshape([c, n * h * w]).mean_dim(1).reshape([1, c, 1, 1]);
        let mean = per_channel(x.clone());
        let var = per_channel(x.clone().sub(mean.clone()).square());
        let std = var.clone().add_scalar(eps).sqrt();
        let y = x.sub(mean.clone()).div(std).mul(gamma.reshape([1, c, 1, 1])).add(beta.reshape([1, c, 1, 1]));
        (y, mean.detach().reshape([c]), var.detach().reshape([c]))
    }

    /// Global average pooling then a linear layer (weight as burn's `Linear`: [K, O]).
    /// # Shapes
    /// x [N, K, H, W], weight [K, O], bias [O] -> [N, O]
    fn gap_linear(x: Tensor<Self, 4>, weight: Tensor<Self, 2>, bias: Tensor<Self, 1>) -> Tensor<Self, 2> {
        let [n, k, _, _] = x.dims();
        let o = bias.dims()[0];
        x.mean_dim(3).mean_dim(2).reshape([n, k]).matmul(weight) + bias.reshape([1, o])
    }

    /// Cross-entropy of logits against class indices, optionally weighted per class (burn's
    /// `CrossEntropyLoss` semantics).
    /// # Shapes
    /// logits [N, C] -> [1]
    fn cross_entropy(logits: Tensor<Self, 2>, targets: &[usize], weights: Option<&[f32]>) -> Tensor<Self, 1> {
        let device = logits.device();
        let t: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
        let t = Tensor::<Self, 1, Int>::from_data(TensorData::new(t, [targets.len()]), &device);
        CrossEntropyLossConfig::new().with_weights(weights.map(<[f32]>::to_vec)).init(&device).forward(logits, t)
    }

    /// Row-wise softmax, for reading probabilities out (not differentiated).
    /// # Shapes
    /// [N, C] -> [N, C]
    fn probabilities(logits: Tensor<Self, 2>) -> Tensor<Self, 2> {
        softmax(logits, 1)
    }
}

/// What training and Grad-CAM need: an autodiff backend whose inner backend has [`FastOps`] too.
/// (With [`StackedOps`](super::stacked_ops::StackedOps): fused training trains stacked models.)
pub trait TrainBackend: AutodiffBackend<InnerBackend: FastOps> + super::stacked_ops::StackedOps {}
impl<B: AutodiffBackend<InnerBackend: FastOps> + super::stacked_ops::StackedOps> TrainBackend for B {}

#[cfg(feature = "cuda")]
impl FastOps for burn::backend::Cuda {}
#[cfg(feature = "cuda")]
impl FastOps for Autodiff<burn::backend::Cuda> {}
#[cfg(feature = "wgpu")]
impl FastOps for burn::backend::Wgpu {}
#[cfg(feature = "wgpu")]
impl FastOps for Autodiff<burn::backend::Wgpu> {}

pub(super) fn flex_of<const D: usize>(t: Tensor<Flex, D>) -> FlexTensor {
    t.into_primitive().tensor().to_contiguous()
}

pub(super) fn values(t: &FlexTensor) -> &[f32] {
    // Every tensor camflow builds is f32; anything else is a bug, caught by `dispatch`.
    t.as_slice::<f32>().expect("camflow's CPU kernels take contiguous f32 tensors")
}

/// Registers `values` (of `shape`) as the gradient of a parent `node`, when it is tracked.
pub(super) fn register(grads: &mut Gradients, node: Option<NodeId>, values: Vec<f32>, shape: &[usize]) {
    if let Some(id) = node {
        grads.register::<Flex>(id, flex_from(values, shape));
    }
}

pub(super) fn flex_from(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

pub(super) fn conv_shape(x: [usize; 4], weight: [usize; 4]) -> Conv3x3Shape {
    assert!(weight[1] == x[1] && weight[2] == 3 && weight[3] == 3, "conv3x3: weight {weight:?} does not fit input {x:?}");
    Conv3x3Shape { batch: x[0], in_channels: x[1], out_channels: weight[0], height: x[2], width: x[3] }
}

/// The forward conv on flex tensors, shared by the plain and the autodiff backend.
fn conv3x3_flex(s: Conv3x3Shape, x: &FlexTensor, weight: &FlexTensor, bias: &FlexTensor, with_relu: bool) -> FlexTensor {
    let out = kernels::conv3x3_forward(s, values(x), values(weight), values(bias), with_relu);
    flex_from(out, &[s.batch, s.out_channels, s.height, s.width])
}

/// The forward pool on flex tensors and the winner of each window (for the backward pass).
fn max_pool2x2_flex(x: &FlexTensor, [n, c, h, w]: [usize; 4]) -> (FlexTensor, Vec<u8>) {
    let (out, winners) = kernels::max_pool2x2_forward(values(x), n * c, h, w);
    (flex_from(out, &[n, c, h / 2, w / 2]), winners)
}

impl FastOps for Flex {
    fn conv3x3(x: Tensor<Self, 4>, weight: Tensor<Self, 4>, bias: Tensor<Self, 1>, with_relu: bool) -> Tensor<Self, 4> {
        let s = conv_shape(x.dims(), weight.dims());
        let out = conv3x3_flex(s, &flex_of(x), &flex_of(weight), &flex_of(bias), with_relu);
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn max_pool2x2(x: Tensor<Self, 4>) -> Tensor<Self, 4> {
        let dims = x.dims();
        let (out, _) = max_pool2x2_flex(&flex_of(x), dims);
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn conv1x1(x: Tensor<Self, 4>, weight: Tensor<Self, 4>) -> Tensor<Self, 4> {
        let [n, _, h, w] = x.dims();
        let s = conv1x1_shape(x.dims(), weight.dims());
        let out = kernels::conv1x1_forward(s, values(&flex_of(x)), values(&flex_of(weight)));
        Tensor::from_primitive(TensorPrimitive::Float(flex_from(out, &[n, s.out_channels, h, w])))
    }

    fn gap_linear(x: Tensor<Self, 4>, weight: Tensor<Self, 2>, bias: Tensor<Self, 1>) -> Tensor<Self, 2> {
        let [n, k, h, w] = x.dims();
        let o = bias.dims()[0];
        let (_, logits) = kernels::gap_linear_forward(values(&flex_of(x)), n, k, h * w, values(&flex_of(weight)), values(&flex_of(bias)));
        Tensor::from_primitive(TensorPrimitive::Float(flex_from(logits, &[n, o])))
    }

    fn cross_entropy(logits: Tensor<Self, 2>, targets: &[usize], weights: Option<&[f32]>) -> Tensor<Self, 1> {
        let [_, c] = logits.dims();
        let (loss, _) = kernels::cross_entropy(values(&flex_of(logits)), c, targets, weights);
        Tensor::from_primitive(TensorPrimitive::Float(flex_from(vec![loss], &[1])))
    }

    fn batch_norm_train(
        x: Tensor<Self, 4>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        eps: f64,
    ) -> (Tensor<Self, 4>, Tensor<Self, 1>, Tensor<Self, 1>) {
        let dims = x.dims();
        let c = dims[1];
        let (y, mean, var) = kernels::batch_norm_forward(
            values(&flex_of(x)),
            dims[0],
            dims[2] * dims[3],
            values(&flex_of(gamma)),
            values(&flex_of(beta)),
            eps as f32,
        );
        let t = |v: Vec<f32>, shape: &[usize]| TensorPrimitive::Float(flex_from(v, shape));
        (Tensor::from_primitive(t(y, &dims)), Tensor::from_primitive(t(mean, &[c])), Tensor::from_primitive(t(var, &[c])))
    }

    fn probabilities(logits: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let [n, c] = logits.dims();
        let p = kernels::softmax_rows(values(&flex_of(logits)), c);
        Tensor::from_primitive(TensorPrimitive::Float(flex_from(p, &[n, c])))
    }
}

pub(super) fn conv1x1_shape(x: [usize; 4], weight: [usize; 4]) -> Conv1x1Shape {
    assert!(weight[1] == x[1] && weight[2] == 1 && weight[3] == 1, "conv1x1: weight {weight:?} does not fit input {x:?}");
    Conv1x1Shape { batch: x[0], in_channels: x[1], out_channels: weight[0], plane: x[2] * x[3] }
}

#[derive(Debug)]
struct Conv3x3Backward;

#[derive(Debug, Clone)]
struct Conv3x3State {
    shape: Conv3x3Shape,
    x: FlexTensor,
    weight: FlexTensor,
    /// The forward output: the ReLU's gradient needs only its sign.
    out: FlexTensor,
    with_relu: bool,
}

impl Backward<Flex, 3> for Conv3x3Backward {
    type State = Conv3x3State;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let st = ops.state;
        let s = st.shape;
        // Parameters that are not tracked (Grad-CAM's model) need no gradient: skip its work.
        let want_params = node_weight.is_some() || node_bias.is_some();
        let g = kernels::conv3x3_backward(
            s,
            values(&st.x),
            values(&st.weight),
            values(&st.out),
            st.with_relu,
            values(&grad),
            node_x.is_some(),
            want_params,
        );
        if let (Some(node), Some(dx)) = (node_x, g.x) {
            grads.register::<Flex>(node.id, flex_from(dx, &[s.batch, s.in_channels, s.height, s.width]));
        }
        register(grads, node_weight.map(|n| n.id), g.weight, &[s.out_channels, s.in_channels, 3, 3]);
        register(grads, node_bias.map(|n| n.id), g.bias, &[s.out_channels]);
    }
}

#[derive(Debug)]
struct MaxPool2x2Backward;

#[derive(Debug, Clone)]
struct MaxPool2x2State {
    /// Which input of each window won (see `max_pool2x2_forward`).
    winners: Arc<Vec<u8>>,
    dims: [usize; 4],
}

impl Backward<Flex, 1> for MaxPool2x2Backward {
    type State = MaxPool2x2State;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        if let Some(node) = node_x {
            let [n, c, h, w] = ops.state.dims;
            let dx = kernels::max_pool2x2_backward(values(&grad), &ops.state.winners, n * c, h, w);
            grads.register::<Flex>(node.id, flex_from(dx, &ops.state.dims));
        }
    }
}

impl FastOps for Autodiff<Flex> {
    fn conv3x3(x: Tensor<Self, 4>, weight: Tensor<Self, 4>, bias: Tensor<Self, 1>, with_relu: bool) -> Tensor<Self, 4> {
        let s = conv_shape(x.dims(), weight.dims());
        let (x, weight, bias) = (x.into_primitive().tensor(), weight.into_primitive().tensor(), bias.into_primitive().tensor());
        let (xv, wv, bv) = (x.primitive.to_contiguous(), weight.primitive.to_contiguous(), bias.primitive.to_contiguous());
        let out = conv3x3_flex(s, &xv, &wv, &bv, with_relu);
        let tracked = match Conv3x3Backward
            .prepare::<NoCheckpointing>([x.node.clone(), weight.node.clone(), bias.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(Conv3x3State { shape: s, x: xv, weight: wv, out: out.clone(), with_relu }, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(tracked))
    }

    fn max_pool2x2(x: Tensor<Self, 4>) -> Tensor<Self, 4> {
        let dims = x.dims();
        let x = x.into_primitive().tensor();
        let (out, winners) = max_pool2x2_flex(&x.primitive.to_contiguous(), dims);
        let tracked = match MaxPool2x2Backward.prepare::<NoCheckpointing>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(MaxPool2x2State { winners: Arc::new(winners), dims }, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(tracked))
    }

    fn conv1x1(x: Tensor<Self, 4>, weight: Tensor<Self, 4>) -> Tensor<Self, 4> {
        let [n, _, h, w] = x.dims();
        let s = conv1x1_shape(x.dims(), weight.dims());
        let (x, weight) = (x.into_primitive().tensor(), weight.into_primitive().tensor());
        let (xv, wv) = (x.primitive.to_contiguous(), weight.primitive.to_contiguous());
        let out = flex_from(kernels::conv1x1_forward(s, values(&xv), values(&wv)), &[n, s.out_channels, h, w]);
        let tracked = match Conv1x1Backward.prepare::<NoCheckpointing>([x.node.clone(), weight.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(Conv1x1State { shape: s, x: xv, weight: wv, x_dims: [n, s.in_channels, h, w] }, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(tracked))
    }

    fn gap_linear(x: Tensor<Self, 4>, weight: Tensor<Self, 2>, bias: Tensor<Self, 1>) -> Tensor<Self, 2> {
        let [n, k, h, w] = x.dims();
        let o = bias.dims()[0];
        let (x, weight, bias) = (x.into_primitive().tensor(), weight.into_primitive().tensor(), bias.into_primitive().tensor());
        let wv = weight.primitive.to_contiguous();
        let (gap, logits) = kernels::gap_linear_forward(
            values(&x.primitive.to_contiguous()),
            n,
            k,
            h * w,
            values(&wv),
            values(&bias.primitive.to_contiguous()),
        );
        let out = flex_from(logits, &[n, o]);
        let tracked = match GapLinearBackward
            .prepare::<NoCheckpointing>([x.node.clone(), weight.node.clone(), bias.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(GapLinearState { gap: Arc::new(gap), weight: wv, x_dims: [n, k, h, w], outputs: o }, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(tracked))
    }

    fn cross_entropy(logits: Tensor<Self, 2>, targets: &[usize], weights: Option<&[f32]>) -> Tensor<Self, 1> {
        let dims = logits.dims();
        let logits = logits.into_primitive().tensor();
        let (loss, grad) = kernels::cross_entropy(values(&logits.primitive.to_contiguous()), dims[1], targets, weights);
        let out = flex_from(vec![loss], &[1]);
        let tracked = match CrossEntropyBackward.prepare::<NoCheckpointing>([logits.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(CrossEntropyState { grad: Arc::new(grad), dims }, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(tracked))
    }

    fn batch_norm_train(
        x: Tensor<Self, 4>,
        gamma: Tensor<Self, 1>,
        beta: Tensor<Self, 1>,
        eps: f64,
    ) -> (Tensor<Self, 4>, Tensor<Self, 1>, Tensor<Self, 1>) {
        let dims = x.dims();
        let c = dims[1];
        let (x, gamma, beta) = (x.into_primitive().tensor(), gamma.into_primitive().tensor(), beta.into_primitive().tensor());
        let (xv, gv) = (x.primitive.to_contiguous(), gamma.primitive.to_contiguous());
        let (y, mean, var) = kernels::batch_norm_forward(
            values(&xv),
            dims[0],
            dims[2] * dims[3],
            values(&gv),
            values(&beta.primitive.to_contiguous()),
            eps as f32,
        );
        let out = flex_from(y, &dims);
        let state = BatchNormState { x: xv, gamma: gv, mean: Arc::new(mean.clone()), var: Arc::new(var.clone()), eps: eps as f32, dims };
        let tracked = match BatchNormBackward
            .prepare::<NoCheckpointing>([x.node.clone(), gamma.node.clone(), beta.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        let stat = |v: Vec<f32>| Tensor::from_inner(Tensor::from_primitive(TensorPrimitive::Float(flex_from(v, &[c]))));
        (Tensor::from_primitive(TensorPrimitive::Float(tracked)), stat(mean), stat(var))
    }

    /// Computed on the inner backend and returned untracked: probabilities are read, never
    /// differentiated.
    fn probabilities(logits: Tensor<Self, 2>) -> Tensor<Self, 2> {
        Tensor::from_inner(Flex::probabilities(logits.inner()))
    }
}

#[derive(Debug)]
struct Conv1x1Backward;

#[derive(Debug, Clone)]
struct Conv1x1State {
    shape: Conv1x1Shape,
    x: FlexTensor,
    weight: FlexTensor,
    x_dims: [usize; 4],
}

impl Backward<Flex, 2> for Conv1x1Backward {
    type State = Conv1x1State;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let st = ops.state;
        let (dx, dw) = kernels::conv1x1_backward(st.shape, values(&st.x), values(&st.weight), values(&grad), node_x.is_some());
        if let (Some(node), Some(dx)) = (node_x, dx) {
            grads.register::<Flex>(node.id, flex_from(dx, &st.x_dims));
        }
        register(grads, node_weight.map(|n| n.id), dw, &[st.shape.out_channels, st.shape.in_channels, 1, 1]);
    }
}

#[derive(Debug)]
struct BatchNormBackward;

#[derive(Debug, Clone)]
struct BatchNormState {
    x: FlexTensor,
    gamma: FlexTensor,
    mean: Arc<Vec<f32>>,
    var: Arc<Vec<f32>>,
    eps: f32,
    dims: [usize; 4],
}

impl Backward<Flex, 3> for BatchNormBackward {
    type State = BatchNormState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let st = ops.state;
        let [n, c, h, w] = st.dims;
        let (dx, dgamma, dbeta) =
            kernels::batch_norm_backward(values(&st.x), n, h * w, values(&st.gamma), &st.mean, &st.var, st.eps, values(&grad));
        register(grads, node_x.map(|n| n.id), dx, &st.dims);
        register(grads, node_gamma.map(|n| n.id), dgamma, &[c]);
        register(grads, node_beta.map(|n| n.id), dbeta, &[c]);
    }
}

#[derive(Debug)]
struct GapLinearBackward;

#[derive(Debug, Clone)]
struct GapLinearState {
    /// The pooled features [N, K].
    gap: Arc<Vec<f32>>,
    weight: FlexTensor,
    x_dims: [usize; 4],
    outputs: usize,
}

impl Backward<Flex, 3> for GapLinearBackward {
    type State = GapLinearState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let st = ops.state;
        let [_, k, h, w] = st.x_dims;
        let (dx, dw, db) = kernels::gap_linear_backward(&st.gap, h * w, values(&st.weight), values(&grad), st.outputs);
        register(grads, node_x.map(|n| n.id), dx, &st.x_dims);
        register(grads, node_weight.map(|n| n.id), dw, &[k, st.outputs]);
        register(grads, node_bias.map(|n| n.id), db, &[st.outputs]);
    }
}

#[derive(Debug)]
struct CrossEntropyBackward;

#[derive(Debug, Clone)]
struct CrossEntropyState {
    /// d loss / d logits, computed with the loss.
    grad: Arc<Vec<f32>>,
    dims: [usize; 2],
}

impl Backward<Flex, 1> for CrossEntropyBackward {
    type State = CrossEntropyState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let upstream = grads.consume::<Flex>(&ops.node).to_contiguous();
        if let Some(node) = node {
            let g = values(&upstream)[0];
            let dlogits: Vec<f32> = ops.state.grad.iter().map(|v| v * g).collect();
            grads.register::<Flex>(node.id, flex_from(dlogits, &ops.state.dims));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Ad = Autodiff<Flex>;

    fn reference(x: Tensor<Ad, 4>, w: Tensor<Ad, 4>, b: Tensor<Ad, 1>) -> Tensor<Ad, 4> {
        let y = relu(conv2d(x, w, Some(b), ConvOptions::new([1, 1], [1, 1], [1, 1], 1)));
        max_pool2d(y, [2, 2], [2, 2], [0, 0], [1, 1], false)
    }

    fn max_diff<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// The custom conv + pool layers give burn's values and gradients.
    #[test]
    fn flex_layers_agree_with_burns_operations() {
        let dev = Default::default();
        // Values from camflow's own generator: burn's RNG is process-global, and drawing from it
        // here would perturb a concurrent test's seeded initialisation.
        let mut rng = crate::ml::rng::Rng::new(3);
        let mut normal = |shape: Vec<usize>| {
            let n = shape.iter().product();
            Tensor::<Ad, 4>::from_data(TensorData::new((0..n).map(|_| rng.normal()).collect::<Vec<f32>>(), shape), &dev)
        };
        let x = normal(vec![3, 2, 6, 8]).require_grad();
        let w = normal(vec![4, 2, 3, 3]).require_grad();
        let b = normal(vec![1, 1, 1, 4]).reshape([4]).require_grad();
        let probe = normal(vec![3, 4, 3, 4]);

        let ours = Ad::max_pool2x2(Ad::conv3x3(x.clone(), w.clone(), b.clone(), true));
        let theirs = reference(x.clone(), w.clone(), b.clone());
        assert!(max_diff(ours.clone().inner(), theirs.clone().inner()) < 1e-5);

        let g_ours = (ours * probe.clone()).sum().backward();
        let (gx, gw, gb) = (x.grad(&g_ours).expect("dx"), w.grad(&g_ours).expect("dw"), b.grad(&g_ours).expect("db"));
        let g_theirs = (theirs * probe).sum().backward();
        assert!(max_diff(gx, x.grad(&g_theirs).expect("dx")) < 1e-4);
        assert!(max_diff(gw, w.grad(&g_theirs).expect("dw")) < 1e-4);
        assert!(max_diff(gb, b.grad(&g_theirs).expect("db")) < 1e-4);

        // The plain CPU backend (inference, Grad-CAM) without the ReLU.
        let (x, w, b) = (x.inner(), w.inner(), b.inner());
        let ours = Flex::max_pool2x2(Flex::conv3x3(x.clone(), w.clone(), b.clone(), false));
        let theirs = max_pool2d(conv2d(x, w, Some(b), ConvOptions::new([1, 1], [1, 1], [1, 1], 1)), [2, 2], [2, 2], [0, 0], [1, 1], false);
        assert!(max_diff(ours, theirs) < 1e-5);
    }

    fn param<const D: usize>(rng: &mut crate::ml::rng::Rng, shape: [usize; D]) -> Tensor<Ad, D> {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        Tensor::<Ad, D>::from_data(TensorData::new(v, shape.to_vec()), &Default::default()).require_grad()
    }

    /// The portable head, 1x1 conv, batch norm and loss give burn's values and gradients.
    #[test]
    fn portable_ops_agree_with_burns_operations() {
        let dev = Default::default();
        let mut rng = crate::ml::rng::Rng::new(11);
        let x = param(&mut rng, [5, 3, 4, 6]);
        let w1 = param(&mut rng, [4, 3, 1, 1]);
        let gamma = param(&mut rng, [4]);
        let beta = param(&mut rng, [4]);
        let fc_w = param(&mut rng, [4, 2]);
        let fc_b = param(&mut rng, [2]);
        let targets = [1usize, 0, 0, 1, 1];
        let class_w = [0.7f32, 1.3];

        let ours = {
            let y = Ad::conv1x1(x.clone(), w1.clone());
            let (y, mean, var) = Ad::batch_norm_train(y, gamma.clone(), beta.clone(), 1e-5);
            let logits = Ad::gap_linear(relu(y), fc_w.clone(), fc_b.clone());
            (Ad::cross_entropy(logits.clone(), &targets, Some(&class_w)), Ad::probabilities(logits), mean, var)
        };
        let theirs = {
            let y = conv2d(x.clone(), w1.clone(), None, ConvOptions::new([1, 1], [0, 0], [1, 1], 1));
            let bn = burn::nn::BatchNormConfig::new(4).init::<Ad>(&dev);
            let bn = burn::nn::BatchNorm {
                gamma: burn::module::Param::from_tensor(gamma.clone()),
                beta: burn::module::Param::from_tensor(beta.clone()),
                ..bn
            };
            let y = bn.forward(y);
            let [n, k, _, _] = y.dims();
            let gap = relu(y).mean_dim(3).mean_dim(2).reshape([n, k]);
            let logits = gap.matmul(fc_w.clone()) + fc_b.clone().reshape([1, 2]);
            let t = Tensor::<Ad, 1, Int>::from_data(TensorData::new(targets.iter().map(|&t| t as i64).collect::<Vec<_>>(), [5]), &dev);
            let loss = CrossEntropyLossConfig::new().with_weights(Some(class_w.to_vec())).init(&dev).forward(logits.clone(), t);
            // burn's running mean after one step from zero is momentum * batch mean.
            (loss, softmax(logits, 1), bn.running_mean.value_sync().div_scalar(0.1))
        };
        assert!(max_diff(ours.0.clone().inner(), theirs.0.clone().inner()) < 1e-5);
        assert!(max_diff(ours.1.inner(), theirs.1.inner()) < 1e-6);
        let d = max_diff(ours.2.clone().inner(), theirs.2.clone().inner());
        assert!(d < 1e-5, "running mean: {d} {} {}", ours.2.inner(), theirs.2.inner());
        assert!(ours.3.inner().min().into_scalar() >= 0.0);
        let (g_ours, g_theirs) = (ours.0.backward(), theirs.0.backward());
        for (what, p) in [("x", &x), ("w1", &w1)] {
            assert!(max_diff(p.grad(&g_ours).expect(what), p.grad(&g_theirs).expect(what)) < 1e-4, "{what}");
        }
        for (what, p) in [("gamma", &gamma), ("beta", &beta), ("fc_b", &fc_b)] {
            assert!(max_diff(p.grad(&g_ours).expect(what), p.grad(&g_theirs).expect(what)) < 1e-4, "{what}");
        }
        assert!(max_diff(fc_w.grad(&g_ours).expect("fc_w"), fc_w.grad(&g_theirs).expect("fc_w")) < 1e-4);
    }
}
