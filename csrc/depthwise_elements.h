// The depthwise path's per-element work, as __host__ __device__ functions:
// the CUDA kernels (cuda/depthwise_cuda.cu) are grid-stride loops around
// them, the CPU runs them for the layers its vector loops do not cover
// (cpu/depthwise_cpu.cpp), and tests/emulated/emulate.cpp runs them over the
// whole grid on the CPU.
//
// Note [Depthwise as a diagonal]
// With groups G, the image side has C_i = G*ci channels, the window side
// C_w = G*cw, and the weight is (C_w, ci, *k) for both ops (conv's
// (C_out, C_in/G, *k); conv_transpose's (C_in, C_out/G, *k)). In im2col's
// terms, group g's GEMM is W_g (cw x ci*prod(k)) times g's rows of the
// columns. Depthwise (ci = cw = 1) makes W block-diagonal over channels: each
// channel's output is its own column block times one row of taps, so no
// GEMM is left, only a sum over taps along the relation (*) of im2col.h:
//   conv            y[n, r, o] = b[r] + sum_{c<ci, k} W[r, c, k] x[n, g*ci + c, tap(o, k)]
//                                 (g = r / cw): im2col read forward;
//   conv_transpose  y[n, q, i] = b[q] + sum_{c<cw, k} W[g*cw + c, j, k] x[n, g*cw + c, window_at(i, k)]
//                                 (g = q / ci, j = q % ci): col2im's gather, the adjoint;
//   weight grad     dW[r, c, k] = sum_{n, o} dy[n, r, o] x[n, g*ci + c, tap(o, k)].
// Each output element sums its own terms in one fixed order (c, then k in
// row-major order), so the results do not depend on the split of the grid.
#pragma once

#include "elements.h"

