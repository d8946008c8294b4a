// The view path (Note [im2col as a view] in view.h): conv, conv_transpose and
// the weight gradient as per-tap GEMMs on strided views of pixel memory.
#include "view.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/zeros.h>

#include <ATen/Context.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../gemm.h"
#include "../plan.h"
#include "args.h"

namespace convt_ext {

namespace {

// Output channels per GEMM: the width at which the ukernel runs fastest
// (benchmarks/NOTES.md item 25: 94 GFLOP/s a core at 64, 56-70 at 96-128 on
// an AVX2 EPYC); a block of rows x span pixels of one task.
constexpr int64_t kBlockN = 64, kRows = 4, kSpan = 256;
// Virtual rows a task of the plane form computes (Note [The padded plane]),
// and the output row width from which a channels-last image is read in
// place by the row form instead.
constexpr int64_t kPlaneRows = 128, kWideRows = 32;


// t (N, C, *spatial) as the 5-d pixel tensor (N, S0, S1, S2, C), contiguous:
// a view where t is channels-last already, one copy otherwise.
at::Tensor pixels(const at::Tensor& t) {
  at::Tensor v = t;
  while (v.dim() < 2 + kMaxDims) v = v.unsqueeze(2);
  return v.permute({0, 2, 3, 4, 1}).contiguous();
}

// Whether image position tap(o, k) along dimension i lies inside the image.
bool tap_inside(const Window3& w, int i, int64_t o, int64_t k, int64_t* at) {
  *at = tap(o, k, w.stride[i], w.padding[i], w.dilation[i]);
  return *at >= 0 && *at < w.image[i];
}

// Whether the plane form computes conv or the weight gradient (Note [The
// padded plane]): a planar image needs a copy anyway, and short output rows
// are too few for the ukernel; a channels-last image with long rows is read
// in place by the row form.
bool plane_form(const at::Tensor& image, const Window3& call) {
  return !pixel_memory(image) || call.windows[2] < kWideRows;  // view_offer counts the same
}

// The plane's virtual row width (make_plane's wv).
int64_t plane_wv(const Window3& w) {
  const int64_t s2 = w.stride[2];
  const int64_t span2 = (w.windows[2] - 1) * s2 + (w.kernel[2] - 1) * w.dilation[2] + 1;
  return (span2 + s2 - 1) / s2;
}

// The floats of make_plane's plane of a `c`-channel image.
// (In double: a padding as large as the image's int64 bound allows makes a
// plane no tensor could be.)
double plane_floats(const Window3& w, int64_t c) {
  const int64_t s1 = w.stride[1];
  const int64_t span1 = (w.windows[1] - 1) * s1 + (w.kernel[1] - 1) * w.dilation[1] + 1;
  return double(w.batch) * w.image[0] * s1 * ((span1 + s1 - 1) / s1 + 1) * double(plane_wv(w)) *
         w.stride[2] * c;
}

// The weight gradient from its partials (ranges, G, T, Og, Cg): summed in
// range order, then laid out as the weight (G*Og, Cg, *kernel).
at::Tensor finish_weight(const at::Tensor& partials, int64_t ranges, at::IntArrayRef weight_size) {
  at::Tensor sum = partials.select(0, 0);
  for (int64_t r = 1; r < ranges; ++r) sum.add_(partials.select(0, r));
  return sum.permute({0, 2, 3, 1}).reshape(weight_size).contiguous();
}

// The tasks of one call: (n, p0, a block of kRows positions along dim 1, a
// span of kSpan positions along dim 2) of the side whose rows a task owns.
struct Tasks {
  int64_t extent[kMaxDims];
  int64_t row_blocks, spans;
  Tasks(int64_t batch, const int64_t* e) {
    std::copy(e, e + kMaxDims, extent);
    row_blocks = (e[1] + kRows - 1) / kRows;
    spans = (e[2] + kSpan - 1) / kSpan;
    count = batch * e[0] * row_blocks * spans;
  }
  int64_t count;
  struct Box {
    int64_t n, p0, r0, r1, m0, m1;
  };
  Box at(int64_t t) const {
    Box b;
    const int64_t s = t % spans;
    t /= spans;
    const int64_t r = t % row_blocks;
    t /= row_blocks;
    b.p0 = t % extent[0];
    b.n = t / extent[0];
    b.r0 = r * kRows;
    b.r1 = std::min(b.r0 + kRows, extent[1]);
    b.m0 = s * kSpan;
    b.m1 = std::min(b.m0 + kSpan, extent[2]);
    return b;
  }
  // The first element of pixel (n, p0, p1, p2) of a pixel tensor of `c` channels.
  int64_t pixel(const Box& b, int64_t p1, int64_t p2, int64_t c) const {
    return (((b.n * extent[0] + b.p0) * extent[1] + p1) * extent[2] + p2) * c;
  }
};

// The rows a task owns, set to the bias (or zero) before the taps add up.
void start_rows(float* out, const Tasks& t, const Tasks::Box& b, int64_t c, const float* bias) {
  for (int64_t r = b.r0; r < b.r1; ++r) {
    float* row = out + t.pixel(b, r, b.m0, c);
    if (bias == nullptr) {
      std::fill(row, row + (b.m1 - b.m0) * c, 0.f);
      continue;
    }
    for (int64_t m = 0; m < b.m1 - b.m0; ++m) std::memcpy(row + m * c, bias, c * sizeof(float));
  }
}

// The weights as the GEMMs' B operands, prepared once per call: for each
// group g and tap t, the tap's (K x N) block in panels of kBlockN columns,
// each panel contiguous (K x kBlockN, the last one padded with zeros), so
// that a GEMM reads its B as one run of memory (benchmarks/NOTES.md item 27).
struct Panels {
  at::Tensor data;  // (G, T, ceil(N / kBlockN), K, kBlockN)
  int64_t T, blocks, K;
  // The panel of columns n0 .. n0 + kBlockN - 1 of group g's tap t; its ld is kBlockN.
  static constexpr int64_t ld = kBlockN;
  const float* at(int64_t g, int64_t t, int64_t n0) const {
    return data.const_data_ptr<float>() + ((g * T + t) * blocks + n0 / kBlockN) * K * kBlockN;
  }
};

// The panels of a weight viewed as (G, a, b, *kernel): `k_first` when its
// K (input channels of the GEMM) come before its N.
Panels tap_panels(const at::Tensor& weight, int64_t groups, bool k_first) {
  Panels p;
  p.T = c10::multiply_integers(weight.sizes().slice(2));
  const at::Tensor w = weight.reshape({groups, -1, weight.size(1), p.T});
  at::Tensor major = k_first ? w.permute({0, 3, 1, 2}) : w.permute({0, 3, 2, 1});  // (G, T, K, N)
  p.K = major.size(2);
  const int64_t N = major.size(3);
  p.blocks = (N + kBlockN - 1) / kBlockN;
  p.data = at::zeros({groups, p.T, p.blocks, p.K, kBlockN}, weight.options());
  for (int64_t b = 0; b < p.blocks; ++b) {
    const int64_t n = std::min(kBlockN, N - b * kBlockN);
    p.data.select(2, b).narrow(3, 0, n).copy_(major.narrow(3, b * kBlockN, n));
  }
  return p;
}

// The floats of tap_panels' panels.
double panel_floats(int64_t groups, int64_t T, int64_t K, int64_t N) {
  return double(groups) * T * K * ((N + kBlockN - 1) / kBlockN) * kBlockN;
}

// Runs task_fn(range, task, calls) over `count` tasks in for_each_task's fixed
// ranges, and counts the GEMMs.
template <typename F>
void run_tasks(const at::Tensor& like, int64_t count, const F& task_fn) {
  std::atomic<int64_t> calls{0};
  for_each_task(like, count, [&](int64_t range, int64_t begin, int64_t end) {
    int64_t local = 0;
    for (int64_t i = begin; i < end; ++i) task_fn(range, i, local);
    calls.fetch_add(local, std::memory_order_relaxed);
    tap_gemms_done(0);
  });
  tap_gemms_done(calls.load());
}


// Runs fn(t, i0, k1, k2) for every kernel tap t = (k0, k1, k2), in order,
// whose offset k0 takes window plane o0 inside the image, at image plane i0:
// the taps a gather reads (conv and the weight gradient).
template <typename F>
void for_each_tap(const Window3& w, int64_t o0, const F& fn) {
  for (int64_t k0 = 0, t = 0; k0 < w.kernel[0]; ++k0) {
    int64_t i0;
    if (!tap_inside(w, 0, o0, k0, &i0)) {
      t += w.kernel[1] * w.kernel[2];
      continue;
    }
    for (int64_t k1 = 0; k1 < w.kernel[1]; ++k1) {
      for (int64_t k2 = 0; k2 < w.kernel[2]; ++k2, ++t) fn(t, i0, k1, k2);
    }
  }
}

// The window positions [*lo, *hi) of the span [m0, m1) whose tap k2 lies
// inside the image (taps_inside), and the image position *i2 of the first;
// false when there is none.
bool span_taps(const Window3& w, int64_t k2, int64_t m0, int64_t m1, int64_t* lo, int64_t* hi,
               int64_t* i2) {
  taps_inside(w.image[2], w.windows[2], k2, w.stride[2], w.padding[2], w.dilation[2], lo, hi);
  *lo = std::max(*lo, m0);
  *hi = std::min(*hi, m1);
  *i2 = tap(*lo, k2, w.stride[2], w.padding[2], w.dilation[2]);
  return *lo < *hi;
}

// Note [The padded plane]
// The row form's GEMMs are one output row long: M = 7 or 14 for ResNet's
// late layers, 4 to 32 for DCGAN's, too few rows for the ukernel. The plane
// form makes M as long as it likes. The image is copied once into a zeroed
// plane (N, I0, s1, rows, width, C): the padding is written out, and image
// row i1 (padded: i1 + p1) goes to phase (i1 + p1) % s1, row (i1 + p1) / s1.
// Then output row o1's tap k1 reads phase (k1 d1) % s1, row o1 + (k1 d1) / s1:
// consecutive output rows read consecutive rows of one phase. With width a
// multiple of s2 and wv = width / s2, the output's "virtual" pixel
// m = o1 wv + o2 reads plane pixel m s2 + k2 d2 of that phase from the tap's
// first row on, a single matrix of leading dimension s2 C for every m. The
// wv - O2 virtual columns past each output row are computed and dropped (or,
// in the weight gradient, meet zeros). A planar input needs one conversion
// anyway, which the plane replaces; the output is written from each task's
// block straight into its format. Rows below (k2 - 1) d2 read past a
// phase's last row: one row of zeros more per phase keeps them inside.
struct Plane {
  at::Tensor data;
  int64_t phases, rows, width, wv;
  // The first element that tap (k1, k2) of output row 0 reads, in image plane i0 of sample n.
  int64_t at(const Window3& w, int64_t n, int64_t i0, int64_t k1, int64_t k2, int64_t c) const {
    const int64_t r1 = k1 * w.dilation[1];
    return ((((n * w.image[0] + i0) * phases + r1 % phases) * rows + r1 / phases) * width +
            k2 * w.dilation[2]) * c;
  }
};

// For the virtual rows [m0, m1) of a plane of row width wv, the offset of
// each real one, o1 * row + o2 * col (o1 = m / wv, o2 = m % wv < O2), or -1
// for a dropped one.
void virtual_places(int64_t m0, int64_t m1, int64_t wv, int64_t O2, int64_t row, int64_t col,
                    int64_t* at) {
  int64_t o1 = m0 / wv, o2 = m0 % wv;
  for (int64_t m = 0; m < m1 - m0; ++m) {
    at[m] = o2 < O2 ? o1 * row + o2 * col : -1;
    if (++o2 == wv) {
      o2 = 0;
      ++o1;
    }
  }
}

// A block of `rows` virtual rows of O channels (row m at block + m * O),
// into sample n of an output of `plane` pixels a channel, from pixel
// `offset` on: row m to pixel offset + at[m], or nowhere where at[m] is -1.
// Pixel rows into pixel memory, or each channel's run of pixels into a
// planar output; each row's place is found once (virtual_places), not per
// channel.
void write_block(const float* block, int64_t rows, const int64_t* at, float* out, bool pixels_out,
                 int64_t n, int64_t O, int64_t plane, int64_t offset) {
  if (pixels_out) {
    for (int64_t m = 0; m < rows; ++m) {
      if (at[m] >= 0) std::memcpy(out + (n * plane + offset + at[m]) * O, block + m * O, O * sizeof(float));
    }
    return;
  }
  for (int64_t o = 0; o < O; ++o) {
    float* dst = out + (n * O + o) * plane + offset;
    for (int64_t m = 0; m < rows; ++m) {
      if (at[m] >= 0) dst[at[m]] = block[m * O + o];
    }
  }
}

// A task's block of kPlaneRows rows of O channels, set to the bias (or zero).
float* start_block(const at::Tensor& like, int64_t rows, int64_t O, const float* bias) {
  float* pc = scratch(Slot::Product, {kPlaneRows, O}, like.options()).mutable_data_ptr<float>();
  for (int64_t m = 0; m < rows; ++m) {
    if (bias) std::memcpy(pc + m * O, bias, O * sizeof(float)); else std::fill(pc + m * O, pc + (m + 1) * O, 0.f);
  }
  return pc;
}

Plane make_plane(const at::Tensor& image, const Window3& w) {
  Plane pl;
  const int64_t s1 = w.stride[1], s2 = w.stride[2], C = image.size(1);
  const int64_t span1 = (w.windows[1] - 1) * s1 + (w.kernel[1] - 1) * w.dilation[1] + 1;
  pl.phases = s1;
  pl.rows = (span1 + s1 - 1) / s1 + 1;  // plane_floats counts the same
  pl.wv = plane_wv(w);
  pl.width = pl.wv * s2;
  pl.data = at::zeros({w.batch, w.image[0], s1, pl.rows, pl.width, C}, image.options());
  at::Tensor x = image;
  while (x.dim() < 2 + kMaxDims) x = x.unsqueeze(2);
  x = x.permute({0, 2, 3, 4, 1});  // (N, I0, I1, I2, C), strided as it comes
  const int64_t p1 = w.padding[1], p2 = w.padding[2];
  const int64_t cols = std::min(w.image[2], pl.width - std::min(p2, pl.width));
  if (cols <= 0) return pl;
  for (int64_t phase = 0; phase < s1; ++phase) {
    const int64_t first = ((phase - p1) % s1 + s1) % s1;  // the first image row of this phase
    if (first >= w.image[1]) continue;
    const int64_t row = (first + p1) / s1;
    const int64_t count = std::min((w.image[1] - first + s1 - 1) / s1, pl.rows - row);
    if (count <= 0) continue;
    pl.data.select(2, phase).narrow(2, row, count).narrow(3, p2, cols).copy_(
        x.slice(2, first, first + (count - 1) * s1 + 1, s1).narrow(3, 0, cols));
  }
  return pl;
}

// The plane form of conv: a task computes kPlaneRows virtual rows of one
// output plane (n, o0) into its block, then writes the real ones out.
void conv_plane(const at::Tensor& input, const Panels& wt, const at::Tensor& bias,
                const Window3& call, int64_t groups, int64_t O, const at::Tensor& out) {
  const int64_t C = input.size(1), Cg = C / groups, Og = O / groups;
  const Plane pl = make_plane(input, call);
  const int64_t O0 = call.windows[0], O1 = call.windows[1], O2 = call.windows[2];
  const int64_t virtual_rows = O1 * pl.wv, blocks = (virtual_rows + kPlaneRows - 1) / kPlaneRows;
  const float* px = pl.data.const_data_ptr<float>();
  const float* pb = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* py = out.mutable_data_ptr<float>();
  // out is (N, O, *windows) in pixel memory or planar: the strides of a channel and a pixel.
  const bool pixels_out = pixel_memory(out);
  const int64_t s2 = call.stride[2];
  run_tasks(input, call.batch * O0 * blocks, [&](int64_t, int64_t task, int64_t& calls) {
    const int64_t m0 = task % blocks * kPlaneRows, m1 = std::min(m0 + kPlaneRows, virtual_rows);
    const int64_t o0 = task / blocks % O0, n = task / blocks / O0;
    float* pc = start_block(input, m1 - m0, O, pb);
    for_each_tap(call, o0, [&](int64_t t, int64_t i0, int64_t k1, int64_t k2) {
      const float* a = px + pl.at(call, n, i0, k1, k2, C) + m0 * s2 * C;
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t n0 = 0; n0 < Og; n0 += kBlockN, ++calls) {
          tap_gemm(m1 - m0, std::min(kBlockN, Og - n0), Cg, a + g * Cg, s2 * C, wt.at(g, t, n0), wt.ld,
                   pc + g * Og + n0, O);
        }
      }
    });
    int64_t at[kPlaneRows];
    virtual_places(m0, m1, pl.wv, O2, O2, 1, at);
    write_block(pc, m1 - m0, at, py, pixels_out, n, O, O0 * O1 * O2, o0 * O1 * O2);
  });
}

