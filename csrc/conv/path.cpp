// The path setting, benchmark mode's registry and the call counters (path.h).
#include "path.h"

#include <ATen/Context.h>

#include <atomic>
#include <map>
#include <mutex>

#include "../gemm.h"

namespace convt_ext {

namespace {

constexpr const char* kOpNames[] = {"conv", "conv_transpose", "conv_weight", "conv_transpose_backward"};
constexpr const char* kPathNames[kPaths] = {"columns", "view", "depthwise"};

std::atomic<int> g_setting{detail::kAuto};
std::array<std::atomic<int64_t>, kPaths> g_calls{};

std::mutex g_timed_mutex;
std::map<std::vector<int64_t>, PathReport::Timed>& timed_paths() {
  static auto* m = new std::map<std::vector<int64_t>, PathReport::Timed>();
  return *m;
}

}  // namespace

const char* op_name(ConvOp op) { return kOpNames[static_cast<int>(op)]; }
const char* path_name(Path p) { return kPathNames[static_cast<int>(p)]; }

void set_conv_path(const std::string& setting) {
  int v = setting == "auto" ? detail::kAuto : setting == "benchmark" ? detail::kBenchmark : -3;
  for (int p = 0; p < kPaths; ++p) {
    if (setting == kPathNames[p]) v = p;
  }
  TORCH_CHECK_VALUE(v != -3, "set_conv_path: path must be one of 'auto', 'benchmark', 'view', 'columns' "
                    "or 'depthwise', but got '", setting, "'");
  g_setting.store(v);
}

std::string conv_path() {
  const int v = g_setting.load();
  return v == detail::kAuto ? "auto" : v == detail::kBenchmark ? "benchmark" : kPathNames[v];
}

std::vector<int64_t> path_key(ConvOp op, const Window3& call, int64_t c_image, int64_t c_windows,
                              int64_t groups, bool image_pixels, bool windows_pixels,
                              bool output_pixels) {
  std::vector<int64_t> key{static_cast<int64_t>(op), call.batch, c_image, c_windows, groups,
                           image_pixels, windows_pixels, output_pixels};
  for (const int64_t* v : {call.image, call.windows, call.kernel, call.stride, call.padding, call.dilation}) {
    key.insert(key.end(), v, v + kMaxDims);
  }
  return key;
}

void count_call(Path p, const at::Tensor& like) {
  if (like.is_cpu()) g_calls[static_cast<int>(p)].fetch_add(1, std::memory_order_relaxed);
}

namespace detail {

int setting() { return g_setting.load(std::memory_order_relaxed); }

bool benchmark_mode() {
  return g_setting.load() == kBenchmark && !at::globalContext().deterministicAlgorithms();
}

std::optional<Path> kept_path(const std::vector<int64_t>& key) {
  std::lock_guard<std::mutex> lock(g_timed_mutex);
  const auto it = timed_paths().find(key);
  if (it == timed_paths().end()) return std::nullopt;
  return it->second.chosen;
}

Path keep_path(ConvOp op, const std::vector<int64_t>& key, const std::array<double, kPaths>& seconds) {
  Path fastest = Path::Columns;
  for (int p = 1; p < kPaths; ++p) {
    if (seconds[p] >= 0 && seconds[p] < seconds[static_cast<int>(fastest)]) fastest = static_cast<Path>(p);
  }
  PathReport::Timed t{op_name(op), key, seconds, fastest};
  std::lock_guard<std::mutex> lock(g_timed_mutex);
  return timed_paths().emplace(key, t).first->second.chosen;
}

}  // namespace detail

PathReport path_report() {
  PathReport r;
  r.setting = conv_path();
  r.view_available = tap_gemm_runs();
  for (int p = 0; p < kPaths; ++p) r.calls[p] = g_calls[p].load();
  std::lock_guard<std::mutex> lock(g_timed_mutex);
  for (const auto& [key, t] : timed_paths()) r.benchmarked.push_back(t);
  return r;
}

}  // namespace convt_ext
