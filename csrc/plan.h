// The column planner: how a convolution's columns are split into tasks
// under the workspace limit, the scratch buffers they use, and the fixed
// ranges the tasks run in. Every convolution's column path (conv/columns.cpp)
// plans through it.
//
// Note [Column plans and the workspace limit]
// Two ways to feed the GEMMs, chosen per call:
//   wide:   with few window positions per sample, the columns of a chunk of
//           samples are laid side by side, [cols_0 | cols_1 | ...], and one
//           wide GEMM serves them all.
//   blocks: otherwise each sample is split into blocks (Blocks), and
//           each task runs im2col (or col2im) and its GEMMs for one block
//           into its own scratch. On the CPU the tasks run in parallel with
//           single-threaded steps: one parallel region per call instead of
//           one per step (for_each_task).
// Every column buffer of a call, on every path, counts against the
// workspace limit, across all the tasks that run at once: the wide path's
// two buffers together stay under it, and each of T parallel tasks gets
// limit / T. A block is as large as that allows (and at most one position
// of the last dimension, whatever the limit). conv_transpose splits its
// *output* into blocks, each computing the columns of the input windows that
// tap it, so a task owns its output pixels: no atomics, and every pixel sums
// its taps in the same order whatever the split, so results do not depend
// on the limit.
//
// Note [Determinism across thread counts]
// Every output and gradient is bitwise the same for any
// torch.set_num_threads(). The plan (wide or blocks, the block size) depends
// on the shapes, the workspace limit and tasks_at_once(), a constant of the
// machine; a block's GEMM runs single-threaded, and an output element is
// written by one block only. The weight gradient sums over blocks: each of
// for_each_task's fixed ranges of tasks keeps its own partial sum, and the
// partials are added in range order. Every CPU GEMM runs inside a parallel
// region, where BLAS is single-threaded: a multi-threaded BLAS may split a
// long reduction by the thread count. So the wide path's GEMMs too are split
// into for_each_task's fixed ranges, of columns (or, for the weight
// gradient, of the reduction, with a partial per range). tests/test_dropin.py
// checks the three ops at 1-4 threads.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "im2col.h"