// The plane form of the weight gradient: grad_output's block turned onto
// the virtual rows, zero on the dropped ones, against the plane's views.
void weight_plane(const at::Tensor& input, const at::Tensor& grad_output, const Window3& call,
                  int64_t groups, const at::Tensor& partials) {
  const int64_t C = input.size(1), O = grad_output.size(1), Cg = C / groups, Og = O / groups;
  const int64_t T = call.kernel_numel();
  const Plane pl = make_plane(input, call);
  const int64_t O0 = call.windows[0], O1 = call.windows[1], O2 = call.windows[2];
  const int64_t virtual_rows = O1 * pl.wv, blocks = (virtual_rows + kPlaneRows - 1) / kPlaneRows;
  at::Tensor dy = grad_output;
  while (dy.dim() < 2 + kMaxDims) dy = dy.unsqueeze(2);
  const int64_t sn = dy.stride(0), sc = dy.stride(1), s0 = dy.stride(2), s1 = dy.stride(3), s2 = dy.stride(4);
  const float* pdy = dy.const_data_ptr<float>();
  const float* px = pl.data.const_data_ptr<float>();
  float* pp = partials.mutable_data_ptr<float>();
  const int64_t stride2 = call.stride[2];
  run_tasks(input, call.batch * O0 * blocks, [&](int64_t range, int64_t task, int64_t& calls) {
    const int64_t m0 = task % blocks * kPlaneRows, m1 = std::min(m0 + kPlaneRows, virtual_rows);
    const int64_t o0 = task / blocks % O0, n = task / blocks / O0;
    const at::Tensor turned = scratch(Slot::Operand, {O, kPlaneRows}, input.options());
    float* pt = turned.mutable_data_ptr<float>();
    int64_t at[kPlaneRows];
    virtual_places(m0, m1, pl.wv, O2, s1, s2, at);
    for (int64_t o = 0; o < O; ++o) {
      const float* src = pdy + n * sn + o * sc + o0 * s0;
      float* dst = pt + o * kPlaneRows;
      for (int64_t m = 0; m < m1 - m0; ++m) dst[m] = at[m] >= 0 ? src[at[m]] : 0.f;
    }
    float* part = pp + range * groups * T * Og * Cg;
    for_each_tap(call, o0, [&](int64_t t, int64_t i0, int64_t k1, int64_t k2) {
      const float* b = px + pl.at(call, n, i0, k1, k2, C) + m0 * stride2 * C;
      for (int64_t g = 0; g < groups; ++g) {
        float* dw_t = part + (g * T + t) * Og * Cg;
        for (int64_t n0 = 0; n0 < Cg; n0 += kBlockN, ++calls) {
          tap_gemm(Og, std::min(kBlockN, Cg - n0), m1 - m0, pt + g * Og * kPlaneRows, kPlaneRows,
                   b + g * Cg + n0, stride2 * C, dw_t + n0, Cg);
        }
      }
    });
  });
}

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
  // The plane (N, W0, rows, width, C): window positions [lo, hi) along
  // dimensions 1 and 2, zero outside the input, and one row of zeros more
  // for the virtual columns of the last row (as make_plane's).
  const int64_t W0 = call.windows[0], rows = a1.hi - a1.lo + 1, width = a2.hi - a2.lo;
  const at::Tensor plane = at::zeros({call.batch, W0, rows, width, C}, input.options());
  {
    at::Tensor x = input;
    while (x.dim() < 2 + kMaxDims) x = x.unsqueeze(2);
    x = x.permute({0, 2, 3, 4, 1});  // (N, W0, W1, W2, C), strided as it comes
    const int64_t b1 = std::max<int64_t>(a1.lo, 0), e1 = std::min(a1.hi, call.windows[1]);
    const int64_t b2 = std::max<int64_t>(a2.lo, 0), e2 = std::min(a2.hi, call.windows[2]);
    if (b1 < e1 && b2 < e2) {
      plane.narrow(2, b1 - a1.lo, e1 - b1).narrow(3, b2 - a2.lo, e2 - b2).copy_(
          x.narrow(2, b1, e1 - b1).narrow(3, b2, e2 - b2));
    }
  }
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

