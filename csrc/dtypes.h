// The dtypes of im2col and col2im, listed once, and the one dispatch over
// them that every kernel file (cpu/im2col_cpu.cpp, cuda/im2col_cuda.cu,
// tests/emulated/emulate.cpp) and the argument check (im2col.cpp) use.
//
// Note [Window dtypes]
// im2col is a pure copy: the bits of each element move, and padding writes
// zero bits, which are zero in every dtype (+0.0, 0, false, 0+0i). So it
// dispatches on the element's size alone, five instantiations for every dtype
// listed, float8 and complex32 included.
// col2im sums the overlapping taps, in each dtype's own arithmetic (sum_t):
//   - float16/bfloat16 in float32, float32/float64 and complex as themselves
//     (at::opmath_type, as torch's F.fold);
//   - integers modulo 2^bits, as torch.add of two such tensors wraps: summed
//     in the unsigned type of the same width, where wrapping is defined (a
//     signed overflow would be undefined behaviour in C++);
//   - bool as a logical OR, as F.fold gives: summed in int64 (no count of
//     taps reaches 2^63), then nonzero means true.
// float8 and complex32 have no such arithmetic in torch (torch.add refuses
// float8), so col2im refuses them. The convolutions stay float-only
// (check_floating in checks.h).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "im2col.h"

namespace convt_ext {

// col2im's dtypes (every one im2col takes too): _(C++ type, ScalarType).
#define CONVT_SUM_TYPES(_)                                                                   \
  _(bool, Bool) _(uint8_t, Byte) _(int8_t, Char) _(int16_t, Short) _(int32_t, Int)         \
  _(int64_t, Long) _(uint16_t, UInt16) _(uint32_t, UInt32) _(uint64_t, UInt64)             \
  _(at::Half, Half) _(at::BFloat16, BFloat16) _(float, Float) _(double, Double)            \
  _(c10::complex<float>, ComplexFloat) _(c10::complex<double>, ComplexDouble)

// The dtypes im2col takes besides those: copied, never summed.
#define CONVT_COPY_ONLY_TYPES(_)                                                           \
  _(Float8_e5m2) _(Float8_e4m3fn) _(Float8_e5m2fnuz) _(Float8_e4m3fnuz) _(Float8_e8m0fnu) \
  _(ComplexHalf)

template <typename T>
struct TypeTag {
  using type = T;
};

// A 16-byte element (complex128) for im2col's copy: only 8-byte aligned, as
// a complex128 tensor's data is guaranteed to be no more than that.
struct alignas(8) Bytes16 {
  uint64_t lo, hi;
  Bytes16() = default;
  CONVT_HD explicit Bytes16(int) : lo(0), hi(0) {}
};

// col2im's accumulator (Note [Window dtypes]).
template <typename T>
struct SumType {
  using type = at::opmath_type<T>;
};
template <>
struct SumType<bool> {
  using type = int64_t;
};
template <>
struct SumType<int8_t> {
  using type = uint8_t;
};
template <>
struct SumType<int16_t> {
  using type = uint16_t;
};
template <>
struct SumType<int32_t> {
  using type = uint32_t;
};
template <>
struct SumType<int64_t> {
  using type = uint64_t;
};
template <typename T>
using sum_t = typename SumType<T>::type;

inline bool is_sum_type(at::ScalarType type) {
  switch (type) {
#define CONVT_CASE(T, name) case at::ScalarType::name:
    CONVT_SUM_TYPES(CONVT_CASE)
#undef CONVT_CASE
    return true;
    default:
      return false;
  }
}

inline bool is_copy_type(at::ScalarType type) {
  switch (type) {
#define CONVT_CASE(name) case at::ScalarType::name:
    CONVT_COPY_ONLY_TYPES(CONVT_CASE)
#undef CONVT_CASE
    return true;
    default:
      return is_sum_type(type);
  }
}

// `name` must have a dtype that im2col copies (sums = false) or that col2im
// sums (sums = true): a TypeError naming the argument otherwise.
inline void check_window_dtype(const char* op, const char* name, const at::Tensor& t, bool sums) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK_TYPE(sums ? is_sum_type(type) : is_copy_type(type), op, ": ", name,
                   " must be a bool, integer, floating or complex tensor",
                   sums ? " (not float8 or complex32, which have no sum)" : "", ", but got ",
                   type);
}

// f(TypeTag<T>{}) with T the C++ type of `type`, one of CONVT_SUM_TYPES.
template <typename F>
void dispatch_sum(at::ScalarType type, const char* op, const F& f) {
  switch (type) {
#define CONVT_CASE(T, name) \
  case at::ScalarType::name: \
    return f(TypeTag<T>{});
    CONVT_SUM_TYPES(CONVT_CASE)
#undef CONVT_CASE
    default:
      TORCH_CHECK_TYPE(false, op, ": no kernel for dtype ", type);
  }
}

// f(TypeTag<T>{}) with T an unsigned integer (or Bytes16) of the element size
// of `type`, one of the dtypes im2col takes: the copy moves bits.
template <typename F>
void dispatch_copy(at::ScalarType type, const char* op, const F& f) {
  TORCH_CHECK_TYPE(is_copy_type(type), op, ": no kernel for dtype ", type);
  switch (c10::elementSize(type)) {
    case 1:
      return f(TypeTag<uint8_t>{});
    case 2:
      return f(TypeTag<uint16_t>{});
    case 4:
      return f(TypeTag<uint32_t>{});
    case 8:
      return f(TypeTag<uint64_t>{});
    case 16:
      return f(TypeTag<Bytes16>{});
    default:
      TORCH_CHECK_TYPE(false, op, ": no kernel for elements of ", c10::elementSize(type),
                       " bytes");
  }
}

}  // namespace convt_ext
