// The column planner (plan.h): the workspace limit, the kept scratch
// buffers and the plan's sizes.
#include "plan.h"

#include <ATen/ops/empty.h>
#include <c10/core/InferenceMode.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <unordered_set>

#include "ops.h"

namespace convt_ext {

namespace {

std::atomic<int64_t> g_workspace_limit{int64_t(1) << 30};

// Below this many window positions per sample, one wide GEMM over the chunk
// beats a thin GEMM per sample (benchmarks/NOTES.md).
constexpr int64_t kWideBelow = 1024;

// The column buffer a task aims for on the CPU, under the workspace limit:
// small enough that im2col's output is still in the last-level cache when the
// GEMM reads it (and col2im's input when it is written), large enough for
// efficient GEMMs. CONVT_EXT_CHUNK_BYTES overrides it, for tuning
// (benchmarks/NOTES.md). A GPU has no such cache to fit: there the workspace
// limit alone sizes the buffers, so that its GEMMs are as large as allowed.
int64_t preferred_chunk_bytes(const at::Tensor& like) {
  static const int64_t bytes = [] {
    const char* env = std::getenv("CONVT_EXT_CHUNK_BYTES");
    return env ? std::max<int64_t>(1, std::atoll(env)) : int64_t(8) << 20;
  }();
  return like.is_cpu() ? bytes : INT64_MAX;
}

}  // namespace

int64_t forward_tile_cap(const at::Tensor& like, int64_t groups, int64_t positions) {
  // Measured on the 2-d suite (NOTES item 21): 1 MiB tiles sped up the
  // forward pass of one-group layers with many positions (ResNet 56x56 and
  // 28x28, the 7x7 stem: 1.2-1.3x) but slowed those with few (7x7 maps:
  // their wide GEMMs shrank) and grouped ones (thinner GEMMs still).
  // CONVT_EXT_FORWARD_TILE_BYTES overrides the size (0: no cap), for tuning.
  constexpr int64_t kTiledFrom = 128;
  static const int64_t bytes = [] {
    const char* env = std::getenv("CONVT_EXT_FORWARD_TILE_BYTES");
    const int64_t v = env ? std::atoll(env) : int64_t(1) << 20;
    return v > 0 ? v : INT64_MAX;
  }();
  return like.is_cpu() && groups == 1 && positions >= kTiledFrom ? bytes : INT64_MAX;
}

int64_t tasks_at_once(const at::Tensor& like) {
  static const int64_t cores = std::max(1u, std::thread::hardware_concurrency());
  return like.is_cpu() && !at::in_parallel_region() ? cores : 1;
}

int64_t task_budget(const at::Tensor& like) {
  return std::min(workspace_limit() / tasks_at_once(like), preferred_chunk_bytes(like));
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
  std::array<at::Tensor, 3> slots;
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

at::Tensor scratch(int slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t numel = c10::multiply_integers(sizes);
  if (options.device().type() != c10::DeviceType::CPU) return at::empty(sizes, options);
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
  return t.narrow(0, 0, numel).view(sizes);
}

// Samples per chunk of the wide path: their columns (`rows` per position,
// and `aux_rows` more for the second buffer) within the budget, or 0 when
// the wide path does not apply. It needs at least two samples per chunk:
// with one, it is the per-sample GEMM run alone, and blocks do better on the
// CPU, running samples side by side (benchmarks/NOTES.md, item 10). On a GPU,
// where blocks run one after another, one GEMM over as many samples as the
// limit allows always beats a launch and a thin GEMM per sample.
int64_t wide_chunk(const at::Tensor& like, int64_t positions, int64_t rows, int64_t aux_rows,
                   int64_t cap) {
  const int64_t batch = like.size(0);
  if ((like.is_cpu() && positions >= kWideBelow) || batch < 2) return 0;
  const int64_t budget = std::min({workspace_limit(), preferred_chunk_bytes(like), cap});
  const int64_t per_sample = (rows + aux_rows) * positions * like.element_size();
  const int64_t chunk = std::min<int64_t>(budget / std::max<int64_t>(per_sample, 1), batch);
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