// Whether the ukernel can address every operand of the call's tap GEMMs.
// oneDNN's brgemm descriptor holds leading dimensions, and the byte offsets
// of an operand's rows, as int: a leading dimension of 2^29 floats already
// fails (std::bad_alloc), and one row of a huge stride can reach it (a
// conv_transpose at stride 2^25 over 16 channels). The largest leading
// dimension of any form is s2 * c_image (conv's and the weight gradient's
// gather, conv_transpose's strided accumulation) or c_windows, over at most
// kSpan rows (kPlaneRows in the plane forms).
bool ukernel_reaches(const Window3& call, int64_t c_image, int64_t c_windows) {
  const double ld = std::max(double(call.stride[2]) * double(c_image), double(c_windows));
  return double(kSpan) * ld * sizeof(float) <= double(std::numeric_limits<int32_t>::max());
}

}  // namespace

Offer view_offer(ConvOp op, const at::Tensor& like, const Window3& call, int64_t c_image,
                 int64_t c_windows, int64_t groups, bool image_pixels, bool windows_pixels,
                 bool output_pixels, bool pointwise) {
  if (!like.is_cpu() || like.scalar_type() != at::kFloat ||
      call.batch == 0 || c_image == 0 || c_windows == 0 || call.image_numel() == 0 ||
      call.window_numel() == 0 || !tap_gemm_runs() || fp32_convs_in_bf16() ||
      !ukernel_reaches(call, c_image, c_windows)) {
    return {};
  }
  const int64_t cg_image = c_image / groups, cg_windows = c_windows / groups;
  // Every buffer of the call: the weights; the image's plane, or the copies
  // into pixel memory and back; per task its block of products or of
  // grad_output turned; the weight gradient's partials.
  const double image = double(call.batch) * c_image * call.image_numel();
  const double windows = double(call.batch) * c_windows * call.window_numel();
  const double weights = double(groups) * cg_image * cg_windows * call.kernel_numel();
  const double tasks = double(tasks_at_once(like));
  const bool plane = !image_pixels || call.windows[2] < kWideRows;
  const double gather = plane ? plane_floats(call, c_image) + tasks * kPlaneRows * c_windows
                               : (image_pixels ? 0 : image);
  // The weights' panels (for the weight gradient: its sum, no larger)
  double floats = op == ConvOp::ConvTranspose ? panel_floats(groups, call.kernel_numel(), cg_windows, cg_image)
                                              : panel_floats(groups, call.kernel_numel(), cg_image, cg_windows);
  if (op == ConvOp::ConvTranspose) {
    floats += transpose_plane_form(windows_pixels, call)
                  ? transpose_plane_floats(call, c_windows) + tasks * kPlaneRows * c_image
                  : (windows_pixels ? 0 : windows) + (output_pixels ? 0 : image);
  } else {
    // conv, the weight gradient, or both (conv_transpose's backward)
    floats += (op == ConvOp::ConvTransposeBackward ? 2 : 1) * gather;
    if (op != ConvOp::ConvWeight) floats += plane || output_pixels ? 0 : windows;
    if (op != ConvOp::Conv) {
      floats += (windows_pixels ? 0 : windows) + tasks * (weights + kRows * kSpan * c_windows);
    }
  }
  if (floats * sizeof(float) > double(workspace_limit())) return {};
  bool overlap = false;  // windows that share pixels: col2im sums, where the view path gathers
  for (int i = 0; i < kMaxDims; ++i) overlap |= call.kernel[i] > call.stride[i];
  static const bool avx512 = cpu_avx512f();
  return {true, view_rule(op, avx512, image_pixels, windows_pixels, like.dim() - 2, overlap, cg_image,
                         cg_windows, pointwise)};
}

