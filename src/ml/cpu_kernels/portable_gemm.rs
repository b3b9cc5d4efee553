//! A GEMM whose result bits do not depend on the CPU it runs on.
//!
//! Why not the `gemm` crate: it picks its micro-kernel from cpuid and its block sizes from the
//! cache sizes, and both change the order in which a dot product is summed, so the same
//! training gave other weights on another x86_64 model (issue 8).
//!
//! Here every output element is `c = c0; for p in 0..k { c = c + a[i,p] * b[p,j] }`: one
//! sequential sum in `k` order, a separate multiply and add (Rust never contracts them into an
//! FMA on its own, and the code never asks for one). Vector lanes only ever hold *different*
//! output elements, so a lane width of 4 (SSE2), 8 (AVX2) or 16 (AVX-512) runs the same
//! operations on every element and gives the same bits. Blocking over `k` only stores and
//! reloads the running f32 sum, which changes nothing either. The register tile exists once per
//! [`KernelLevel`] (plain Rust for the baseline, AVX2 and AVX-512 intrinsics, all `mul` then
//! `add`) and is chosen at run time (forced with `CAMFLOW_CPU_KERNELS`), so a test on one
//! machine can compare every level it supports.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use super::MatRef;

/// The environment variable that forces a kernel level: `auto` (default), `baseline`, `avx2`
/// or `avx512`.
pub const LEVEL_ENV: &str = "CAMFLOW_CPU_KERNELS";

/// Rows and columns of one register tile of the output.
const MR: usize = 6;
const NR: usize = 16;
/// Depth of one block of the sum (keeps a packed panel of A and one of B in cache).
const KC: usize = 256;

/// An instruction-set level the kernels are compiled for. All give identical bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelLevel {
    /// SSE2, which every x86_64 CPU has (plain Rust elsewhere).
    Baseline,
    Avx2,
    Avx512,
}

