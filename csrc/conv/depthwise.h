// The depthwise path: convolutions with few channels per group computed
// directly, a sum over taps per output element, no GEMM (Note [Depthwise as a
// diagonal] in ../depthwise_elements.h). The same code on every device: the
// work is the private ops _depthwise_into and _depthwise_weight_into
// (../kernels.h), one kernel per dispatch key (cpu/depthwise_cpu.cpp,
// cuda/depthwise_cuda.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "path.h"

namespace convt_ext {

// At most this many channels per group on the side a sum runs over.
constexpr int64_t kDepthwiseChannels = 16;

// What the depthwise path makes of a call (path.h), as view_offer:
// `c_image` and `c_windows` the channel counts of the two sides of `call`;
// `cpu_rules` the device policy's (Note [Device policy] in ../plan.h).
Offer depthwise_offer(ConvOp op, const at::Tensor& like, const Window3& call, int64_t c_image,
                      int64_t c_windows, int64_t groups, bool cpu_rules);

// The "auto" rule, as a function of its inputs, for tests on any machine:
// `avx512` whether the CPU's vector loops run their AVX-512 build; `pixels`
// whether the input is in pixel (channels-last) memory; `ci` and `cw`
// channels per group on the image and the window side.
bool depthwise_rule(ConvOp op, bool cuda, bool avx512, bool pixels, int64_t ci, int64_t cw);

// Which build of the CPU's vector loops runs here: "avx512", "avx2" or
// "default" (Note [One loop, three instruction sets] in cpu/depthwise_cpu.cpp);
// and whether it is "avx512", for the rule.
std::string depthwise_cpu_isa();
bool depthwise_cpu_avx512();

// How often each of the CPU's loops ran, by name (pixels, phase_planes,
// blocked_planes, plane_rows, output_phases, weight_pixels, weight_planes,
// weight_blocked_planes), since the process began.
std::vector<std::pair<std::string, int64_t>> depthwise_cpu_loops();

// Whether planar depthwise convs may run by plane rows (Note [Plane rows] in
// cpu/depthwise_rows.inc; on by default); returns the old setting. For the
// tests of the loops it takes over.
bool set_plane_rows(bool on);

// conv: (N, C_out, *windows), in the input's memory (pixel or planar).
at::Tensor conv_depthwise(const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const Window3& call, int64_t groups);

// conv_transpose: (N, c_out, *image), in the input's memory.
at::Tensor conv_transpose_depthwise(const at::Tensor& input, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const Window3& call,
                                    int64_t groups, int64_t c_out);

// The weight gradient: a contiguous tensor of weight_size.
at::Tensor conv_weight_depthwise(const at::Tensor& input, const at::Tensor& grad_output,
                                 const Window3& call, int64_t groups, at::IntArrayRef weight_size);

}  // namespace convt_ext