at::Tensor conv_view(const at::Tensor& input, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const Window3& call, int64_t groups,
                     bool planar_out) {
  const int dims = static_cast<int>(input.dim()) - 2;
  const int64_t C = input.size(1), O = weight.size(0), Cg = C / groups, Og = O / groups;
  const Panels wt = tap_panels(weight, groups, false);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (plane_form(input, call)) {
    at::Tensor out = empty_output(planar_out, call.batch, O, call.windows, dims, input.options());
    conv_plane(input, wt, b, call, groups, O, out);
    return out;
  }
  const at::Tensor x = pixels(input);
  at::Tensor out = empty_output(false, call.batch, O, call.windows, dims, input.options());
  const float* px = x.const_data_ptr<float>();
  const float* pb = b.defined() ? b.const_data_ptr<float>() : nullptr;
  float* py = out.mutable_data_ptr<float>();
  const Tasks tasks(call.batch, call.windows), image(call.batch, call.image);
  const int64_t s2 = call.stride[2];
  run_tasks(input, tasks.count, [&](int64_t, int64_t task, int64_t& calls) {
    const Tasks::Box box = tasks.at(task);
    start_rows(py, tasks, box, O, pb);
    Tasks::Box in = box;  // the same sample, on the image side
    for_each_tap(call, box.p0, [&](int64_t t, int64_t i0, int64_t k1, int64_t k2) {
      int64_t lo, hi, i2;
      if (!span_taps(call, k2, box.m0, box.m1, &lo, &hi, &i2)) return;
      in.p0 = i0;
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t r = box.r0; r < box.r1; ++r) {
          int64_t i1;
          if (!tap_inside(call, 1, r, k1, &i1)) continue;
          const float* a = px + image.pixel(in, i1, i2, C) + g * Cg;
          float* c = py + tasks.pixel(box, r, lo, O) + g * Og;
          for (int64_t n0 = 0; n0 < Og; n0 += kBlockN, ++calls) {
            tap_gemm(hi - lo, std::min(kBlockN, Og - n0), Cg, a, s2 * C, wt.at(g, t, n0), wt.ld, c + n0, O);
          }
        }
      }
    });
  });
  return out;
}