impl KernelLevel {
    pub const ALL: [KernelLevel; 3] = [KernelLevel::Baseline, KernelLevel::Avx2, KernelLevel::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            KernelLevel::Baseline => "baseline",
            KernelLevel::Avx2 => "avx2",
            KernelLevel::Avx512 => "avx512",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Whether this CPU can run the level.
    pub fn supported(self) -> bool {
        match self {
            KernelLevel::Baseline => true,
            #[cfg(target_arch = "x86_64")]
            KernelLevel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            KernelLevel::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The levels this CPU can run, lowest first.
    pub fn available() -> Vec<KernelLevel> {
        Self::ALL.into_iter().filter(|l| l.supported()).collect()
    }

    fn best() -> KernelLevel {
        Self::available().pop().unwrap_or(KernelLevel::Baseline)
    }
}

/// The level `CAMFLOW_CPU_KERNELS` asks for, read once; an error names the variable and value.
pub fn configured_level() -> Result<KernelLevel, String> {
    static LEVEL: OnceLock<Result<KernelLevel, String>> = OnceLock::new();
    LEVEL
        .get_or_init(|| {
            let value = std::env::var(LEVEL_ENV).unwrap_or_default();
            let level = match value.trim() {
                "" | "auto" => return Ok(KernelLevel::best()),
                "baseline" => KernelLevel::Baseline,
                "avx2" => KernelLevel::Avx2,
                "avx512" => KernelLevel::Avx512,
                other => return Err(format!("{LEVEL_ENV}={other}: expected auto, baseline, avx2 or avx512")),
            };
            if level.supported() { Ok(level) } else { Err(format!("{LEVEL_ENV}={}: this CPU does not support it", level.name())) }
        })
        .clone()
}

/// A level forced by [`force_level`] (0: none), ahead of the configured one.
static FORCED: AtomicU8 = AtomicU8::new(0);
/// GEMM calls per level, so a test can check which level really ran.
static CALLS: [AtomicUsize; 3] = [AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0)];

/// The level GEMMs use now.
pub fn active_level() -> KernelLevel {
    match FORCED.load(Ordering::Relaxed) {
        1 => KernelLevel::Baseline,
        2 => KernelLevel::Avx2,
        3 => KernelLevel::Avx512,
        // An unsupported configured level is reported by `backend::dispatch` before any work;
        // here it can only fall back.
        _ => configured_level().unwrap_or(KernelLevel::Baseline),
    }
}

/// How many GEMMs have run at `level` in this process.
pub fn calls_at(level: KernelLevel) -> usize {
    CALLS[level.index()].load(Ordering::Relaxed)
}

/// Holds a forced level until dropped; one at a time (tests comparing levels take turns).
pub struct ForcedLevel {
    _turn: std::sync::MutexGuard<'static, ()>,
}

/// Makes every GEMM in the process run at `level` until the guard drops (for tests and
/// `bench`; the setting for users is `CAMFLOW_CPU_KERNELS`). Panics if the CPU lacks it.
pub fn force_level(level: KernelLevel) -> ForcedLevel {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    assert!(level.supported(), "this CPU cannot run the {} kernels", level.name());
    let turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    FORCED.store(level.index() as u8 + 1, Ordering::SeqCst);
    ForcedLevel { _turn: turn }
}

impl Drop for ForcedLevel {
    fn drop(&mut self) {
        FORCED.store(0, Ordering::SeqCst);
    }
}

/// `dst[m x n, row-major] = (accumulate ? dst : 0) + a . b`, single-threaded.
pub fn gemm(dst: &mut [f32], a: MatRef, b: MatRef, accumulate: bool) {
    assert!(a.fits(), "gemm operand a out of bounds");
    gemm_packed(dst, &PackedA::new(a), b, accumulate);
}

/// The left operand of a GEMM in the register tile's layout, packed once and reusable (a
/// convolution's weights serve every image of a batch). Per k-block of `KC`: per row panel of
/// `MR`, `[p][MR]`, zero rows past `m`. Packing only moves values, so it cannot change a bit.
pub struct PackedA {
    rows: usize,
    depth: usize,
    data: Vec<f32>,
}

impl PackedA {
    pub fn new(a: MatRef) -> PackedA {
        assert!(a.fits(), "gemm operand a out of bounds");
        let (m, k) = (a.rows, a.cols);
        let row_panels = m.div_ceil(MR);
        let mut data = vec![0f32; row_panels * MR * k];
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let block = &mut data[k0 * row_panels * MR..(k0 + kc) * row_panels * MR];
            for (rp, panel) in block.chunks_exact_mut(MR * kc).enumerate() {
                for r in 0..MR.min(m - rp * MR) {
                    let row = &a.data[(rp * MR + r) * a.row_stride + k0 * a.col_stride..];
                    for p in 0..kc {
                        panel[p * MR + r] = row[p * a.col_stride];
                    }
                }
            }
        }
        PackedA { rows: m, depth: k, data }
    }

    /// The packed row panel `rp` of the k-block starting at `k0` (depth `kc`).
    fn panel(&self, k0: usize, kc: usize, rp: usize) -> &[f32] {
        let row_panels = self.rows.div_ceil(MR);
        &self.data[k0 * row_panels * MR + rp * MR * kc..][..MR * kc]
    }
}

/// [`gemm`] with a packed left operand.
pub fn gemm_packed(dst: &mut [f32], a: &PackedA, b: MatRef, accumulate: bool) {
    let (m, k, n) = (a.rows, a.depth, b.cols);
    assert!(b.rows == k && dst.len() == m * n && b.fits(), "gemm operands out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    let level = active_level();
    CALLS[level.index()].fetch_add(1, Ordering::Relaxed);
    gemm_body(dst, a, b, level, accumulate);
}

/// `dst = (accumulate ? dst : 0) + a . b` over k-blocks of `KC`, column panels of `NR` and row
/// panels of `MR`. The packing is plain code; only the register tile is compiled per level.
/// Without `accumulate` the first k-block starts its tiles from zero instead of reading `dst`
/// (the same +0.0 either way).
fn gemm_body(dst: &mut [f32], a: &PackedA, b: MatRef, level: KernelLevel, accumulate: bool) {
    let (m, k, n) = (a.rows, a.depth, b.cols);
    let row_panels = m.div_ceil(MR);
    // One column panel of B for one k-block, [p][NR] (zero columns past n).
    let mut b_pack = vec![0f32; KC.min(k) * NR];
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let load = accumulate || k0 > 0;
        for j0 in (0..n).step_by(NR) {
            let nr = NR.min(n - j0);
            // Full panels of a row-major B are read in place; others are packed.
            let direct = nr == NR && b.col_stride == 1;
            if !direct {
                if nr < NR {
                    b_pack.fill(0.0);
                }
                // Walk B along whichever of its axes is contiguous.
                if b.row_stride == 1 {
                    for c in 0..nr {
                        let col = &b.data[k0 + (j0 + c) * b.col_stride..][..kc];
                        for (p, &v) in col.iter().enumerate() {
                            b_pack[p * NR + c] = v;
                        }
                    }
                } else {
                    for p in 0..kc {
                        for c in 0..nr {
                            b_pack[p * NR + c] = b.data[(k0 + p) * b.row_stride + (j0 + c) * b.col_stride];
                        }
                    }
                }
            }
            let (b_panel, b_stride): (&[f32], usize) =
                if direct { (&b.data[k0 * b.row_stride + j0..], b.row_stride) } else { (&b_pack[..kc * NR], NR) };
            for rp in 0..row_panels {
                let i0 = rp * MR;
                let mr = MR.min(m - i0);
                let a_panel = a.panel(k0, kc, rp);
                if mr == MR && nr == NR {
                    // A whole tile is updated in place in `dst`.
                    let c = &mut dst[i0 * n + j0..(i0 + MR - 1) * n + j0 + NR];
                    tile_at_level(level, kc, a_panel, b_panel, b_stride, c, n, load);
                } else {
                    // An edge tile goes through a full-size copy.
                    let mut tile = [0f32; MR * NR];
                    if load {
                        for r in 0..mr {
                            tile[r * NR..r * NR + nr].copy_from_slice(&dst[(i0 + r) * n + j0..][..nr]);
                        }
                    }
                    tile_at_level(level, kc, a_panel, b_panel, b_stride, &mut tile, NR, true);
                    for r in 0..mr {
                        dst[(i0 + r) * n + j0..][..nr].copy_from_slice(&tile[r * NR..r * NR + nr]);
                    }
                }
            }
        }
    }
}

/// One register tile at `level`: `c[i * c_stride + j] = (load ? c : 0) + sum_p a[p][i] * b[p * b_stride + j]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_at_level(level: KernelLevel, kc: usize, a: &[f32], b: &[f32], b_stride: usize, c: &mut [f32], c_stride: usize, load: bool) {
    assert!(a.len() >= kc * MR && (kc == 0 || b.len() >= (kc - 1) * b_stride + NR) && c.len() >= (MR - 1) * c_stride + NR);
    match level {
        KernelLevel::Baseline => micro_tile(kc, a, b, b_stride, c, c_stride, load),
        // SAFETY: `active_level` only returns a level this CPU supports, and the assertion
        // above keeps the tile's reads and writes inside the three slices.
        #[cfg(target_arch = "x86_64")]
        KernelLevel::Avx2 => unsafe { micro_tile_avx2(kc, a, b, b_stride, c, c_stride, load) },
        #[cfg(target_arch = "x86_64")]
        KernelLevel::Avx512 => unsafe { micro_tile_avx512(kc, a, b, b_stride, c, c_stride, load) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => micro_tile(kc, a, b, b_stride, c, c_stride, load),
    }
}

/// [`micro_tile`] with AVX2 registers: two 8-lane vectors per tile row. Intrinsics, not the
/// autovectoriser, so the code (and its speed) does not hinge on LLVM's choices; `mul` then
/// `add`, never `fmadd`, as in [`micro_tile`].
///
/// # Safety
/// The CPU must have AVX2; `a` holds `kc * MR` values, `b` rows `0..kc` of `NR` values at
/// `b_stride`, and `c` rows `0..MR` of `NR` values at `c_stride`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn micro_tile_avx2(kc: usize, a: &[f32], b: &[f32], b_stride: usize, c_out: &mut [f32], c_stride: usize, load: bool) {
    use std::arch::x86_64::*;
    let (a, b, cp) = (a.as_ptr(), b.as_ptr(), c_out.as_mut_ptr());
    // SAFETY: the caller's contract covers every pointer offset below.
    unsafe {
        let mut c = [[_mm256_setzero_ps(); 2]; MR];
        if load {
            for (i, ci) in c.iter_mut().enumerate() {
                let row = cp.add(i * c_stride);
                *ci = [_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8))];
            }
        }
        for p in 0..kc {
            let bp = b.add(p * b_stride);
            let (b0, b1) = (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)));
            for (i, ci) in c.iter_mut().enumerate() {
                let av = _mm256_set1_ps(*a.add(p * MR + i));
                ci[0] = _mm256_add_ps(ci[0], _mm256_mul_ps(av, b0));
                ci[1] = _mm256_add_ps(ci[1], _mm256_mul_ps(av, b1));
            }
        }
        for (i, ci) in c.iter().enumerate() {
            let row = cp.add(i * c_stride);
            _mm256_storeu_ps(row, ci[0]);
            _mm256_storeu_ps(row.add(8), ci[1]);
        }
    }
}

