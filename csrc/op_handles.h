// The ops as C++ calls them through the dispatcher (typed handles, found
// once): the backward formulas (autograd.cpp) and the Python functions'
// entry (calls.cpp). A call through a handle goes through every dispatch
// key, autocast and autograd included, as a torch.ops call does.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace convt_ext {

using Im2colSig = at::Tensor(const at::Tensor&, c10::SymIntArrayRef, c10::SymIntArrayRef,
                            c10::SymIntArrayRef, c10::SymIntArrayRef);
using Col2imSig = at::Tensor(const at::Tensor&, c10::SymIntArrayRef, c10::SymIntArrayRef,
                            c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymIntArrayRef);
using ConvSig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymInt);
using ConvTransposeSig = at::Tensor(const at::Tensor&, const at::Tensor&,
                                    const std::optional<at::Tensor>&, c10::SymIntArrayRef,
                                    c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymInt,
                                    c10::SymIntArrayRef);
using ConvWeightSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
                                 c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymIntArrayRef,
                                 c10::SymInt);
using FusedSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, c10::SymIntArrayRef,
                                                    c10::SymIntArrayRef, c10::SymIntArrayRef,
                                                    c10::SymInt, c10::SymIntArrayRef);

struct OpHandles {
  c10::TypedOperatorHandle<Im2colSig> im2col;
  c10::TypedOperatorHandle<Col2imSig> col2im;
  c10::TypedOperatorHandle<FusedSig> fused;  // _conv_transpose_backward
  // Index d - 1 for d spatial dimensions.
  std::vector<c10::TypedOperatorHandle<ConvSig>> conv;
  std::vector<c10::TypedOperatorHandle<ConvTransposeSig>> conv_transpose;
  std::vector<c10::TypedOperatorHandle<ConvWeightSig>> conv_weight;
};

// Found on first use, after the library's TORCH_LIBRARY has run.
const OpHandles& op_handles();

}  // namespace convt_ext
