//! A backend extension for the layers a CNN step spends its time in: 3x3 convolution with bias
//! and optional ReLU, and 2x2 max pooling.
//!
//! Every backend gets burn's own operations by default. The CPU backend (flex) and its autodiff
//! wrapper override them with [`super::cpu_kernels`]: the autodiff version registers one
//! backward step per layer whose gradients come from those kernels, instead of burn's chain of
//! conv + ReLU nodes (why: BENCHMARKS.md). The CUDA backend keeps burn's kernels.
//!
//! Models are generic over [`FastOps`]; training and Grad-CAM over [`TrainBackend`].

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::relu;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};

use super::cpu_kernels::{self as kernels, Conv3x3Shape};

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
}

/// What training and Grad-CAM need: an autodiff backend whose inner backend has [`FastOps`] too.
pub trait TrainBackend: AutodiffBackend<InnerBackend: FastOps> + FastOps {}
impl<B: AutodiffBackend<InnerBackend: FastOps> + FastOps> TrainBackend for B {}

#[cfg(feature = "cuda")]
impl FastOps for burn::backend::Cuda {}
#[cfg(feature = "cuda")]
impl FastOps for Autodiff<burn::backend::Cuda> {}

fn flex_of<const D: usize>(t: Tensor<Flex, D>) -> FlexTensor {
    t.into_primitive().tensor().to_contiguous()
}

fn values(t: &FlexTensor) -> &[f32] {
    // Every tensor camflow builds is f32; anything else is a bug, caught by `dispatch`.
    t.as_slice::<f32>().expect("camflow's CPU kernels take contiguous f32 tensors")
}

fn flex_from(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

fn conv_shape(x: [usize; 4], weight: [usize; 4]) -> Conv3x3Shape {
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
        let g =
            kernels::conv3x3_backward(s, values(&st.x), values(&st.weight), values(&st.out), st.with_relu, values(&grad), node_x.is_some());
        if let (Some(node), Some(dx)) = (node_x, g.x) {
            grads.register::<Flex>(node.id, flex_from(dx, &[s.batch, s.in_channels, s.height, s.width]));
        }
        if let Some(node) = node_weight {
            grads.register::<Flex>(node.id, flex_from(g.weight, &[s.out_channels, s.in_channels, 3, 3]));
        }
        if let Some(node) = node_bias {
            grads.register::<Flex>(node.id, flex_from(g.bias, &[s.out_channels]));
        }
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
}
