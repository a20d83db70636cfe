// Instruction-set selection of the CPU kernels.
//
// Every CPU kernel has a portable version; on x86-64 some also have AVX2 + FMA and AVX-512 versions,
// chosen at run time from what the processor supports. The environment variable SA2VP_CPU_ISA
// (generic | avx2 | avx512) caps the choice; it is read on every call, so tests can exercise each
// version in one process.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace sa2vp {

enum class CpuIsa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

// The best instruction set this processor (and this build) supports.
inline CpuIsa detected_cpu_isa() {
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    return avx512 ? CpuIsa::kAvx512 : (avx2 ? CpuIsa::kAvx2 : CpuIsa::kGeneric);
  }();
  return isa;
#else
  return CpuIsa::kGeneric;
#endif
}

// The instruction set to use now: the detected one, capped by SA2VP_CPU_ISA when it is set.
inline CpuIsa cpu_isa() {
  const CpuIsa best = detected_cpu_isa();
  const char* env = std::getenv("SA2VP_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  CpuIsa cap;
  if (std::strcmp(env, "avx512") == 0) {
    cap = CpuIsa::kAvx512;
  } else if (std::strcmp(env, "avx2") == 0) {
    cap = CpuIsa::kAvx2;
  } else if (std::strcmp(env, "generic") == 0) {
    cap = CpuIsa::kGeneric;
  } else {
    TORCH_CHECK(false, "SA2VP_CPU_ISA must be one of generic, avx2, avx512 (or unset), got '", env, "'");
  }
  return static_cast<int>(cap) < static_cast<int>(best) ? cap : best;
}

}  // namespace sa2vp
