//! Hand-written CPU kernels for the two layers that dominate a CNN step here: the 3x3
//! convolution (stride 1, padding 1, bias, optional fused ReLU) and the 2x2 max pool.
//!
//! Why they exist: burn 0.21's flex backend computes a convolution's *weight* gradient as a
//! second convolution whose kernel is the whole output-gradient map, and its ReLU and pool
//! backward passes each allocate and sweep full tensors; together that made a vgg-small step
//! 4.5x slower than PyTorch (BENCHMARKS.md). Here every convolution pass is im2col + one GEMM per
//! image ([`portable_gemm`], whose bits do not depend on the CPU):
//!
//! - forward:         out_n[Co, HW]  = W[Co, K] . col_n[K, HW] + b   (K = Cin*9)
//! - weight gradient: dW[Co, K]     += g_n[Co, HW] . col_n^T
//! - input gradient:  dcol_n[K, HW]  = W^T . g_n, scattered back by col2im
//!
//! where g is the output gradient masked by the ReLU (out > 0).
//!
//! Determinism: the images of a batch are cut into a number of chunks that depends only on the
//! batch size; each chunk's weight gradient is accumulated in image order and the chunks are
//! summed in chunk order, so the bytes do not depend on the rayon thread count.
//!
//! Portability: every sum here runs in a fixed order with separate multiplies and adds (no FMA,
//! no CPU-chosen blocking or vector width), and exponentials come from `libm`, so the bytes are
//! the same on any x86_64 CPU. Besides the convolutions this holds the other reductions a
//! training step needs (the pooled linear head, cross-entropy, softmax, the 1x1 shortcut conv),
//! which burn's flex backend would otherwise vectorise at a width chosen per CPU.
//!
//! Layouts are NCHW, contiguous, f32. These functions know nothing of burn.

use portable_gemm::{PackedA, gemm_packed};
use rayon::prelude::*;

/// The weight gradient is reduced over at most this many chunks of images (see module docs).
const GRAD_CHUNKS: usize = 8;

/// The shape of one 3x3 same-padding convolution over a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv3x3Shape {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Conv3x3Shape {
    fn plane(&self) -> usize {
        self.height * self.width
    }
    fn input_len(&self) -> usize {
        self.in_channels * self.plane()
    }
    fn output_len(&self) -> usize {
        self.out_channels * self.plane()
    }
    /// Rows of the im2col matrix (and columns of the weight matrix).
    fn k(&self) -> usize {
        self.in_channels * 9
    }
}

pub mod portable_gemm;

/// A read-only matrix view: element (i, j) lives at `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl MatRef<'_> {
    fn fits(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < self.data.len()
    }
}

/// `dst[m x n, row-major] = (accumulate ? dst : 0) + a . b`, single-threaded (callers
/// parallelise over images, which keeps the summation order fixed). See [`portable_gemm`].
fn gemm(dst: &mut [f32], a: MatRef, b: MatRef, accumulate: bool) {
    portable_gemm::gemm(dst, a, b, accumulate);
}

/// The source index range of a row shifted by `d` in {-1, 0, 1} with zero padding: output
/// positions `dst` take input positions `dst + d`.
fn shifted(d: isize, len: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    match d {
        -1 => (1..len, 0..len.saturating_sub(1)),
        1 => (0..len.saturating_sub(1), 1..len),
        _ => (0..len, 0..len),
    }
}