namespace convt_ext {

// Bytes that all the column buffers of one op call may hold at once, over
// every thread (set_workspace_limit), and the release of the buffers that
// threads keep between calls.
void set_workspace_limit(int64_t bytes);
int64_t workspace_limit();
void release_workspace();

// Note [Device policy]
// Every choice of the plan that differs between the CPU and a GPU, in one
// place (the code paths are the same on both):
//   tasks         tasks that run at once, each with its own buffers: the
//                 usable cores on the CPU (1 inside a parallel region); 1 on
//                 a GPU, whose every kernel and GEMM uses the whole device;
//   parallel      whether for_each_task runs its ranges in a parallel region
//                 (the CPU, with more than one thread);
//   chunk_bytes   the column bytes a task aims for: cache-sized on the CPU
//                 (CONVT_EXT_CHUNK_BYTES); none on a GPU, where the workspace
//                 limit alone sizes the buffers, as large as allowed;
//   tile_bytes    conv's forward L2 tile (CONVT_EXT_FORWARD_TILE_BYTES), CPU
//                 only (forward_tile_cap);
//   wide_below    the wide path serves samples of fewer window positions
//                 than this: 1024 on the CPU (benchmarks/NOTES.md); always on
//                 a GPU, where one GEMM over many samples beats a launch and
//                 a thin GEMM per sample;
//   wide_pointwise  the wide path also serves 1x1 layers (stride 1, no
//                 padding), whose planar image is already its column matrix:
//                 on a GPU, where one GEMM beats a launch per sample; not on
//                 the CPU, where laying the samples side by side (and the
//                 product back) cost more than the thin GEMMs they spare
//                 (benchmarks/NOTES.md item 33: 0.2-0.8x torch -> 1.3-1.5x);
//   keep_scratch  threads keep their buffers between calls (the CPU, where
//                 fresh pages cost more than the im2col that fills them);
//   view          whether the view path may run (the CPU: its GEMMs are
//                 oneDNN's CPU ukernel; conv/view.h);
//   cpu_rules     whether the depthwise path's rule is the CPU's, whose
//                 vector loops win more than a GPU's element kernels
//                 (conv/depthwise.h).
// An op takes its policy once per call, from its input's device, and hands
// it to every step of the plan below, which reads no other: so a test-only
// build can run the CPU's tensors with a GPU's policy (tests/emulated/
// gpu_plan.cpp), executing the GPU's blocks, wide batches, buffers and GEMM
// calls where there is no GPU. The library itself has no such switch.
struct DevicePolicy {
  int64_t tasks = 1;
  bool parallel = false;
  int64_t chunk_bytes = INT64_MAX;
  int64_t tile_bytes = INT64_MAX;
  int64_t wide_below = INT64_MAX;
  bool wide_pointwise = true;
  bool keep_scratch = false;
  bool view = false;
  bool cpu_rules = false;
};
DevicePolicy device_policy(c10::DeviceType type);
inline DevicePolicy device_policy(const at::Tensor& like) {
  return device_policy(like.device().type());
}

// The most tasks that run at once, each with its own column buffer
// (policy.tasks): a constant of the process (usable_cores()), not
// torch.get_num_threads(), so the plan and every sum are the same for any
// thread count; 1 off the CPU or inside a parallel region.
inline int64_t tasks_at_once(const at::Tensor& like) { return device_policy(like).tasks; }

// The cores this process may use: the CPU affinity mask (taskset, cpusets)
// and the cgroup's CPU quota (containers), not the machine's core count.
int64_t usable_cores();

// Reads the tuning variables CONVT_EXT_CHUNK_BYTES and
// CONVT_EXT_FORWARD_TILE_BYTES, raising a ValueError for a malformed one.
void check_environment();

// Bytes one task's column buffers may hold.
int64_t task_budget(const DevicePolicy& policy);

// The scratch buffers one op call may hold at once, each kept per thread.
enum class Slot : int {
  Columns = 0,  // the columns of im2col, or the products col2im reads
  Operand = 1,  // a second GEMM operand laid side by side (the wide path)
  Product = 2,  // a GEMM's product, permuted into the output afterwards
};
constexpr int kSlots = 3;

// A (sizes) view of this thread's kept scratch buffer `slot`, grown as
// needed; a fresh tensor where the policy keeps none (Note [Device policy]).
at::Tensor scratch(const DevicePolicy& policy, Slot slot, at::IntArrayRef sizes,
                   const at::TensorOptions& options);
inline at::Tensor scratch(Slot slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  return scratch(device_policy(options.device().type()), slot, sizes, options);
}

// The column bytes a task of conv's forward pass aims for (a cap on the two
// budgets above; INT64_MAX for none): an L2-sized tile, so that the GEMM
// reads its columns from L2, for one group and at least kTiledFrom window
// positions per sample (benchmarks/NOTES.md item 21).
int64_t forward_tile_cap(const DevicePolicy& policy, int64_t groups, int64_t positions);

// Samples of `like` per chunk of the wide path, or 0 when it does not apply.
// `pointwise`: a 1x1 layer's call (policy.wide_pointwise).
int64_t wide_chunk(const DevicePolicy& policy, const at::Tensor& like, int64_t positions,
                   int64_t rows, int64_t aux_rows, bool pointwise, int64_t cap = INT64_MAX);

// Storage for the columns of up to `chunk` samples laid side by side:
// (rows, chunk, L) memory, so that the first b samples form one (rows, b*L)
// matrix [cols_0 | ... | cols_{b-1}] for one wide GEMM.
struct ColumnBuffer {
  at::Tensor data;
  ColumnBuffer(const DevicePolicy& policy, Slot slot, int64_t chunk, int64_t rows,
               int64_t positions, const at::TensorOptions& options)
      : data(scratch(policy, slot, {rows, chunk, positions}, options)) {}
  // (b, rows, L), the per-sample view that im2col writes and col2im reads.
  at::Tensor samples(int64_t b) const { return data.narrow(1, 0, b).permute({1, 0, 2}); }
  // (rows, b*L) = [cols_0 | ... | cols_{b-1}].
  at::Tensor matrix(int64_t b) const {
    return data.narrow(1, 0, b).view({data.size(0), b * data.size(2)});
  }
};

// The blocks a sample is split into: single positions along the lifted
// dimensions before `dim`, `count` positions along `dim`, everything after.
// A block of window positions is thus contiguous in the flattened order.
struct Blocks {
  int64_t extent[kMaxDims];
  int dim = 0;
  int64_t count = 1;

