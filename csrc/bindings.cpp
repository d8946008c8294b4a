// The small pybind11 module, convt_ext._C: the settings, reports and rules
// Python reads outside the dispatcher. The ops themselves are registered
// with the dispatcher in ops.cpp and live in torch.ops.convt_ext.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "conv/depthwise.h"
#include "conv/path.h"
#include "conv/view.h"
#include "cpu/fma_peak.h"
#include "gemm.h"
#include "plan.h"

namespace py = pybind11;

namespace convt_ext {
// The Python autograd.Functions' entry (autograd.cpp).
void set_python_autograd(py::object f);
// The Python functions' entry to the ops (calls.cpp).
void bind_calls(py::module& m);
}  // namespace convt_ext

namespace {

// A rule's op by name, for the Python bindings.
convt_ext::ConvOp conv_op(const char* fn, const std::string& op) {
  const std::vector<std::string> names{"conv", "conv_transpose", "conv_weight", "conv_transpose_backward"};
  const auto it = std::find(names.begin(), names.end(), op);
  TORCH_CHECK_VALUE(it != names.end(), fn, ": op must be one of conv, conv_transpose, conv_weight, "
                    "conv_transpose_backward, but got '", op, "'");
  return static_cast<convt_ext::ConvOp>(it - names.begin());
}

// engine_report() as a dict, for Python.
py::dict engine_report_dict() {
  const convt_ext::EngineReport r = convt_ext::engine_report();
  py::dict d, rule, calls;
  for (const auto& [dtype, engine] : r.rule) rule[py::str(dtype)] = engine;
  for (int i = 0; i < convt_ext::kEngines; ++i) {
    calls[py::str(convt_ext::engine_name(static_cast<convt_ext::Engine>(i)))] = r.calls[i];
  }
  py::list timed;
  for (const auto& t : r.benchmarked) {
    py::dict row, seconds;
    for (int i = 0; i < convt_ext::kEngines; ++i) {
      if (t.seconds[i] >= 0) {
        seconds[py::str(convt_ext::engine_name(static_cast<convt_ext::Engine>(i)))] = t.seconds[i];
      }
    }
    row["device"] = t.device;
    row["dtype"] = t.dtype;
    row["groups"] = t.groups;
    row["m"] = t.m;
    row["n"] = t.n;
    row["k"] = t.k;
    row["layout"] = t.layout;
    row["engine"] = t.engine;
    row["seconds"] = seconds;
    timed.append(row);
  }
  d["setting"] = r.setting;
  d["available"] = r.available;
  d["cpu_avx512"] = r.cpu_avx512;
  d["cpu_vendor"] = r.cpu_vendor;
  d["rule"] = rule;
  d["benchmarked"] = timed;
  d["calls"] = calls;
  py::dict independent;
  for (int i = 0; i < convt_ext::kEngines; ++i) {
    independent[py::str(convt_ext::engine_name(static_cast<convt_ext::Engine>(i)))] =
        r.thread_independent[i];
  }
  d["thread_independent"] = independent;
  d["thread_dependent_calls"] = r.thread_dependent_calls;
  d["pinned_calls"] = r.pinned_calls;
  d["cpu_native_bf16"] = r.cpu_native_bf16;
  d["cpu_packs_bf16"] = r.cpu_packs_bf16;
  d["fp32_in_bf16"] = r.fp32_in_bf16;
  d["bf16_calls"] = r.bf16_calls;
  return d;
}

// path_report() as a dict, for Python.
py::dict path_report_dict() {
  using convt_ext::kPaths;
  using convt_ext::Path;
  const convt_ext::PathReport r = convt_ext::path_report();
  py::dict d, calls;
  for (int p = 0; p < kPaths; ++p) calls[convt_ext::path_name(static_cast<Path>(p))] = r.calls[p];
  d["setting"] = r.setting;
  d["view_available"] = r.view_available;
  d["depthwise_isa"] = convt_ext::depthwise_cpu_isa();
  py::dict loops;
  for (const auto& [name, count] : convt_ext::depthwise_cpu_loops()) loops[py::str(name)] = count;
  d["depthwise_loops"] = loops;
  d["calls"] = calls;
  py::list timed;
  for (const auto& t : r.benchmarked) {
    py::dict row, seconds;
    row["op"] = t.op;
    row["key"] = t.key;
    for (int p = 0; p < kPaths; ++p) {
      if (t.seconds[p] >= 0) seconds[convt_ext::path_name(static_cast<Path>(p))] = t.seconds[p];
    }
    row["seconds"] = seconds;
    row["path"] = convt_ext::path_name(t.chosen);
    timed.append(row);
  }
  d["benchmarked"] = timed;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "convt_ext native core: the ops live in torch.ops.convt_ext";
  // Whether the CUDA kernels were compiled into this build (see build_info()).
#ifdef CONVT_EXT_CUDA
  m.def("cuda_compiled", [] { return true; });
#else
  m.def("cuda_compiled", [] { return false; });
#endif
  m.def("_set_python_autograd", &convt_ext::set_python_autograd);
  convt_ext::bind_calls(m);
  m.def("set_workspace_limit", &convt_ext::set_workspace_limit, py::arg("bytes"));
  m.def("workspace_limit", &convt_ext::workspace_limit);
  m.def("release_workspace", &convt_ext::release_workspace);
  m.def("check_environment", &convt_ext::check_environment);
  m.def("usable_cores", &convt_ext::usable_cores);
  m.def("set_gemm_engine", &convt_ext::set_gemm_engine, py::arg("engine"));
  m.def("gemm_engine", &convt_ext::gemm_engine);
  m.def("engine_report", &engine_report_dict);
  m.def("fma_peak", [](double seconds) {
    const convt_ext::FmaPeak p = convt_ext::fma_peak(seconds);
    py::dict d;
    d["gflops"] = p.gflops;
    d["isa"] = p.isa;
    d["threads"] = p.threads;
    return d;
  }, py::arg("seconds"));
  m.def("view_rule", [](const std::string& op, bool avx512, bool image_pixels, bool windows_pixels,
                        int64_t dims, bool overlap, int64_t cg_image, int64_t cg_windows, bool pointwise) {
    return convt_ext::view_rule(conv_op("view_rule", op), avx512, image_pixels, windows_pixels, dims, overlap,
                                cg_image, cg_windows, pointwise);
  }, py::arg("op"), py::arg("avx512"), py::arg("image_pixels"), py::arg("windows_pixels"), py::arg("dims"),
     py::arg("overlap"), py::arg("cg_image"), py::arg("cg_windows"), py::arg("pointwise"));
  m.def("depthwise_rule", [](const std::string& op, bool cuda, bool avx512, bool pixels, int64_t ci, int64_t cw) {
    return convt_ext::depthwise_rule(conv_op("depthwise_rule", op), cuda, avx512, pixels, ci, cw);
  }, py::arg("op"), py::arg("cuda"), py::arg("avx512"), py::arg("pixels"), py::arg("ci"), py::arg("cw"));
  m.def("set_conv_path", &convt_ext::set_conv_path, py::arg("path"));
  m.def("_set_plane_rows", &convt_ext::set_plane_rows, py::arg("on"));
  m.def("conv_path", &convt_ext::conv_path);
  m.def("path_report", &path_report_dict);
  m.def("rule_engine", &convt_ext::rule_engine, py::arg("device"), py::arg("dtype"),
        py::arg("avx512"), py::arg("vendor"), py::arg("ukernel_available"));
}