at::Tensor conv_transpose_view(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const Window3& call,
                               int64_t groups, bool planar_out) {
  const int dims = static_cast<int>(input.dim()) - 2;
  const int64_t C = input.size(1), O = call.channels, Cg = C / groups, Og = O / groups;
  const Panels wt = tap_panels(weight, groups, true);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (transpose_plane_form(pixel_memory(input), call)) {
    at::Tensor out = empty_output(planar_out, call.batch, O, call.image, dims, input.options());
    conv_transpose_plane(input, wt, b, call, groups, out);
    return out;
  }
  const at::Tensor x = pixels(input);
  at::Tensor out = empty_output(false, call.batch, O, call.image, dims, input.options());
  const float* px = x.const_data_ptr<float>();
  const float* pb = b.defined() ? b.const_data_ptr<float>() : nullptr;
  float* py = out.mutable_data_ptr<float>();
  // A task owns rows of the output image and gathers the window positions
  // (input pixels) whose taps land on them, as col2im does.
  const Tasks tasks(call.batch, call.image), windows(call.batch, call.windows);
  const int64_t s2 = call.stride[2];
  run_tasks(input, tasks.count, [&](int64_t, int64_t task, int64_t& calls) {
    const Tasks::Box box = tasks.at(task);
    start_rows(py, tasks, box, O, pb);
    Tasks::Box in = box;
    for (int64_t k0 = 0, t = 0; k0 < call.kernel[0]; ++k0) {
      in.p0 = window_at(box.p0, k0, call.stride[0], call.padding[0], call.dilation[0], call.windows[0]);
      if (in.p0 < 0) {
        t += call.kernel[1] * call.kernel[2];
        continue;
      }
      for (int64_t k1 = 0; k1 < call.kernel[1]; ++k1) {
        for (int64_t k2 = 0; k2 < call.kernel[2]; ++k2, ++t) {
          // The window positions whose tap k2 lands in the span [m0, m1).
          int64_t lo, hi;
          taps_inside(box.m1 - box.m0, call.windows[2], k2, s2, call.padding[2] + box.m0,
                      call.dilation[2], &lo, &hi);
          if (lo >= hi) continue;
          const int64_t i2 = tap(lo, k2, s2, call.padding[2], call.dilation[2]);
          for (int64_t g = 0; g < groups; ++g) {
            for (int64_t r = box.r0; r < box.r1; ++r) {
              const int64_t o1 = window_at(r, k1, call.stride[1], call.padding[1], call.dilation[1], call.windows[1]);
              if (o1 < 0) continue;
              const float* a = px + windows.pixel(in, o1, lo, C) + g * Cg;
              float* c = py + tasks.pixel(box, r, i2, O) + g * Og;
              for (int64_t n0 = 0; n0 < Og; n0 += kBlockN, ++calls) {
                tap_gemm(hi - lo, std::min(kBlockN, Og - n0), Cg, a, C, wt.at(g, t, n0), wt.ld, c + n0, s2 * O);
              }
            }
          }
        }
      }
    }
  });
  return out;
}

