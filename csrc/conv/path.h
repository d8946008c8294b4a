// Which path computes a convolution call: the setting, the "auto" rule's
// order, benchmark mode's registry, and the per-path call counters, in one
// place for every path (route.cpp asks here; each path only says whether it
// can run a call and whether its rule wants it).
//
// The paths:
//   columns    im2col/col2im + GEMMs (columns.h); runs every call;
//   view       per-tap GEMMs on strided views of pixel memory (view.h);
//   depthwise  a direct loop over taps for groups of few channels, no GEMM
//              (depthwise.h): depthwise is im2col as a view times a diagonal.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "../im2col.h"

namespace convt_ext {

// conv, conv_transpose, the weight gradient, and conv_transpose's backward
// (conv and the weight gradient on the same image).
enum class ConvOp : int { Conv = 0, ConvTranspose = 1, ConvWeight = 2, ConvTransposeBackward = 3 };
const char* op_name(ConvOp op);

enum class Path : int { Columns = 0, View = 1, Depthwise = 2 };
constexpr int kPaths = 3;
const char* path_name(Path p);

// What a path says of one call: whether it can run it, and whether the
// "auto" rule takes it there.
struct Offer {
  bool runs = false, wins = false;
};

// The path setting: "auto", "benchmark", or one path's name
// (CONVT_EXT_CONV_PATH). A named path runs wherever it can, the column path
// elsewhere. "benchmark" times every path that can run on a call's first use
// of its geometry and keeps the fastest for the process, as
// torch.backends.cudnn.benchmark does; two processes may then choose
// differently, so under torch.use_deterministic_algorithms(True) it acts as
// "auto".
void set_conv_path(const std::string& setting);
std::string conv_path();

// A call's key for benchmark mode: the op, its relation, the channel counts,
// groups and the operands' layouts.
std::vector<int64_t> path_key(ConvOp op, const Window3& call, int64_t c_image, int64_t c_windows,
                              int64_t groups, bool image_pixels, bool windows_pixels,
                              bool output_pixels);

// Counts one CPU convolution call on path p (engine_info()["path"]).
void count_call(Path p, const at::Tensor& like);

namespace detail {
int setting();  // a Path's value, or kAuto / kBenchmark below
constexpr int kAuto = -1, kBenchmark = -2;
bool benchmark_mode();
// Benchmark mode's registry: the path kept for a key, if any; keeping one
// (the first kept for a key stays, whatever another thread timed meanwhile).
std::optional<Path> kept_path(const std::vector<int64_t>& key);
Path keep_path(ConvOp op, const std::vector<int64_t>& key, const std::array<double, kPaths>& seconds);
}  // namespace detail

// The one route of every op: `offer(p)` says what path p makes of the call,
// `key()` its benchmark key, and `run(p)` computes it on p. The "auto" order:
// depthwise where its rule wins, then the view, then the columns.
template <typename R, typename OfferFn, typename KeyFn, typename RunFn>
R route(ConvOp op, const at::Tensor& like, const OfferFn& offer, const KeyFn& key, const RunFn& run) {
  const auto counted = [&](Path p) {
    count_call(p, like);
    return run(p);
  };
  const int setting = detail::setting();
  if (setting >= 0) {
    const Path p = static_cast<Path>(setting);
    return counted(p == Path::Columns || offer(p).runs ? p : Path::Columns);
  }
  if (detail::benchmark_mode()) {
    std::array<bool, kPaths> runs{true, offer(Path::View).runs, offer(Path::Depthwise).runs};
    if (std::count(runs.begin(), runs.end(), true) > 1) {
      const std::vector<int64_t> k = key();
      if (const std::optional<Path> known = detail::kept_path(k)) return counted(*known);
      // Each runnable path twice, the faster time of each.
      std::array<std::optional<R>, kPaths> result;
      std::array<double, kPaths> best;
      best.fill(-1.0);
      for (int round = 0; round < 2; ++round) {
        for (int p = 0; p < kPaths; ++p) {
          if (!runs[p]) continue;
          const auto t0 = std::chrono::steady_clock::now();
          result[p] = counted(static_cast<Path>(p));
          const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          best[p] = best[p] < 0 ? s : std::min(best[p], s);
        }
      }
      return std::move(*result[static_cast<int>(detail::keep_path(op, k, best))]);
    }
  }
  for (const Path p : {Path::Depthwise, Path::View}) {
    const Offer o = offer(p);
    if (o.runs && o.wins) return counted(p);
  }
  return counted(Path::Columns);
}

// What engine_info()["path"] reports.
struct PathReport {
  std::string setting;
  bool view_available = false;  // the ukernel runs float32 here
  std::array<int64_t, kPaths> calls{};  // CPU convolutions each path ran
  struct Timed {
    std::string op;
    std::vector<int64_t> key;
    std::array<double, kPaths> seconds;  // -1: the path could not run
    Path chosen;
  };
  std::vector<Timed> benchmarked;  // benchmark mode's choices
};
PathReport path_report();

}  // namespace convt_ext