  int64_t along() const { return (extent[dim] + count - 1) / count; }
  int64_t per_sample() const {
    int64_t n = along();
    for (int i = 0; i < dim; ++i) n *= extent[i];
    return n;
  }
  // Block b's box [lo, hi) per dimension.
  void at(int64_t b, int64_t* lo, int64_t* hi) const {
    const int64_t q = b % along();
    b /= along();
    for (int i = kMaxDims - 1; i >= 0; --i) {
      if (i > dim) {
        lo[i] = 0;
        hi[i] = extent[i];
      } else if (i == dim) {
        lo[i] = q * count;
        hi[i] = std::min(lo[i] + count, extent[i]);
      } else {
        lo[i] = b % extent[i];
        hi[i] = lo[i] + 1;
        b /= extent[i];
      }
    }
  }
};

// The largest blocks of `extent` whose cost(dim, count) in bytes stays within
// the budget; cost grows with count. Whole samples when they fit, and when
// the `samples` are fewer than the tasks that run at once, small enough that
// every task gets a block, though none below kSmallestSplit: a smaller
// block's share of a task costs more in its views and calls (some 90 ATen
// calls a block) than running it on one thread.
constexpr int64_t kSmallestSplit = 64 * 1024;
template <typename Cost>
Blocks plan_blocks(const int64_t* extent, int64_t budget, int64_t samples, int64_t tasks,
                   const Cost& cost) {
  if (samples < tasks && extent[0] > 0) {
    budget = std::min(budget, std::max<int64_t>(kSmallestSplit, cost(0, extent[0]) / tasks * samples));
  }
  Blocks b;
  std::copy(extent, extent + kMaxDims, b.extent);
  for (int dim = 0; dim < kMaxDims; ++dim) {
    if (extent[dim] == 0 || cost(dim, 1) > budget) continue;
    int64_t lo = 1, hi = extent[dim];  // the largest count with cost <= budget
    while (lo < hi) {
      const int64_t mid = hi - (hi - lo) / 2;
      if (cost(dim, mid) <= budget) lo = mid; else hi = mid - 1;
    }
    b.dim = dim;
    b.count = lo;
    return b;
  }
  b.dim = kMaxDims - 1;
  b.count = 1;
  return b;
}

inline int64_t box_numel(const int64_t* lo, const int64_t* hi) {
  int64_t n = 1;
  for (int i = 0; i < kMaxDims; ++i) n *= hi[i] - lo[i];
  return n;
}

// Row-major offset of position lo in a box of the given extents.
inline int64_t flat_offset(const int64_t* lo, const int64_t* extent) {
  int64_t f = 0;
  for (int i = 0; i < kMaxDims; ++i) f = f * extent[i] + lo[i];
  return f;
}

// Runs fn(range, begin, end) over the task indices [0, n), split into
// min(n, policy.tasks) fixed ranges. On the CPU the ranges run in
// parallel, and everything inside a task runs single-threaded (ATen and MKL
// do not nest parallel regions). One region per call keeps both cores busy
// without a barrier after every small GEMM; such barriers cost a scheduler
// tick each time another process holds a core (benchmarks/NOTES.md).
// Elsewhere (CUDA) the tasks run in order, each kernel and GEMM using the
// whole device.
template <typename F>
void for_each_task(const DevicePolicy& policy, int64_t n, const F& fn) {
  const int64_t ranges = std::min(n, policy.tasks);
  if (ranges <= 0) return;
  // Range r: n / ranges tasks, one more for the first n % ranges.
  const int64_t q = n / ranges, extra = n % ranges;
  auto run = [&](int64_t r) {
    fn(r, r * q + std::min(r, extra), (r + 1) * q + std::min(r + 1, extra));
  };
  if (policy.parallel) {
    // Two ranges at least, so that even one task runs inside a parallel
    // region, where BLAS is single-threaded: a multi-threaded GEMM may split
    // its reduction by the thread count (Note [Determinism across thread counts]).
    at::parallel_for(0, std::max<int64_t>(ranges, 2), 1, [&](int64_t r0, int64_t r1) {
      // Worker threads start with default thread-local state: keep the GEMMs
      // below autograd, as on the calling thread.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t r = r0; r < std::min(r1, ranges); ++r) run(r);
    });
  } else {
    for (int64_t r = 0; r < ranges; ++r) run(r);
  }
}
template <typename F>
void for_each_task(const at::Tensor& like, int64_t n, const F& fn) {
  for_each_task(device_policy(like), n, fn);
}

}  // namespace convt_ext