at::Tensor conv_weight_view(const at::Tensor& input, const at::Tensor& grad_output,
                            const Window3& call, int64_t groups, at::IntArrayRef weight_size) {
  const int64_t C = input.size(1), O = grad_output.size(1), Cg = C / groups, Og = O / groups;
  const int64_t T = call.kernel_numel();
  const Tasks tasks(call.batch, call.windows), image(call.batch, call.image);
  const bool plane = plane_form(input, call);
  const int64_t count = plane ? call.batch * call.windows[0] *
                                    ((call.windows[1] * plane_wv(call) + kPlaneRows - 1) / kPlaneRows)
                              : tasks.count;
  const int64_t ranges = std::min(count, tasks_at_once(input));
  // One partial (G, T, Og, Cg) per fixed range of tasks, summed in range order.
  const at::Tensor partials = at::zeros({std::max<int64_t>(ranges, 1), groups, T, Og, Cg}, input.options());
  if (plane) {
    weight_plane(input, grad_output, call, groups, partials);
    return finish_weight(partials, ranges, weight_size);
  }
  const at::Tensor x = pixels(input), dy = pixels(grad_output);
  const float* px = x.const_data_ptr<float>();
  const float* pdy = dy.const_data_ptr<float>();
  float* pp = partials.mutable_data_ptr<float>();
  const int64_t s2 = call.stride[2], span = std::min(kSpan, call.windows[2]);
  run_tasks(input, tasks.count, [&](int64_t range, int64_t task, int64_t& calls) {
    const Tasks::Box box = tasks.at(task);
    // The task's rows of grad_output, turned (row, O, span): the A operand
    // of every tap, turned once and read from the cache.
    const at::Tensor turned = scratch(Slot::Operand, {kRows, O, span}, input.options());
    float* pt = turned.mutable_data_ptr<float>();
    const int64_t width = box.m1 - box.m0;
    for (int64_t r = box.r0; r < box.r1; ++r) {
      const float* src = pdy + tasks.pixel(box, r, box.m0, O);
      float* dst = pt + (r - box.r0) * O * span;
      for (int64_t m = 0; m < width; ++m) {
        for (int64_t o = 0; o < O; ++o) dst[o * span + m] = src[m * O + o];
      }
    }
    float* part = pp + range * groups * T * Og * Cg;
    Tasks::Box in = box;
    for_each_tap(call, box.p0, [&](int64_t t, int64_t i0, int64_t k1, int64_t k2) {
      int64_t lo, hi, i2;
      if (!span_taps(call, k2, box.m0, box.m1, &lo, &hi, &i2)) return;
      in.p0 = i0;
      for (int64_t g = 0; g < groups; ++g) {
        float* dw_t = part + (g * T + t) * Og * Cg;
        for (int64_t r = box.r0; r < box.r1; ++r) {
          int64_t i1;
          if (!tap_inside(call, 1, r, k1, &i1)) continue;
          const float* a = pt + ((r - box.r0) * O + g * Og) * span + (lo - box.m0);
          const float* b = px + image.pixel(in, i1, i2, C) + g * Cg;
          for (int64_t n0 = 0; n0 < Cg; n0 += kBlockN, ++calls) {
            tap_gemm(Og, std::min(kBlockN, Cg - n0), hi - lo, a, span, b + n0, s2 * C, dw_t + n0, Cg);
          }
        }
      }
    });
  });
  return finish_weight(partials, ranges, weight_size);
}