namespace convt_ext {

// The tensors of one call, lifted to three spatial dimensions, with their
// strides in the kernel's index type. `image` and `windows` are the two
// sides of the relation; `out` is the one an op writes.
template <typename scalar_t, typename index_t>
struct DepthwiseArgs {
  const scalar_t* image;    // conv: the input; conv_transpose: written (out)
  const scalar_t* windows;  // conv: written (out); conv_transpose and the weight gradient: read
  const scalar_t* weight;   // (C_w, ci, k0, k1, k2); the weight gradient writes it (out)
  const scalar_t* bias;     // or nullptr
  scalar_t* out;
  ImageStrides<index_t> is, ws, wt, os;  // image, windows, weight, out
  index_t bias_stride, ci, cw;           // channels per group on each side
};

// Along dimension d, the input position that output position a reads at
// tap k, or -1 in the padding: (*) forward for conv (tap), backward for
// conv_transpose (window_at, col2im's gather). One traversal, two directions.
template <bool transposed, typename index_t>
CONVT_HD index_t source(const Window3& w, int d, index_t a, index_t k) {
  if (transposed) return window_at<index_t>(a, k, w.stride[d], w.padding[d], w.dilation[d], w.windows[d]);
  const index_t i = tap<index_t>(a, k, w.stride[d], w.padding[d], w.dilation[d]);
  return i < static_cast<index_t>(w.image[d]) ? i : index_t(-1);
}

// acc + the sum over the taps k, in row-major order, of wk[k] * x[source(a, k)].
template <bool transposed, typename scalar_t, typename acc_t, typename index_t>
CONVT_HD acc_t sum_taps(const scalar_t* x, const ImageStrides<index_t>& xs, const scalar_t* wk,
                        const ImageStrides<index_t>& wt, const Window3& w, const index_t* a, acc_t acc) {
  for (index_t k0 = 0; k0 < static_cast<index_t>(w.kernel[0]); ++k0) {
    const index_t b0 = source<transposed>(w, 0, a[0], k0);
    if (b0 < 0) continue;
    for (index_t k1 = 0; k1 < static_cast<index_t>(w.kernel[1]); ++k1) {
      const index_t b1 = source<transposed>(w, 1, a[1], k1);
      if (b1 < 0) continue;
      for (index_t k2 = 0; k2 < static_cast<index_t>(w.kernel[2]); ++k2) {
        const index_t b2 = source<transposed>(w, 2, a[2], k2);
        if (b2 < 0) continue;
        acc += static_cast<acc_t>(wk[k0 * wt.d[0] + k1 * wt.d[1] + k2 * wt.d[2]]) *
               static_cast<acc_t>(x[b0 * xs.d[0] + b1 * xs.d[1] + b2 * xs.d[2]]);
      }
    }
  }
  return acc;
}

// conv: one element (n, r, o) of the window side.
template <typename scalar_t, typename acc_t, typename index_t>
CONVT_HD void depthwise_conv_element(const DepthwiseArgs<scalar_t, index_t>& a, const Window3& w,
                                     index_t c_windows, index_t idx) {
  index_t o[3];
  for (int d = 2; d >= 0; --d) {
    o[d] = idx % static_cast<index_t>(w.windows[d]);
    idx /= static_cast<index_t>(w.windows[d]);
  }
  const index_t r = idx % c_windows, n = idx / c_windows, g = r / a.cw;
  acc_t acc = a.bias ? static_cast<acc_t>(a.bias[r * a.bias_stride]) : acc_t(0);
  for (index_t c = 0; c < a.ci; ++c) {
    acc = sum_taps<false>(a.image + n * a.is.n + (g * a.ci + c) * a.is.c, a.is, a.weight + r * a.wt.n + c * a.wt.c,
                          a.wt, w, o, acc);
  }
  a.out[n * a.os.n + r * a.os.c + o[0] * a.os.d[0] + o[1] * a.os.d[1] + o[2] * a.os.d[2]] =
      static_cast<scalar_t>(acc);
}

// conv_transpose: one element (n, q, i) of the image side, a gather.
template <typename scalar_t, typename acc_t, typename index_t>
CONVT_HD void depthwise_transpose_element(const DepthwiseArgs<scalar_t, index_t>& a, const Window3& w,
                                          index_t c_image, index_t idx) {
  index_t i[3];
  for (int d = 2; d >= 0; --d) {
    i[d] = idx % static_cast<index_t>(w.image[d]);
    idx /= static_cast<index_t>(w.image[d]);
  }
  const index_t q = idx % c_image, n = idx / c_image, g = q / a.ci, j = q % a.ci;
  acc_t acc = a.bias ? static_cast<acc_t>(a.bias[q * a.bias_stride]) : acc_t(0);
  for (index_t c = 0; c < a.cw; ++c) {
    const index_t r = g * a.cw + c;
    acc = sum_taps<true>(a.windows + n * a.ws.n + r * a.ws.c, a.ws, a.weight + r * a.wt.n + j * a.wt.c, a.wt, w,
                         i, acc);
  }
  a.out[n * a.os.n + q * a.os.c + i[0] * a.os.d[0] + i[1] * a.os.d[1] + i[2] * a.os.d[2]] =
      static_cast<scalar_t>(acc);
}

// The weight gradient: one element (r, c, k) of dW, summed over the batch
// and the window positions in row-major order.
template <typename scalar_t, typename acc_t, typename index_t>
CONVT_HD void depthwise_weight_element(const DepthwiseArgs<scalar_t, index_t>& a, const Window3& w,
                                       index_t idx) {
  index_t k[3];
  for (int d = 2; d >= 0; --d) {
    k[d] = idx % static_cast<index_t>(w.kernel[d]);
    idx /= static_cast<index_t>(w.kernel[d]);
  }
  const index_t c = idx % a.ci, r = idx / a.ci, g = r / a.cw;
  index_t lo[3], hi[3];
  for (int d = 0; d < 3; ++d) {
    int64_t l, h;
    taps_inside(w.image[d], w.windows[d], k[d], w.stride[d], w.padding[d], w.dilation[d], &l, &h);
    lo[d] = static_cast<index_t>(l);
    hi[d] = static_cast<index_t>(h);
  }
  acc_t acc(0);
  for (index_t n = 0; n < static_cast<index_t>(w.batch); ++n) {
    const scalar_t* x = a.image + n * a.is.n + (g * a.ci + c) * a.is.c;
    const scalar_t* dy = a.windows + n * a.ws.n + r * a.ws.c;
    for (index_t o0 = lo[0]; o0 < hi[0]; ++o0) {
      const index_t i0 = tap<index_t>(o0, k[0], w.stride[0], w.padding[0], w.dilation[0]);
      for (index_t o1 = lo[1]; o1 < hi[1]; ++o1) {
        const index_t i1 = tap<index_t>(o1, k[1], w.stride[1], w.padding[1], w.dilation[1]);
        for (index_t o2 = lo[2]; o2 < hi[2]; ++o2) {
          const index_t i2 = tap<index_t>(o2, k[2], w.stride[2], w.padding[2], w.dilation[2]);
          acc += static_cast<acc_t>(dy[o0 * a.ws.d[0] + o1 * a.ws.d[1] + o2 * a.ws.d[2]]) *
                 static_cast<acc_t>(x[i0 * a.is.d[0] + i1 * a.is.d[1] + i2 * a.is.d[2]]);
        }
      }
    }
  }
  a.out[r * a.os.n + c * a.os.c + k[0] * a.os.d[0] + k[1] * a.os.d[1] + k[2] * a.os.d[2]] =
      static_cast<scalar_t>(acc);
}

// The element `idx` of one of the three ops: conv (op 0, `channels` C_w),
// conv_transpose (op 1, `channels` C_i), the weight gradient (op 2).
template <typename scalar_t, typename acc_t, typename index_t>
CONVT_HD void depthwise_element(int op, const DepthwiseArgs<scalar_t, index_t>& a, const Window3& w,
                                index_t channels, index_t idx) {
  if (op == 0) {
    depthwise_conv_element<scalar_t, acc_t, index_t>(a, w, channels, idx);
  } else if (op == 1) {
    depthwise_transpose_element<scalar_t, acc_t, index_t>(a, w, channels, idx);
  } else {
    depthwise_weight_element<scalar_t, acc_t, index_t>(a, w, idx);
  }
}

}  // namespace convt_ext