/// [`micro_tile`] with AVX-512 registers: one 16-lane vector per tile row.
///
/// # Safety
/// As [`micro_tile_avx2`], with AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn micro_tile_avx512(kc: usize, a: &[f32], b: &[f32], b_stride: usize, c_out: &mut [f32], c_stride: usize, load: bool) {
    use std::arch::x86_64::*;
    let (a, b, cp) = (a.as_ptr(), b.as_ptr(), c_out.as_mut_ptr());
    // SAFETY: the caller's contract covers every pointer offset below.
    unsafe {
        let mut c = [_mm512_setzero_ps(); MR];
        if load {
            for (i, ci) in c.iter_mut().enumerate() {
                *ci = _mm512_loadu_ps(cp.add(i * c_stride));
            }
        }
        for p in 0..kc {
            let b0 = _mm512_loadu_ps(b.add(p * b_stride));
            for (i, ci) in c.iter_mut().enumerate() {
                *ci = _mm512_add_ps(*ci, _mm512_mul_ps(_mm512_set1_ps(*a.add(p * MR + i)), b0));
            }
        }
        for (i, ci) in c.iter().enumerate() {
            _mm512_storeu_ps(cp.add(i * c_stride), *ci);
        }
    }
}

/// `tile[i][j] += sum_p a[p][i] * b[p * b_stride + j]`, each element summed in `p` order
/// (the baseline level: plain Rust, which LLVM vectorises with SSE2 across `j`).
#[inline(always)]
fn micro_tile(kc: usize, a: &[f32], b: &[f32], b_stride: usize, c: &mut [f32], c_stride: usize, load: bool) {
    let mut acc = [[0f32; NR]; MR];
    if load {
        for (i, row) in acc.iter_mut().enumerate() {
            row.copy_from_slice(&c[i * c_stride..i * c_stride + NR]);
        }
    }
    for p in 0..kc {
        let ar: &[f32; MR] = a[p * MR..p * MR + MR].try_into().expect("MR values");
        let br: &[f32; NR] = b[p * b_stride..p * b_stride + NR].try_into().expect("NR values");
        for i in 0..MR {
            let av = ar[i];
            for j in 0..NR {
                // Deliberately not `mul_add`: an FMA rounds once where this rounds twice, and
                // whether one is used must not depend on the CPU.
                acc[i][j] = acc[i][j] + av * br[j];
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        c[i * c_stride..i * c_stride + NR].copy_from_slice(row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::rng::Rng;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::derive(seed, "gemm");
        (0..n).map(|_| r.uniform() * 2.0 - 1.0).collect()
    }

    /// The textbook triple loop with the same summation order: it must agree to the bit.
    fn naive(a: MatRef, b: MatRef, init: &[f32]) -> Vec<f32> {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let mut out = init.to_vec();
        for i in 0..m {
            for j in 0..n {
                let mut acc = out[i * n + j];
                for p in 0..k {
                    acc = acc + a.data[i * a.row_stride + p * a.col_stride] * b.data[p * b.row_stride + j * b.col_stride];
                }
                out[i * n + j] = acc;
            }
        }
        out
    }

    /// Shapes around the tile and block edges, with row-major and transposed operands.
    fn cases() -> Vec<(usize, usize, usize, bool, bool)> {
        let mut v = Vec::new();
        for (m, k, n) in [(1, 1, 1), (5, 3, 17), (6, 256, 16), (7, 300, 33), (13, 9, 64), (64, 520, 40), (2, 0, 3)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                v.push((m, k, n, ta, tb));
            }
        }
        v
    }

    fn view(data: &[f32], rows: usize, cols: usize, transposed: bool) -> MatRef<'_> {
        if transposed {
            MatRef { data, rows, cols, row_stride: 1, col_stride: rows }
        } else {
            MatRef { data, rows, cols, row_stride: cols, col_stride: 1 }
        }
    }

    #[test]
    fn gemm_equals_the_naive_triple_loop_bit_for_bit() {
        for level in KernelLevel::available() {
            let _forced = force_level(level);
            against_naive(level);
        }
    }

    fn against_naive(level: KernelLevel) {
        for (c, &(m, k, n, ta, tb)) in cases().iter().enumerate() {
            let (av, bv, init) = (random(m * k, c as u64), random(k * n, 100 + c as u64), random(m * n, 200 + c as u64));
            let (a, b) = (view(&av, m, k, ta), view(&bv, k, n, tb));
            for accumulate in [false, true] {
                let mut dst = init.clone();
                gemm(&mut dst, a, b, accumulate);
                let start = if accumulate { init.clone() } else { vec![0.0; m * n] };
                let expected = naive(a, b, &start);
                assert!(
                    dst.iter().zip(&expected).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{}: m={m} k={k} n={n} ta={ta} tb={tb} accumulate={accumulate}",
                    level.name()
                );
            }
        }
    }

    #[test]
    fn every_level_this_cpu_has_gives_the_same_bits() {
        let levels = KernelLevel::available();
        // Every x86_64 CPU camflow targets has AVX2: this test must compare at least two levels.
        #[cfg(target_arch = "x86_64")]
        assert!(levels.len() >= 2, "expected at least baseline and avx2, found {levels:?}");
        let (m, k, n) = (37, 700, 45);
        let (av, bv) = (random(m * k, 7), random(k * n, 8));
        let (a, b) = (view(&av, m, k, false), view(&bv, k, n, true));
        let results: Vec<Vec<u32>> = levels
            .iter()
            .map(|&l| {
                let _guard = force_level(l);
                let before = calls_at(l);
                let mut dst = vec![0f32; m * n];
                gemm(&mut dst, a, b, false);
                assert!(calls_at(l) > before, "{} did not run", l.name());
                dst.iter().map(|v| v.to_bits()).collect()
            })
            .collect();
        for (l, r) in levels.iter().zip(&results).skip(1) {
            assert!(r == &results[0], "{} differs from baseline", l.name());
        }
    }
}