/// col[(ci*9 + kh*3 + kw), oh*W + ow] = x[ci, oh+kh-1, ow+kw-1], zero outside the image.
fn im2col(x: &[f32], channels: usize, h: usize, w: usize, col: &mut [f32]) {
    let plane = h * w;
    for ci in 0..channels {
        let src = &x[ci * plane..(ci + 1) * plane];
        for kh in 0..3 {
            for kw in 0..3 {
                let row = &mut col[(ci * 9 + kh * 3 + kw) * plane..][..plane];
                let (dst_cols, src_cols) = shifted(kw as isize - 1, w);
                for oh in 0..h {
                    let out = &mut row[oh * w..(oh + 1) * w];
                    let ih = oh as isize + kh as isize - 1;
                    if ih < 0 || ih >= h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let ih = ih as usize;
                    out[dst_cols.clone()].copy_from_slice(&src[ih * w..][src_cols.clone()]);
                    // Only the one padded column (if any) is left to zero.
                    if dst_cols.start > 0 {
                        out[0] = 0.0;
                    }
                    if dst_cols.end < w {
                        out[w - 1] = 0.0;
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`], added into `dx`: dx[ci, ih, iw] += the col entries that read it.
fn col2im_add(col: &[f32], channels: usize, h: usize, w: usize, dx: &mut [f32]) {
    let plane = h * w;
    for ci in 0..channels {
        let dst = &mut dx[ci * plane..(ci + 1) * plane];
        for kh in 0..3 {
            for kw in 0..3 {
                let row = &col[(ci * 9 + kh * 3 + kw) * plane..][..plane];
                let (col_cols, dx_cols) = shifted(kw as isize - 1, w);
                for oh in 0..h {
                    let ih = oh as isize + kh as isize - 1;
                    if ih < 0 || ih >= h as isize {
                        continue;
                    }
                    let ih = ih as usize;
                    let from = &row[oh * w..][col_cols.clone()];
                    let to = &mut dst[ih * w..][dx_cols.clone()];
                    for (t, f) in to.iter_mut().zip(from) {
                        *t += f;
                    }
                }
            }
        }
    }
}

/// `relu(conv3x3(x, weight) + bias)` (or without the ReLU), NCHW in and out.
/// `weight` is [Co, Cin, 3, 3], `bias` [Co].
pub fn conv3x3_forward(s: Conv3x3Shape, x: &[f32], weight: &[f32], bias: &[f32], relu: bool) -> Vec<f32> {
    let mut out = vec![0f32; s.batch * s.output_len()];
    conv3x3_forward_into(s, x, weight, bias, relu, &mut out);
    out
}

/// [`conv3x3_forward`] into `out` (every element is written): a stack of models writes each
/// member's output straight into its part of the stacked tensor.
pub fn conv3x3_forward_into(s: Conv3x3Shape, x: &[f32], weight: &[f32], bias: &[f32], relu: bool, out: &mut [f32]) {
    assert!(x.len() == s.batch * s.input_len() && weight.len() == s.out_channels * s.k() && bias.len() == s.out_channels);
    assert!(out.len() == s.batch * s.output_len());
    if out.is_empty() {
        return;
    }
    let (plane, k) = (s.plane(), s.k());
    // The weights are packed once for every image.
    let w = PackedA::new(MatRef { data: weight, rows: s.out_channels, cols: k, row_stride: k, col_stride: 1 });
    out.par_chunks_mut(s.output_len()).zip(x.par_chunks(s.input_len().max(1))).for_each_init(
        || vec![0f32; k * plane],
        |col, (out_n, x_n)| {
            im2col(x_n, s.in_channels, s.height, s.width, col);
            for (row, &b) in out_n.chunks_mut(plane).zip(bias) {
                row.fill(b);
            }
            gemm_packed(out_n, &w, MatRef { data: col, rows: k, cols: plane, row_stride: plane, col_stride: 1 }, true);
            if relu {
                for v in out_n.iter_mut() {
                    *v = v.max(0.0);
                }
            }
        },
    );
}

/// Gradients of [`conv3x3_forward`].
pub struct Conv3x3Grads {
    /// d loss / d x, when asked for.
    pub x: Option<Vec<f32>>,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// Backward pass of [`conv3x3_forward`]. `out` is the forward output (post-ReLU when `relu`),
/// which is all the ReLU's gradient needs; `grad` is d loss / d out. The weight and bias
/// gradients are empty unless `want_params` (Grad-CAM needs only d x: skipping them leaves
/// d x's bits as they are).
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_backward(
    s: Conv3x3Shape,
    x: &[f32],
    weight: &[f32],
    out: &[f32],
    relu: bool,
    grad: &[f32],
    want_x: bool,
    want_params: bool,
) -> Conv3x3Grads {
    let mut dx = if want_x { vec![0f32; x.len()] } else { Vec::new() };
    let (weight, bias) = conv3x3_backward_into(s, x, weight, out, relu, grad, want_x.then_some(&mut dx[..]), want_params);
    Conv3x3Grads { x: want_x.then_some(dx), weight, bias }
}

/// [`conv3x3_backward`] writing d loss / d x into `dx` when given (which must hold zeros: the
/// input gradient is accumulated into it), returning the weight and bias gradients (empty
/// unless `want_params`).
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_backward_into(
    s: Conv3x3Shape,
    x: &[f32],
    weight: &[f32],
    out: &[f32],
    relu: bool,
    grad: &[f32],
    dx: Option<&mut [f32]>,
    want_params: bool,
) -> (Vec<f32>, Vec<f32>) {
    let (plane, k, in_len, out_len) = (s.plane(), s.k(), s.input_len(), s.output_len());
    assert!(x.len() == s.batch * in_len && out.len() == s.batch * out_len && grad.len() == out.len());
    assert!(dx.as_ref().is_none_or(|d| d.len() == x.len()));
    let per_chunk = s.batch.div_ceil(GRAD_CHUNKS).max(1);
    let want_x = dx.is_some();
    let dx = dx.unwrap_or_default();
    let dx_chunks: Vec<Option<&mut [f32]>> = if want_x && !dx.is_empty() {
        dx.chunks_mut(per_chunk * in_len).map(Some).collect()
    } else {
        (0..s.batch.div_ceil(per_chunk)).map(|_| None).collect()
    };
    let w_t = want_x.then(|| PackedA::new(MatRef { data: weight, rows: k, cols: s.out_channels, row_stride: 1, col_stride: k }));
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx_chunks
        .into_par_iter()
        .enumerate()
        .map(|(c, mut dx_chunk)| {
            let (mut dw, mut db, mut col) = if want_params {
                (vec![0f32; s.out_channels * k], vec![0f32; s.out_channels], vec![0f32; k * plane])
            } else {
                (Vec::new(), Vec::new(), Vec::new())
            };
            let mut g = vec![0f32; out_len];
            let mut dcol = if want_x { vec![0f32; k * plane] } else { Vec::new() };
            let images = (c * per_chunk)..((c + 1) * per_chunk).min(s.batch);
            for (j, n) in images.enumerate() {
                let grad_n = &grad[n * out_len..(n + 1) * out_len];
                if relu {
                    let out_n = &out[n * out_len..(n + 1) * out_len];
                    for ((gv, &d), &o) in g.iter_mut().zip(grad_n).zip(out_n) {
                        *gv = if o > 0.0 { d } else { 0.0 };
                    }
                } else {
                    g.copy_from_slice(grad_n);
                }
                let g_mat = MatRef { data: &g, rows: s.out_channels, cols: plane, row_stride: plane, col_stride: 1 };
                if want_params {
                    for (b, row) in db.iter_mut().zip(g.chunks(plane)) {
                        *b += row.iter().sum::<f32>();
                    }
                    im2col(&x[n * in_len..(n + 1) * in_len], s.in_channels, s.height, s.width, &mut col);
                    let col_t = MatRef { data: &col, rows: plane, cols: k, row_stride: 1, col_stride: plane };
                    gemm(&mut dw, g_mat, col_t, true);
                }
                if let (Some(dx_chunk), Some(w_t)) = (dx_chunk.as_deref_mut(), &w_t) {
                    gemm_packed(&mut dcol, w_t, g_mat, false);
                    // `dx` starts zeroed and each image's slice is written by this call only.
                    col2im_add(&dcol, s.in_channels, s.height, s.width, &mut dx_chunk[j * in_len..(j + 1) * in_len]);
                }
            }
            (dw, db)
        })
        .collect();
    if !want_params {
        return (Vec::new(), Vec::new());
    }
    let mut weight_grad = vec![0f32; s.out_channels * k];
    let mut bias_grad = vec![0f32; s.out_channels];
    for (dw, db) in &partials {
        weight_grad.iter_mut().zip(dw).for_each(|(a, b)| *a += b);
        bias_grad.iter_mut().zip(db).for_each(|(a, b)| *a += b);
    }
    (weight_grad, bias_grad)
}

/// 2x2 max pool with stride 2 over `planes` planes of `h x w` (odd edges dropped, as burn and
/// PyTorch do). Returns the pooled values and, per output, which of the four inputs won
/// (row-major within the window; the first maximum on ties).
pub fn max_pool2x2_forward(x: &[f32], planes: usize, h: usize, w: usize) -> (Vec<f32>, Vec<u8>) {
    let (oh, ow) = (h / 2, w / 2);
    assert_eq!(x.len(), planes * h * w);
    let mut out = vec![0f32; planes * oh * ow];
    let mut arg = vec![0u8; out.len()];
    if out.is_empty() {
        return (out, arg);
    }
    out.par_chunks_mut(oh * ow).zip(arg.par_chunks_mut(oh * ow)).zip(x.par_chunks(h * w)).for_each(|((o, a), p)| {
        for i in 0..oh {
            let (top, bottom) = (&p[2 * i * w..], &p[(2 * i + 1) * w..]);
            for j in 0..ow {
                let cands = [top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]];
                let mut best = 0;
                for (c, &v) in cands.iter().enumerate().skip(1) {
                    if v > cands[best] {
                        best = c;
                    }
                }
                o[i * ow + j] = cands[best];
                a[i * ow + j] = best as u8;
            }
        }
    });
    (out, arg)
}

/// Backward pass of [`max_pool2x2_forward`]: each output's gradient goes to the input that won.
pub fn max_pool2x2_backward(grad: &[f32], arg: &[u8], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let (oh, ow) = (h / 2, w / 2);
    assert!(grad.len() == planes * oh * ow && arg.len() == grad.len());
    let mut dx = vec![0f32; planes * h * w];
    if grad.is_empty() {
        return dx;
    }
    dx.par_chunks_mut(h * w).zip(grad.par_chunks(oh * ow)).zip(arg.par_chunks(oh * ow)).for_each(|((d, g), a)| {
        for i in 0..oh {
            for j in 0..ow {
                let winner = a[i * ow + j] as usize;
                d[(2 * i + winner / 2) * w + 2 * j + winner % 2] = g[i * ow + j];
            }
        }
    });
    dx
}

/// The network's head: global average pooling of `x` [n, k, hw] then a linear layer,
/// `logits[i, o] = sum_c gap[i, c] * weight[c, o] + bias[o]` (weight as burn's `Linear`:
/// [k, outputs]). Returns (gap [n, k], logits [n, outputs]). Every sum runs in index order in
/// plain scalar code: these are the reductions burn's flex backend vectorises at a width chosen
/// per CPU.
pub fn gap_linear_forward(x: &[f32], n: usize, k: usize, hw: usize, weight: &[f32], bias: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let outputs = bias.len();
    assert!(x.len() == n * k * hw && weight.len() == k * outputs && hw > 0);
    let gap: Vec<f32> = x.chunks(hw).map(|plane| plane.iter().fold(0f32, |s, &v| s + v) / hw as f32).collect();
    let mut logits = vec![0f32; n * outputs];
    for (i, row) in logits.chunks_mut(outputs.max(1)).enumerate().take(n) {
        for (o, l) in row.iter_mut().enumerate() {
            let dot = (0..k).fold(0f32, |s, c| s + gap[i * k + c] * weight[c * outputs + o]);
            *l = dot + bias[o];
        }
    }
    (gap, logits)
}

/// Gradients of [`gap_linear_forward`] given d loss / d logits `grad` [n, outputs]:
/// (dx [n, k, hw], d weight [k, outputs], d bias [outputs]).
pub fn gap_linear_backward(gap: &[f32], hw: usize, weight: &[f32], grad: &[f32], outputs: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let k = weight.len() / outputs.max(1);
    let n = gap.len() / k.max(1);
    assert!(gap.len() == n * k && grad.len() == n * outputs && hw > 0);
    let mut dweight = vec![0f32; k * outputs];
    for c in 0..k {
        for o in 0..outputs {
            dweight[c * outputs + o] = (0..n).fold(0f32, |s, i| s + gap[i * k + c] * grad[i * outputs + o]);
        }
    }
    let dbias: Vec<f32> = (0..outputs).map(|o| (0..n).fold(0f32, |s, i| s + grad[i * outputs + o])).collect();
    let mut dx = vec![0f32; n * k * hw];
    for i in 0..n {
        for c in 0..k {
            let dgap = (0..outputs).fold(0f32, |s, o| s + grad[i * outputs + o] * weight[c * outputs + o]);
            dx[(i * k + c) * hw..(i * k + c + 1) * hw].fill(dgap / hw as f32);
        }
    }
    (dx, dweight, dbias)
}

/// Row-wise softmax of `logits` [n, classes] with the pure-Rust `libm` exponential (the
/// platform's `expf` has CPU-specific variants).
pub fn softmax_rows(logits: &[f32], classes: usize) -> Vec<f32> {
    let mut out = vec![0f32; logits.len()];
    for (row, o) in logits.chunks(classes.max(1)).zip(out.chunks_mut(classes.max(1))) {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        for (e, &v) in o.iter_mut().zip(row) {
            *e = libm::expf(v - max);
        }
        let sum = o.iter().fold(0f32, |s, &e| s + e);
        for e in o.iter_mut() {
            *e /= sum;
        }
    }
    out
}

/// Cross-entropy of `logits` [n, classes] against class indices `targets`, optionally weighted
/// per class as burn's `CrossEntropyLoss` does (`sum w_y * nll / sum w_y`; else the mean nll).
/// Returns the loss and its gradient d loss / d logits. Exponentials and logarithms come from
/// `libm`, sums run in index order.
pub fn cross_entropy(logits: &[f32], classes: usize, targets: &[usize], weights: Option<&[f32]>) -> (f32, Vec<f32>) {
    let n = targets.len();
    assert!(logits.len() == n * classes && targets.iter().all(|&t| t < classes));
    assert!(weights.is_none_or(|w| w.len() == classes));
    let weight_of = |t: usize| weights.map_or(1f32, |w| w[t]);
    let total = targets.iter().fold(0f32, |s, &t| s + weight_of(t));
    let probs = softmax_rows(logits, classes);
    let mut loss = 0f32;
    let mut grad = vec![0f32; logits.len()];
    for (i, &t) in targets.iter().enumerate() {
        let row = &logits[i * classes..(i + 1) * classes];
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + libm::logf(row.iter().fold(0f32, |s, &v| s + libm::expf(v - max)));
        loss += weight_of(t) * (lse - row[t]);
        let scale = weight_of(t) / total;
        for (j, g) in grad[i * classes..(i + 1) * classes].iter_mut().enumerate() {
            let p = probs[i * classes + j];
            *g = scale * if j == t { p - 1.0 } else { p };
        }
    }
    (loss / total, grad)
}

/// Batch normalisation with batch statistics (training mode) over `x` [n, c, hw]:
/// `y = (x - mean) / sqrt(var + eps) * gamma + beta` per channel, with the biased variance, as
/// burn's `BatchNorm` computes it. Returns (y, mean [c], var [c]); sums run in index order.
pub fn batch_norm_forward(x: &[f32], n: usize, hw: usize, gamma: &[f32], beta: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = gamma.len();
    assert!(x.len() == n * c * hw && beta.len() == c && n * hw > 0);
    let count = (n * hw) as f32;
    let planes = |ch: usize| (0..n).map(move |i| (i * c + ch) * hw..(i * c + ch + 1) * hw);
    let mut y = vec![0f32; x.len()];
    let (mut means, mut vars) = (vec![0f32; c], vec![0f32; c]);
    for ch in 0..c {
        let mean = planes(ch).fold(0f32, |s, r| x[r].iter().fold(s, |s, &v| s + v)) / count;
        let var = planes(ch).fold(0f32, |s, r| x[r].iter().fold(s, |s, &v| s + (v - mean) * (v - mean))) / count;
        let std = (var + eps).sqrt();
        for r in planes(ch) {
            for (o, &v) in y[r.clone()].iter_mut().zip(&x[r]) {
                *o = (v - mean) / std * gamma[ch] + beta[ch];
            }
        }
        (means[ch], vars[ch]) = (mean, var);
    }
    (y, means, vars)
}

/// Gradients of [`batch_norm_forward`] given d loss / d y: (dx, d gamma, d beta).
pub fn batch_norm_backward(
    x: &[f32],
    n: usize,
    hw: usize,
    gamma: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f32,
    grad: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = gamma.len();
    assert!(x.len() == n * c * hw && grad.len() == x.len() && mean.len() == c && var.len() == c);
    let count = (n * hw) as f32;
    let planes = |ch: usize| (0..n).map(move |i| (i * c + ch) * hw..(i * c + ch + 1) * hw);
    let mut dx = vec![0f32; x.len()];
    let (mut dgamma, mut dbeta) = (vec![0f32; c], vec![0f32; c]);
    for ch in 0..c {
        let std = (var[ch] + eps).sqrt();
        let xhat = |v: f32| (v - mean[ch]) / std;
        let (mut sg, mut sgx) = (0f32, 0f32);
        for r in planes(ch) {
            for (&g, &v) in grad[r.clone()].iter().zip(&x[r]) {
                sg = sg + g;
                sgx = sgx + g * xhat(v);
            }
        }
        let scale = gamma[ch] / std;
        for r in planes(ch) {
            for ((d, &g), &v) in dx[r.clone()].iter_mut().zip(&grad[r.clone()]).zip(&x[r]) {
                *d = scale * (g - sg / count - xhat(v) * (sgx / count));
            }
        }
        (dgamma[ch], dbeta[ch]) = (sgx, sg);
    }
    (dx, dgamma, dbeta)
}

/// The shape of one 1x1 convolution without bias (a resnet shortcut) over a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv1x1Shape {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Height x width.
    pub plane: usize,
}

/// `out_n[Co, HW] = W[Co, Cin] . x_n[Cin, HW]` per image.
pub fn conv1x1_forward(s: Conv1x1Shape, x: &[f32], weight: &[f32]) -> Vec<f32> {
    let (in_len, out_len) = (s.in_channels * s.plane, s.out_channels * s.plane);
    assert!(x.len() == s.batch * in_len && weight.len() == s.out_channels * s.in_channels);
    let mut out = vec![0f32; s.batch * out_len];
    if out.is_empty() {
        return out;
    }
    let w = MatRef { data: weight, rows: s.out_channels, cols: s.in_channels, row_stride: s.in_channels, col_stride: 1 };
    out.par_chunks_mut(out_len).zip(x.par_chunks(in_len.max(1))).for_each(|(o, x_n)| {
        let xm = MatRef { data: x_n, rows: s.in_channels, cols: s.plane, row_stride: s.plane, col_stride: 1 };
        gemm(o, w, xm, false);
    });
    out
}

/// Gradients of [`conv1x1_forward`]: (dx when asked for, d weight). The weight gradient is
/// reduced over image chunks fixed by the batch size, as in [`conv3x3_backward`].
pub fn conv1x1_backward(s: Conv1x1Shape, x: &[f32], weight: &[f32], grad: &[f32], want_x: bool) -> (Option<Vec<f32>>, Vec<f32>) {
    let (in_len, out_len) = (s.in_channels * s.plane, s.out_channels * s.plane);
    assert!(x.len() == s.batch * in_len && grad.len() == s.batch * out_len && weight.len() == s.out_channels * s.in_channels);
    let per_chunk = s.batch.div_ceil(GRAD_CHUNKS).max(1);
    let mut dx = if want_x { vec![0f32; x.len()] } else { Vec::new() };
    let dx_chunks: Vec<Option<&mut [f32]>> = if want_x && !dx.is_empty() {
        dx.chunks_mut(per_chunk * in_len).map(Some).collect()
    } else {
        (0..s.batch.div_ceil(per_chunk)).map(|_| None).collect()
    };
    let w_t = MatRef { data: weight, rows: s.in_channels, cols: s.out_channels, row_stride: 1, col_stride: s.in_channels };
    let partials: Vec<Vec<f32>> = dx_chunks
        .into_par_iter()
        .enumerate()
        .map(|(c, mut dx_chunk)| {
            let mut dw = vec![0f32; s.out_channels * s.in_channels];
            for (j, n) in ((c * per_chunk)..((c + 1) * per_chunk).min(s.batch)).enumerate() {
                let g = MatRef {
                    data: &grad[n * out_len..(n + 1) * out_len],
                    rows: s.out_channels,
                    cols: s.plane,
                    row_stride: s.plane,
                    col_stride: 1,
                };
                let x_t = MatRef {
                    data: &x[n * in_len..(n + 1) * in_len],
                    rows: s.plane,
                    cols: s.in_channels,
                    row_stride: 1,
                    col_stride: s.plane,
                };
                gemm(&mut dw, g, x_t, true);
                if let Some(dx_chunk) = dx_chunk.as_deref_mut() {
                    gemm(&mut dx_chunk[j * in_len..(j + 1) * in_len], w_t, g, false);
                }
            }
            dw
        })
        .collect();
    let mut weight_grad = vec![0f32; s.out_channels * s.in_channels];
    for dw in &partials {
        weight_grad.iter_mut().zip(dw).for_each(|(a, b)| *a += b);
    }
    (want_x.then_some(dx), weight_grad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::rng::Rng;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::derive(seed, "kernels");
        (0..n).map(|_| r.uniform() * 2.0 - 1.0).collect()
    }

    /// Input, weight, bias and an output-sized probe (an upstream gradient) for shape `s`.
    fn operands(s: Conv3x3Shape, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        (
            random(s.batch * s.input_len(), seed),
            random(s.out_channels * s.k(), seed + 1),
            random(s.out_channels, seed + 2),
            random(s.batch * s.output_len(), seed + 3),
        )
    }

    /// The textbook six-loop convolution, the oracle for the GEMM version.
    fn naive_forward(s: Conv3x3Shape, x: &[f32], wt: &[f32], b: &[f32]) -> Vec<f32> {
        let (h, w) = (s.height as isize, s.width as isize);
        let mut out = vec![0f32; s.batch * s.output_len()];
        for n in 0..s.batch {
            for co in 0..s.out_channels {
                for oh in 0..h {
                    for ow in 0..w {
                        let mut acc = b[co] as f64;
                        for ci in 0..s.in_channels {
                            for kh in 0..3 {
                                for kw in 0..3 {
                                    let (ih, iw) = (oh + kh - 1, ow + kw - 1);
                                    if ih >= 0 && ih < h && iw >= 0 && iw < w {
                                        let xv = x[((n * s.in_channels + ci) * s.height + ih as usize) * s.width + iw as usize];
                                        let wv = wt[((co * s.in_channels + ci) * 3 + kh as usize) * 3 + kw as usize];
                                        acc += (xv * wv) as f64;
                                    }
                                }
                            }
                        }
                        out[((n * s.out_channels + co) * s.height + oh as usize) * s.width + ow as usize] = acc as f32;
                    }
                }
            }
        }
        out
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn forward_matches_naive_convolution() {
        for s in [
            Conv3x3Shape { batch: 3, in_channels: 1, out_channels: 4, height: 5, width: 7 },
            Conv3x3Shape { batch: 2, in_channels: 3, out_channels: 5, height: 1, width: 4 },
            Conv3x3Shape { batch: 1, in_channels: 6, out_channels: 2, height: 8, width: 8 },
        ] {
            let (x, wt, b, _) = operands(s, 1);
            let expected = naive_forward(s, &x, &wt, &b);
            assert!(max_diff(&conv3x3_forward(s, &x, &wt, &b, false), &expected) < 1e-5, "{s:?}");
            let relu: Vec<f32> = expected.iter().map(|v| v.max(0.0)).collect();
            assert!(max_diff(&conv3x3_forward(s, &x, &wt, &b, true), &relu) < 1e-5, "{s:?}");
        }
    }

    /// Every gradient against central finite differences of loss = sum(out * probe).
    #[test]
    fn backward_matches_finite_differences() {
        let s = Conv3x3Shape { batch: 3, in_channels: 2, out_channels: 3, height: 4, width: 5 };
        let (x, wt, b, probe) = operands(s, 4);
        for relu in [false, true] {
            let loss = |x: &[f32], wt: &[f32], b: &[f32]| -> f64 {
                conv3x3_forward(s, x, wt, b, relu).iter().zip(&probe).map(|(o, p)| (*o as f64) * (*p as f64)).sum()
            };
            let out = conv3x3_forward(s, &x, &wt, &b, relu);
            let g = conv3x3_backward(s, &x, &wt, &out, relu, &probe, true, true);
            // Without the parameters' gradients, d x is the same bits.
            let only_x = conv3x3_backward(s, &x, &wt, &out, relu, &probe, true, false);
            assert!(only_x.x == g.x && only_x.weight.is_empty() && only_x.bias.is_empty());
            // Central differences of `f` around `v`, one coordinate at a time, against `analytic`.
            let check = |what: &str, v: &[f32], analytic: &[f32], f: &dyn Fn(&[f32]) -> f64| {
                let eps = 1e-2f32;
                for (i, a) in analytic.iter().enumerate() {
                    let (mut up, mut down) = (v.to_vec(), v.to_vec());
                    up[i] += eps;
                    down[i] -= eps;
                    let numeric = ((f(&up) - f(&down)) / (2.0 * eps as f64)) as f32;
                    assert!((numeric - a).abs() < 2e-2, "{what}[{i}] relu={relu}: {numeric} vs {a}");
                }
            };
            check("dx", &x, g.x.as_deref().expect("asked for dx"), &|v| loss(v, &wt, &b));
            check("dw", &wt, &g.weight, &|v| loss(&x, v, &b));
            check("db", &b, &g.bias, &|v| loss(&x, &wt, v));
        }
    }

    #[test]
    fn backward_bytes_do_not_depend_on_thread_count() {
        let s = Conv3x3Shape { batch: 11, in_channels: 3, out_channels: 4, height: 6, width: 6 };
        let (x, wt, b, g) = operands(s, 8);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
            pool.install(|| {
                let out = conv3x3_forward(s, &x, &wt, &b, true);
                let gr = conv3x3_backward(s, &x, &wt, &out, true, &g, true, true);
                (out, gr.x, gr.weight, gr.bias)
            })
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn max_pool_picks_the_first_maximum_and_routes_gradients_to_it() {
        // One 3x4 plane: the odd last row is dropped.
        let x = [1.0, 5.0, 2.0, 2.0, 3.0, 0.0, 2.0, -1.0, 9.0, 9.0, 9.0, 9.0];
        let (out, arg) = max_pool2x2_forward(&x, 1, 3, 4);
        assert_eq!(out, vec![5.0, 2.0]);
        assert_eq!(arg, vec![1, 0]);
        let dx = max_pool2x2_backward(&[10.0, 20.0], &arg, 1, 3, 4);
        assert_eq!(dx, vec![0.0, 10.0, 20.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }
}
