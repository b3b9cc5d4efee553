//! Plain image resampling on f32/u8 planes.
//!
//! Bilinear uses half-pixel centres (OpenCV's `INTER_LINEAR`, PyTorch's
//! `align_corners=False`), which is what pytorch-grad-cam uses to upsample heatmaps; the
//! Grad-CAM reference test depends on this exact convention.

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

pub fn nearest(src: &[u8], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<u8> {
    if sw == dw && sh == dh {
        return src.to_vec();
    }
    let mut out = vec![0u8; dw * dh];
    for y in 0..dh {
        let sy = ((y * sh) / dh).min(sh - 1);
        for x in 0..dw {
            let sx = ((x * sw) / dw).min(sw - 1);
            out[y * dw + x] = src[sy * sw + sx];
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
    fn nearest_keeps_binary() {
        let out = nearest(&[0, 1, 1, 0], 2, 2, 4, 4);
        assert!(out.iter().all(|&v| v <= 1));
        assert_eq!(out[0], 0);
        assert_eq!(out[3], 1);
    }
}
