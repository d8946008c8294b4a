// The FMA peak of the CPU, measured by a compiled loop (fma_peak.cpp).
#pragma once

#include <cstdint>
#include <string>

namespace convt_ext {

struct FmaPeak {
  double gflops = 0;  // float32 GFLOP/s over torch's threads; 0 where no loop is compiled
  std::string isa;    // the instructions the loop used: "avx512f" or "avx2+fma"
  int64_t threads = 0;
};

// The best rate of blocks of the loop on torch.get_num_threads() threads,
// over about `seconds`.
FmaPeak fma_peak(double seconds);

}  // namespace convt_ext
