// The view path's phase form (Note [conv_transpose by output phases],
// below): conv_transpose of a planar input as a stride-1 convolution per
// output phase over a padded plane, in the plane form's blocks of virtual
// rows (view_plane.cpp).
#include "view_forms.h"

#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "args.h"

namespace convt_ext::view_forms {

namespace {

// Note [conv_transpose by output phases]
// conv_transpose's row form gathers, for each output row, the window
// positions whose taps land on it: 4 to 32 of them in DCGAN's layers, too
// few rows for the ukernel. Split instead each output position q along a
// dimension by its phase r = (q + p) mod s, q = r - p + s j: the taps that
// reach phase r are the k with k d = r (mod s), and tap k reaches it from
// window position o = j - e_k, e_k = (k d - r) / s. Each phase is then a
// direct convolution at stride 1 of the input with its own taps: the
// guide's relationship 14 (a transposed convolution is a direct one on the
// zero-inserted input, kernel rotated) with the s - 1 inserted zeros taken
// out, since each phase meets only the taps that do not multiply them. At
// stride 1 the padded plane of Note [The padded plane] has one phase and
// rows as wide as itself, so along dimensions 1 and 2 a tap's operand for
// kPlaneRows virtual rows of one output phase is one run of pixels, leading
// dimension C: M = 128 again. Every output pixel belongs to one phase and
// one task, which sums its taps (k0, k1, k2) in order, so no two tasks add
// into one pixel and the result does not depend on the thread count.
struct Phase {
  int64_t r, jlo, jhi;               // the outputs q = r - p + s j, j in [jlo, jhi)
  std::vector<int64_t> taps, shift;  // the taps k that reach them, and their e_k
};
struct PhaseAxis {
  std::vector<Phase> phases;  // the phases with outputs and taps
  int64_t lo = 0, hi = 0;     // the window positions they read (the plane's, zero outside the input)
  bool bare = false;          // some output has no tap: stride larger than the kernel's reach
};

PhaseAxis phase_axis(const Window3& w, int i) {
  PhaseAxis a;
  const int64_t s = w.stride[i], p = w.padding[i], d = w.dilation[i], last = w.image[i] - 1 + p;
  // The phases of the taps, in increasing r (not a loop over r < s: s may
  // be huge where the image is one pixel).
  std::map<int64_t, Phase> by_phase;
  for (int64_t k = 0; k < w.kernel[i]; ++k) {
    Phase& ph = by_phase[k * d % s];
    ph.taps.push_back(k);
    ph.shift.push_back(k * d / s);  // (k d - r) / s
  }
  int64_t reached = 0;
  for (auto& [r, ph] : by_phase) {
    ph.r = r;
    ph.jlo = p - r <= 0 ? 0 : (p - r + s - 1) / s;
    ph.jhi = last - r < 0 ? 0 : (last - r) / s + 1;
    if (ph.jhi <= ph.jlo) continue;
    ++reached;
    // taps are in increasing k, so shift.back() is the largest e_k
    const int64_t lo = ph.jlo - ph.shift.back(), hi = ph.jhi - ph.shift.front();
    a.lo = a.phases.empty() ? lo : std::min(a.lo, lo);
    a.hi = a.phases.empty() ? hi : std::max(a.hi, hi);
    a.phases.push_back(std::move(ph));
  }
  // The image's positions fall into min(s, image) phases; those no tap reaches hold the bias.
  a.bare = reached < std::min(s, w.image[i]);
  return a;
}

// conv_transpose_plane's plane (N, W0, rows, width, C): window positions
// [lo, hi) along dimensions 1 and 2, zero outside the input, and one row of
// zeros more for the virtual columns of the last row (as make_plane's).
at::Tensor phase_plane(const at::Tensor& input, const Window3& call, const PhaseAxis& a1,
                       const PhaseAxis& a2, int64_t rows, int64_t width) {
  const at::Tensor plane =
      at::zeros({call.batch, call.windows[0], rows, width, input.size(1)}, input.options());
  at::Tensor x = input;
  while (x.dim() < 2 + kMaxDims) x = x.unsqueeze(2);
  x = x.permute({0, 2, 3, 4, 1});  // (N, W0, W1, W2, C), strided as it comes
  const int64_t b1 = std::max<int64_t>(a1.lo, 0), e1 = std::min(a1.hi, call.windows[1]);
  const int64_t b2 = std::max<int64_t>(a2.lo, 0), e2 = std::min(a2.hi, call.windows[2]);
  if (b1 < e1 && b2 < e2) {
    plane.narrow(2, b1 - a1.lo, e1 - b1).narrow(3, b2 - a2.lo, e2 - b2).copy_(
        x.narrow(2, b1, e1 - b1).narrow(3, b2, e2 - b2));
  }
  return plane;
}

}  // namespace

// Whether conv_transpose computes by output phases: where the input is
// planar, so that the plane replaces its conversion (and the output's), and
// a phase pair has at least half a task's virtual rows. With fewer (DCGAN's
// 4x4 images: 20) the row form is the faster (benchmarks/NOTES.md item 27),
// as it is on channels-last inputs, whose rows it reads in place.
bool transpose_plane_form(bool input_pixels, const Window3& call) {
  if (input_pixels) return false;
  const PhaseAxis a1 = phase_axis(call, 1), a2 = phase_axis(call, 2);
  if (a1.phases.empty() || a2.phases.empty()) return false;
  const Phase& first = a1.phases.front();
  return (first.jhi - first.jlo) * (a2.hi - a2.lo) >= kPlaneRows / 2;  // view_offer counts the same
}

// The floats of conv_transpose_plane's plane of a `c`-channel input.
double transpose_plane_floats(const Window3& w, int64_t c) {
  const PhaseAxis a1 = phase_axis(w, 1), a2 = phase_axis(w, 2);
  return double(w.batch) * w.windows[0] * (a1.hi - a1.lo + 1) * double(a2.hi - a2.lo) * c;
}

// The plane form of conv_transpose (Note [conv_transpose by output phases]):
// a task computes kPlaneRows virtual rows of one phase pair (r1, r2) of one
// output plane (n, q0) into its block, then writes the real ones out.
void conv_transpose_plane(const at::Tensor& input, const Panels& wt, const at::Tensor& bias,
                          const Window3& call, int64_t groups, const at::Tensor& out) {
  const int64_t C = input.size(1), O = call.channels, Cg = C / groups, Og = O / groups;
  const PhaseAxis a1 = phase_axis(call, 1), a2 = phase_axis(call, 2);
  if (a1.bare || a2.bare) {
    // The outputs no tap reaches hold the bias; the tasks overwrite the rest.
    if (bias.defined()) {
      std::vector<int64_t> shape(out.dim(), 1);
      shape[1] = O;
      out.copy_(bias.view(shape).expand_as(out));
    } else {
      out.zero_();
    }
  }
  if (a1.phases.empty() || a2.phases.empty()) return;
  // The plane of the window positions the phases read (phase_plane).
  const int64_t W0 = call.windows[0], rows = a1.hi - a1.lo + 1, width = a2.hi - a2.lo;
  const at::Tensor plane = phase_plane(input, call, a1, a2, rows, width);
  // The tasks: per sample and output plane, each phase pair's virtual rows in blocks.
  struct Block {
    const Phase *ph1, *ph2;
    int64_t m0, m1;
  };
  std::vector<Block> list;
  for (const Phase& ph1 : a1.phases) {
    for (const Phase& ph2 : a2.phases) {
      const int64_t virtual_rows = (ph1.jhi - ph1.jlo) * width;
      for (int64_t m0 = 0; m0 < virtual_rows; m0 += kPlaneRows) {
        list.push_back({&ph1, &ph2, m0, std::min(m0 + kPlaneRows, virtual_rows)});
      }
    }
  }
  const int64_t per_plane = static_cast<int64_t>(list.size()), I0 = call.image[0];
  const int64_t I1 = call.image[1], I2 = call.image[2];
  const float* px = plane.const_data_ptr<float>();
  const float* pb = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* py = out.mutable_data_ptr<float>();
  const bool pixels_out = pixel_memory(out);
  run_tasks(input, call.batch * I0 * per_plane, [&](int64_t, int64_t task, int64_t& calls) {
    const Block& blk = list[task % per_plane];
    const int64_t q0 = task / per_plane % I0, n = task / per_plane / I0;
    const Phase &ph1 = *blk.ph1, &ph2 = *blk.ph2;
    float* pc = start_block(input, blk.m1 - blk.m0, O, pb);
    for (int64_t k0 = 0; k0 < call.kernel[0]; ++k0) {
      const int64_t o0 = window_at(q0, k0, call.stride[0], call.padding[0], call.dilation[0], W0);
      if (o0 < 0) continue;
      const float* x0 = px + ((n * W0 + o0) * rows * width + blk.m0) * C;
      for (size_t i1 = 0; i1 < ph1.taps.size(); ++i1) {
        for (size_t i2 = 0; i2 < ph2.taps.size(); ++i2) {
          const int64_t t = (k0 * call.kernel[1] + ph1.taps[i1]) * call.kernel[2] + ph2.taps[i2];
          // virtual row m = a * width + b reads plane pixel m + base
          const int64_t base = (ph1.jlo - ph1.shift[i1] - a1.lo) * width + ph2.jlo - ph2.shift[i2] - a2.lo;
          for (int64_t g = 0; g < groups; ++g) {
            for (int64_t n0 = 0; n0 < Og; n0 += kBlockN, ++calls) {
              tap_gemm(blk.m1 - blk.m0, std::min(kBlockN, Og - n0), Cg, x0 + base * C + g * Cg, C,
                       wt.at(g, t, n0), wt.ld, pc + g * Og + n0, O);
            }
          }
        }
      }
    }
    int64_t at[kPlaneRows];
    virtual_places(blk.m0, blk.m1, width, ph2.jhi - ph2.jlo, call.stride[1] * I2, call.stride[2], at);
    const int64_t offset = (q0 * I1 + ph1.r - call.padding[1] + call.stride[1] * ph1.jlo) * I2 +
                           ph2.r - call.padding[2] + call.stride[2] * ph2.jlo;
    write_block(pc, blk.m1 - blk.m0, at, py, pixels_out, n, O, I0 * I1 * I2, offset);
  });
}

}  // namespace convt_ext::view_forms
