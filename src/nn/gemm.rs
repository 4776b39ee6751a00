//! f32 matrix products on slices with arbitrary strides, through the `gemm`
//! crate (the kernels candle's CPU matmul uses), for kernels that multiply
//! pieces of tensors in place: one image of a batch, one attention head of a
//! (B, N, C) tensor, a transposed operand read without a copy.

use gemm::Parallelism;

/// An m×n matrix inside a slice: element (i, j) sits at `i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major m×n matrix (row stride n) at the start of `data`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The same elements read as the n×m transpose (no copy).
    /// A row-major m×n matrix with row stride `rs` ≥ n at the start of
    /// `data` (a block of columns of a wider matrix).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// The largest index the view reads, plus one (0 when empty).
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// `dst = a · b` (or `dst += a · b` with `accumulate`), `dst` row-major with
/// row stride `dst_rs`. `parallel` lets the GEMM use rayon's threads; callers
/// that already run one product per thread pass `false`.
///
/// # Panics
/// If the shapes do not chain or a view reaches past its slice (a bug in the
/// caller, never a property of user input).
pub(crate) fn matmul_into(
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: View,
    b: View,
    parallel: bool,
) {
    let dst_view = View {
        data: dst,
        rows: a.rows,
        cols: b.cols,
        rs: dst_rs,
        cs: 1,
    };
    assert!(dst_view.extent() <= dst.len());
    // SAFETY: the assert keeps every written index inside `dst`, which is
    // borrowed mutably for the call.
    unsafe { matmul_into_raw(dst.as_mut_ptr(), dst_rs, accumulate, a, b, parallel) }
}

/// [`matmul_into`] writing through a pointer: several threads fill disjoint
/// elements of one buffer (one attention head's columns each).
///
/// # Safety
/// `dst.add(i·dst_rs + j)` must be valid for reads and writes for every
/// i < a.rows, j < b.cols, and no other code may access those elements
/// during the call.
pub(crate) unsafe fn matmul_into_raw(
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: View,
    b: View,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm: inner dimensions {k} and {}", b.rows);
    assert!(a.extent() <= a.data.len() && b.extent() <= b.data.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                for j in 0..n {
                    // SAFETY: inside the caller's guaranteed range.
                    unsafe { *dst.add(r * dst_rs + j) = 0.0 };
                }
            }
        }
        return;
    }
    let parallelism = if parallel && super::cpu::num_threads() > 1 {
        Parallelism::Rayon(super::cpu::num_threads())
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts keep every operand index ((i·rs + j·cs) for
    // i < rows, j < cols) inside its slice; the caller guarantees `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}
