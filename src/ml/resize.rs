//! Plain image resampling on f32/u8 planes.
//!
//! Bilinear uses half-pixel centres (OpenCV's `INTER_LINEAR`, PyTorch's
//! `align_corners=False`), which is what pytorch-grad-cam uses to upsample heatmaps; the
//! Grad-CAM reference test depends on this exact convention.
//!
//! Loaded images and masks go through [`image`] and [`mask`], which treat a pixel as a square
//! of area, so both stay centred on each other at any ratio: output pixel `x` of `dw` covers
//! source `[x*sw/dw, (x+1)*sw/dw)`. Overlaps are exact integers (in units of `1/dw` of a source
//! pixel); the arithmetic is plain f64 adds and multiplies in a fixed order (no fused
//! multiply-add, no platform maths), so the bytes are the same on every CPU.

pub fn bilinear(src: &[f32], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<f32> {
    if sw == dw && sh == dh {
        return src.to_vec();
    }
    let sx = sw as f32 / dw as f32;
    let sy = sh as f32 / dh as f32;
    let mut out = vec![0f32; dw * dh];
    for y in 0..dh {
        let fy = ((y as f32 + 0.5) * sy - 0.5).max(0.0);
        let y0 = (fy.floor() as usize).min(sh - 1);
        let y1 = (y0 + 1).min(sh - 1);
        let wy = fy - y0 as f32;
        for x in 0..dw {
            let fx = ((x as f32 + 0.5) * sx - 0.5).max(0.0);
            let x0 = (fx.floor() as usize).min(sw - 1);
            let x1 = (x0 + 1).min(sw - 1);
            let wx = fx - x0 as f32;
            let top = src[y0 * sw + x0] * (1.0 - wx) + src[y0 * sw + x1] * wx;
            let bot = src[y1 * sw + x0] * (1.0 - wx) + src[y1 * sw + x1] * wx;
            out[y * dw + x] = top * (1.0 - wy) + bot * wy;
        }
    }
    out
}

/// Per output pixel along one axis of `s` source pixels resampled to `d`: the source pixels it
/// covers and their overlap, in units of `1/d` of a source pixel (the overlaps of one output
/// pixel add up to `s`).
fn coverage(s: usize, d: usize) -> Vec<Vec<(usize, u64)>> {
    (0..d)
        .map(|o| {
            let (lo, hi) = ((o * s) as u64, ((o + 1) * s) as u64);
            let first = (lo / d as u64) as usize;
            let last = (hi.div_ceil(d as u64) as usize).min(s);
            (first..last)
                .filter_map(|j| {
                    let ov = hi.min(((j + 1) * d) as u64).saturating_sub(lo.max((j * d) as u64));
                    (ov > 0).then_some((j, ov))
                })
                .collect()
        })
        .collect()
}

/// Per output pixel along one axis: the source pixels and weights (adding up to 1) that make
/// it. Reducing (`d < s`): the area average of the source span it covers (OpenCV's
/// `INTER_AREA`). Enlarging or equal: linear interpolation between the two nearest source
/// centres, half-pixel centres (as [`bilinear`]), which at equal size is the pixel itself.
fn weights(s: usize, d: usize) -> Vec<Vec<(usize, f64)>> {
    if d < s {
        return coverage(s, d).into_iter().map(|v| v.into_iter().map(|(j, ov)| (j, ov as f64 / s as f64)).collect()).collect();
    }
    (0..d)
        .map(|o| {
            let f = (((2 * o + 1) * s) as f64 / (2 * d) as f64 - 0.5).max(0.0);
            let j0 = (f.floor() as usize).min(s - 1);
            let j1 = (j0 + 1).min(s - 1);
            let w = f - j0 as f64;
            if w == 0.0 || j0 == j1 { vec![(j0, 1.0)] } else { vec![(j0, 1.0 - w), (j1, w)] }
        })
        .collect()
}

/// Resamples an image plane `sw` x `sh` to `dw` x `dh`: by area averaging along an axis that
/// shrinks, bilinear (half-pixel centres) along one that grows. Separable: rows first, then
/// columns, each a sum in source order.
pub fn image(src: &[f32], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<f32> {
    if sw == dw && sh == dh {
        return src.to_vec();
    }
    let (wx, wy) = (weights(sw, dw), weights(sh, dh));
    let mut rows = vec![0f64; sh * dw];
    for y in 0..sh {
        for (x, taps) in wx.iter().enumerate() {
            let mut acc = 0f64;
            for &(j, w) in taps {
                acc += src[y * sw + j] as f64 * w;
            }
            rows[y * dw + x] = acc;
        }
    }
    let mut out = vec![0f32; dw * dh];
    for (y, taps) in wy.iter().enumerate() {
        for x in 0..dw {
            let mut acc = 0f64;
            for &(i, w) in taps {
                acc += rows[i * dw + x] * w;
            }
            out[y * dw + x] = acc as f32;
        }
    }
    out
}

/// Resamples a binary mask (0 = background, anything else = tumor) `sw` x `sh` to `dw` x `dh`
/// by area: an output pixel is tumor (1) when tumor covers at least half of the source area
/// under it, counted exactly (whole and partial source pixels alike). Shrinking by an integer
/// factor `k` is "at least half of the `k` x `k` block". Enlarging by an integer factor gives
/// each output pixel its source pixel's value; at other ratios an output pixel straddling a
/// tumor edge is tumor when at least half of it lies on tumor (not necessarily the pixel under
/// its centre). Centred like [`image`], so mask and image stay on each other.
pub fn mask(src: &[u8], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<u8> {
    if sw == dw && sh == dh {
        return src.iter().map(|&v| (v > 0) as u8).collect();
    }
    let (cx, cy) = (coverage(sw, dw), coverage(sh, dh));
    // Tumor area per source row under each output column, in units of 1/dw of a pixel.
    let mut rows = vec![0u64; sh * dw];
    for y in 0..sh {
        for (x, taps) in cx.iter().enumerate() {
            rows[y * dw + x] = taps.iter().filter(|&&(j, _)| src[y * sw + j] > 0).map(|&(_, ov)| ov).sum();
        }
    }
    // An output pixel's area is sw * sh in units of 1/(dw*dh): tumor when 2 * covered >= it.
    let full = (sw * sh) as u64;
    let mut out = vec![0u8; dw * dh];
    for (y, taps) in cy.iter().enumerate() {
        for x in 0..dw {
            let covered: u64 = taps.iter().map(|&(i, ov)| rows[i * dw + x] * ov).sum();
            out[y * dw + x] = (2 * covered >= full) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_matches_half_pixel_convention() {
        // 2x2 -> 4x4: corners replicate, centre interpolates (as cv2.resize INTER_LINEAR).
        let out = bilinear(&[0.0, 1.0, 2.0, 3.0], 2, 2, 4, 4);
        assert_eq!(out[0], 0.0);
        assert!((out[1] - 0.25).abs() < 1e-6);
        assert!((out[5] - 0.75).abs() < 1e-6);
        assert_eq!(out[15], 3.0);
    }

    #[test]
    fn image_shrink_averages_areas() {
        // 4x4 -> 2x2: each output is the mean of its 2x2 block.
        let src: Vec<f32> = (0..16).map(|v| v as f32).collect();
        assert_eq!(image(&src, 4, 4, 2, 2), [2.5, 4.5, 10.5, 12.5]);
        // Thin stripes (columns 3 and 4 of every 8) shrunk 8x: a quarter of the area is bright.
        // Bilinear reads only columns 3 and 4 of each 8 and sees nothing but stripe.
        let stripes: Vec<f32> = (0..64 * 64).map(|i| matches!(i % 8, 3 | 4) as u8 as f32).collect();
        assert!(image(&stripes, 64, 64, 8, 8).iter().all(|&v| v == 0.25));
        assert!(bilinear(&stripes, 64, 64, 8, 8).iter().all(|&v| v == 1.0), "bilinear aliases");
    }

    #[test]
    fn image_shrink_by_an_odd_ratio_uses_exact_areas() {
        // 3 -> 2: output 0 covers source [0, 1.5), output 1 covers [1.5, 3).
        let out = image(&[0.0, 1.0, 2.0], 3, 1, 2, 1);
        assert!((out[0] - 1.0 / 3.0).abs() < 1e-6 && (out[1] - 5.0 / 3.0).abs() < 1e-6, "{out:?}");
        // Every output pixel covers the same area: the mean is kept at any ratio.
        let src: Vec<f32> = (0..7 * 5).map(|i| ((i * 37) % 11) as f32).collect();
        let out = image(&src, 7, 5, 3, 2);
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        assert!((mean(&out) - mean(&src)).abs() < 1e-5, "{} vs {}", mean(&out), mean(&src));
    }

    #[test]
    fn image_enlarge_is_half_pixel_bilinear() {
        let src = [0.0, 1.0, 2.0, 3.0];
        for (a, b) in image(&src, 2, 2, 4, 4).iter().zip(bilinear(&src, 2, 2, 4, 4)) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // Shrinking one axis and enlarging the other.
        assert_eq!(image(&[0.0, 2.0, 4.0, 6.0], 4, 1, 2, 2), [1.0, 5.0, 1.0, 5.0]);
    }

    #[test]
    fn mask_shrink_takes_tumor_covering_at_least_half() {
        // 4x4 -> 2x2: 2 of 4 pixels is half (tumor), 1 of 4 is not.
        let m = [1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(mask(&m, 4, 4, 2, 2), [1, 0, 0, 0]);
        // 3 -> 2: the middle pixel is split between the two outputs, a third of each.
        assert_eq!(mask(&[0, 255, 0], 3, 1, 2, 1), [0, 0]);
        assert_eq!(mask(&[255, 0, 0], 3, 1, 2, 1), [1, 0]);
        assert_eq!(mask(&[255, 255, 0], 3, 1, 2, 1), [1, 0]);
        assert_eq!(mask(&[0, 255, 255], 3, 1, 2, 1), [0, 1]);
        assert_eq!(mask(&[0, 7, 0, 9], 2, 2, 2, 2), [0, 1, 0, 1]);
    }

    /// A square of side `side` centred in a `n` x `n` mask.
    fn centred_square(n: usize, side: usize) -> Vec<u8> {
        let (lo, hi) = ((n - side) / 2, (n + side) / 2);
        (0..n * n).map(|i| ((lo..hi).contains(&(i % n)) && (lo..hi).contains(&(i / n))) as u8).collect()
    }

    /// The centroid (x, y) of a mask, in its own pixel coordinates (pixel centres at i + 0.5).
    fn centroid(m: &[u8], w: usize) -> (f64, f64) {
        let (mut sx, mut sy, mut n) = (0.0, 0.0, 0.0);
        for (i, &v) in m.iter().enumerate() {
            if v > 0 {
                sx += (i % w) as f64 + 0.5;
                sy += (i / w) as f64 + 0.5;
                n += 1.0;
            }
        }
        (sx / n, sy / n)
    }

    #[test]
    fn a_centred_mask_stays_centred_on_its_image_after_an_8x_shrink() {
        // 52x52 tumor in the middle of 256x256 (rows and columns 102..154): not on the 8x8
        // blocks. Corner sampling (source row y*8) took rows 13..20, half a pixel off.
        let m = centred_square(256, 52);
        let small = mask(&m, 256, 256, 32, 32);
        assert_eq!(centroid(&small, 32), (16.0, 16.0));
        let mut mirrored = small.clone();
        mirrored.reverse();
        assert_eq!(small, mirrored, "symmetric under a half turn");
        assert_eq!(small.iter().filter(|&&v| v > 0).count(), 6 * 6);
        // The image of the same square shrinks onto the same place.
        let img: Vec<f32> = m.iter().map(|&v| v as f32).collect();
        let small_img = image(&img, 256, 256, 32, 32);
        let bin: Vec<u8> = small_img.iter().map(|&v| (v >= 0.5) as u8).collect();
        assert_eq!(bin, small);
        // Odd ratios and enlarging keep the centre too.
        for (n, side, d) in [(256, 52, 24), (256, 52, 40), (100, 30, 64), (9, 3, 32), (5, 3, 4)] {
            let out = mask(&centred_square(n, side), n, n, d, d);
            let (cx, cy) = centroid(&out, d);
            assert!((cx - d as f64 / 2.0).abs() < 1e-9 && (cy - d as f64 / 2.0).abs() < 1e-9, "{n}->{d}: ({cx}, {cy})");
        }
    }

    #[test]
    fn mask_enlarge_takes_the_pixel_under_each_centre() {
        assert_eq!(mask(&[1, 0, 0, 0], 2, 2, 4, 4), [1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }
}