bool view_rule(ConvOp op, bool avx512, bool image_pixels, bool windows_pixels, int64_t dims,
               bool overlap, int64_t cg_image, int64_t cg_windows, bool pointwise) {
  // A tap's GEMM needs enough channels on both sides, and a 1x1 layer has no
  // columns to copy.
  if (pointwise || cg_image < 16 || cg_windows < 16) return false;
  // With AVX-512 the ukernel runs the per-tap GEMMs near the FMA peak
  // (87-92% on an Intel Xeon in the prototype), above the BLAS on im2col's
  // columns (73-85%).
  if (avx512) return true;
  // With AVX2 the BLAS is as fast a GEMM, so the view path wins where it
  // saves a copy (benchmarks/NOTES.md items 25 and 27): an image already in
  // pixel memory, read in place; conv_transpose with overlapping windows in
  // 2-d or 3-d, whose strided accumulation replaces col2im's sums; and conv
  // and its weight gradient on a planar image with overlapping windows,
  // whose columns repeat each pixel, in 3-d, or in 2-d while a tap's K x N
  // block is at most 128 x 256 (beyond, the per-tap GEMMs slow down as B
  // leaves the cache). In 1-d the columns win.
  switch (op) {
    case ConvOp::Conv:
    case ConvOp::ConvWeight:
    case ConvOp::ConvTransposeBackward:
      return image_pixels ||
             (overlap && (dims == 3 || (dims == 2 && cg_image * cg_windows <= 128 * 256)));
    case ConvOp::ConvTranspose:
      return windows_pixels || (dims >= 2 && overlap);
  }
  return false;
}

}  // namespace convt_ext
