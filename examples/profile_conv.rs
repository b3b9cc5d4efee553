//! Where a vgg-small training step spends its time, per convolution: forward, weight
//! gradient and input gradient of each layer at 64x64, batch 32, on the CPU backend, for
//! burn's own conv2d and for camflow's `FastOps::conv3x3` (im2col + GEMM kernels).
//!
//!     cargo run --example profile_conv
//!
//! (BENCHMARKS.md quotes its output.)
use burn::backend::{Autodiff, Flex};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Distribution, Tensor};
use camflow::ml::fast_ops::FastOps;
use std::time::Instant;
type B = Autodiff<Flex>;
fn main() {
    let dev = Default::default();
    for camflow in [false, true] {
        println!("{}", if camflow { "camflow FastOps::conv3x3 (im2col + GEMM):" } else { "burn 0.21 conv2d on flex:" });
        profile(camflow, &dev);
    }
}

fn profile(camflow: bool, dev: &burn::backend::flex::FlexDevice) {
    for (cin, cout, s) in [(1usize, 16usize, 64usize), (16, 32, 32), (32, 64, 16), (64, 64, 8)] {
        let opts = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let mut res = vec![];
        for (gx, gw) in [(false, false), (false, true), (true, false)] {
            let mut total = 0f64;
            for rep in 0..6 {
                let mut x = Tensor::<B, 4>::random([32, cin, s, s], Distribution::Normal(0.0, 1.0), dev);
                let mut w = Tensor::<B, 4>::random([cout, cin, 3, 3], Distribution::Normal(0.0, 1.0), dev);
                let b = Tensor::<B, 1>::zeros([cout], dev);
                if gx {
                    x = x.require_grad();
                }
                if gw {
                    w = w.require_grad();
                }
                let t = Instant::now();
                let y =
                    if camflow { B::conv3x3(x.clone(), w.clone(), b, false) } else { conv2d(x.clone(), w.clone(), Some(b), opts.clone()) };
                let l = y.sum();
                if gx || gw {
                    let g = l.backward();
                    if gx {
                        let _ = x.grad(&g).unwrap().into_data();
                    }
                    if gw {
                        let _ = w.grad(&g).unwrap().into_data();
                    }
                } else {
                    let _ = l.into_data();
                }
                if rep > 0 {
                    total += t.elapsed().as_secs_f64();
                }
            }
            res.push(total / 5.0 * 1e3);
        }
        println!(
            "  conv {cin}->{cout} @{s}x{s}: forward {:.1} ms, +weight grad {:.1} ms, +input grad {:.1} ms",
            res[0],
            res[1] - res[0],
            res[2] - res[0]
        );
    }
}
