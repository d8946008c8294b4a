// The column planner (plan.h): the workspace limit, the kept scratch
// buffers and the plan's sizes.
#include "plan.h"

#include <ATen/ops/empty.h>
#include <c10/core/InferenceMode.h>

#include <array>
#include <atomic>
#include <charconv>
#include <cstdlib>
#include <fstream>
#include <string>
#include <mutex>
#include <thread>
#include <unordered_set>

#ifdef __linux__
#include <sched.h>
#endif


namespace convt_ext {

namespace {

std::atomic<int64_t> g_workspace_limit{int64_t(1) << 30};

// A byte count from environment variable `name` (`fallback` when unset): a
// whole decimal number of at least `min`, or a ValueError naming the variable.
int64_t env_bytes(const char* name, int64_t fallback, int64_t min) {
  const char* env = std::getenv(name);
  if (env == nullptr) return fallback;
  const std::string text(env);
  int64_t value = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  TORCH_CHECK_VALUE(!text.empty() && error == std::errc() && end == text.data() + text.size() &&
                        value >= min,
                    name, " must be a whole number of bytes of at least ", min, ", but got '", text,
                    "'");
  return value;
}

#ifdef __linux__
// The CPU quota of this process's cgroup in whole cores (rounded up), or
// INT64_MAX for none: cgroup v2's cpu.max ("quota period" or "max period"),
// else v1's cpu.cfs_quota_us / cpu.cfs_period_us.
int64_t cgroup_quota_cores() {
  auto quota_cores = [](int64_t quota, int64_t period) -> int64_t {
    return quota > 0 && period > 0 ? std::max<int64_t>(1, (quota + period - 1) / period) : INT64_MAX;
  };
  std::string path = "/";  // this process's cgroup (v2: the line "0::/path")
  {
    std::ifstream self("/proc/self/cgroup");
    for (std::string line; std::getline(self, line);) {
      if (line.rfind("0::", 0) == 0) path = line.substr(3);
    }
  }
  for (const std::string& dir : {"/sys/fs/cgroup" + path, std::string("/sys/fs/cgroup")}) {
    std::ifstream max(dir + "/cpu.max");
    std::string quota;
    int64_t period = 0;
    if (max >> quota >> period) {
      if (quota == "max") return INT64_MAX;
      int64_t q = 0;
      const auto [end, error] = std::from_chars(quota.data(), quota.data() + quota.size(), q);
      return error == std::errc() ? quota_cores(q, period) : INT64_MAX;
    }
  }
  std::ifstream q("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), p("/sys/fs/cgroup/cpu/cpu.cfs_period_us");
  int64_t quota = -1, period = 0;
  if (q >> quota && p >> period) return quota_cores(quota, period);
  return INT64_MAX;
}
#endif

// Below this many window positions per sample, one wide GEMM over the chunk
// beats a thin GEMM per sample (benchmarks/NOTES.md).
constexpr int64_t kWideBelow = 1024;

// The column buffer a task aims for on the CPU, under the workspace limit:
// small enough that im2col's output is still in the last-level cache when the
// GEMM reads it (and col2im's input when it is written), large enough for
// efficient GEMMs. CONVT_EXT_CHUNK_BYTES overrides it, for tuning
// (benchmarks/NOTES.md). A GPU has no such cache to fit: there the workspace
// limit alone sizes the buffers, so that its GEMMs are as large as allowed.
int64_t chunk_bytes() {
  static const int64_t bytes = env_bytes("CONVT_EXT_CHUNK_BYTES", int64_t(8) << 20, 1);
  return bytes;
}

// The forward tile's bytes (forward_tile_cap), INT64_MAX for no cap.
int64_t forward_tile_bytes() {
  static const int64_t bytes = [] {
    const int64_t v = env_bytes("CONVT_EXT_FORWARD_TILE_BYTES", int64_t(1) << 20, 0);
    return v > 0 ? v : INT64_MAX;
  }();
  return bytes;
}

}  // namespace

DevicePolicy device_policy(c10::DeviceType type) {
  DevicePolicy p;
  if (type == c10::DeviceType::CPU) {
    const bool nested = at::in_parallel_region();
    p.tasks = nested ? 1 : usable_cores();
    p.parallel = !nested && at::get_num_threads() > 1;
    p.chunk_bytes = chunk_bytes();
    p.tile_bytes = forward_tile_bytes();
    p.wide_below = kWideBelow;
    p.wide_pointwise = false;
    p.keep_scratch = true;
    p.view = true;
    p.cpu_rules = true;
  }
  return p;
}

int64_t forward_tile_cap(const DevicePolicy& policy, int64_t groups, int64_t positions) {
  // Measured on the 2-d suite (NOTES item 21): 1 MiB tiles sped up the
  // forward pass of one-group layers with many positions (ResNet 56x56 and
  // 28x28, the 7x7 stem: 1.2-1.3x) but slowed those with few (7x7 maps:
  // their wide GEMMs shrank) and grouped ones (thinner GEMMs still).
  // CONVT_EXT_FORWARD_TILE_BYTES overrides the size (0: no cap), for tuning.
  constexpr int64_t kTiledFrom = 128;
  return groups == 1 && positions >= kTiledFrom ? policy.tile_bytes : INT64_MAX;
}

void check_environment() {
  chunk_bytes();
  forward_tile_bytes();
}

int64_t usable_cores() {
  static const int64_t cores = [] {
    int64_t n = std::max(1u, std::thread::hardware_concurrency());
#ifdef __linux__
    // The CPUs this process may run on (taskset, a container's cpuset)...
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) n = std::max(1, CPU_COUNT(&set));
    // ...and the cgroup's CPU quota (a container's --cpus), rounded up.
    n = std::min(n, cgroup_quota_cores());
#endif
    return n;
  }();
  return cores;
}

int64_t task_budget(const DevicePolicy& policy) {
  return std::min(workspace_limit() / policy.tasks, policy.chunk_bytes);
}

namespace {

// Scratch memory for column buffers. On the CPU, a fresh buffer of tens of MB
// costs more in page faults than the im2col that fills it, so each thread
// keeps its buffers (each at most its task budget) for the next call, until
// release_workspace(). A slot is in use only within one op call, and ops do
// not call each other here. The registry lets release_workspace() reach
// every thread's buffers; an op that holds a buffer keeps it alive by its
// own reference, so a release during a call is safe.
struct KeptBuffers {
  std::array<at::Tensor, kSlots> slots;
  KeptBuffers();
  ~KeptBuffers();
};

std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}
std::unordered_set<KeptBuffers*>& registry() {
  static auto* r = new std::unordered_set<KeptBuffers*>();  // outlives thread exits at shutdown
  return *r;
}
KeptBuffers::KeptBuffers() {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry().insert(this);
}
KeptBuffers::~KeptBuffers() {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry().erase(this);
}

}  // namespace

at::Tensor scratch(const DevicePolicy& policy, Slot slot_name, at::IntArrayRef sizes,
                   const at::TensorOptions& options) {
  const int slot = static_cast<int>(slot_name);
  const int64_t numel = c10::multiply_integers(sizes);
  if (!policy.keep_scratch) return at::empty(sizes, options);
  thread_local KeptBuffers kept;
  at::Tensor t;
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    t = kept.slots[slot];
    kept.slots[slot] = at::Tensor();  // the old buffer goes before a larger one comes
  }
  if (!t.defined() || t.numel() < numel || t.dtype() != options.dtype()) {
    t = at::Tensor();
    // A normal tensor even under torch.inference_mode(): an inference tensor
    // kept here would refuse the in-place writes of later, normal-mode calls.
    c10::InferenceMode normal_mode(false);
    t = at::empty({numel}, options);
  }
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    kept.slots[slot] = t;
  }
  return (t.numel() == numel ? t : t.narrow(0, 0, numel)).view(sizes);
}

// Samples per chunk of the wide path: their columns (`rows` per position,
// and `aux_rows` more for the second buffer) within the budget, or 0 when
// the wide path does not apply. It needs at least two samples per chunk:
// with one, it is the per-sample GEMM run alone, and blocks do better on the
// CPU, running samples side by side (benchmarks/NOTES.md, item 10). On a GPU,
// where blocks run one after another, one GEMM over as many samples as the
// limit allows always beats a launch and a thin GEMM per sample.
int64_t wide_chunk(const DevicePolicy& p, const at::Tensor& like, int64_t positions, int64_t rows,
                   int64_t aux_rows, bool pointwise, int64_t cap) {
  const int64_t batch = like.size(0);
  if (positions >= p.wide_below || batch < 2 || (pointwise && !p.wide_pointwise)) return 0;
  const int64_t budget = std::min({workspace_limit(), p.chunk_bytes, cap});
  // In 128 bits: the two buffers' sizes are each checked, not their sum.
  const __int128 per_sample = (__int128(rows) + aux_rows) * positions * like.element_size();
  const int64_t chunk = static_cast<int64_t>(
      std::min<__int128>(budget / std::max<__int128>(per_sample, 1), batch));
  return chunk >= 2 ? chunk : 0;
}

void set_workspace_limit(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes > 0, "set_workspace_limit: bytes must be positive, but got ", bytes);
  g_workspace_limit.store(bytes);
}

int64_t workspace_limit() { return g_workspace_limit.load(); }

void release_workspace() {
  std::lock_guard<std::mutex> lock(registry_mutex());
  for (KeptBuffers* kept : registry()) kept->slots = {};
}

}  // namespace convt_ext
