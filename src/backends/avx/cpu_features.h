// What the CPU (and the operating system, which must save the wide registers) supports.
#pragma once

#include <string>

namespace opencamp {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_bf16 = false, avx512_vnni = false, amx_bf16 = false, amx_tile = false;
  // Linux hands a process the AMX tile state only once asked (arch_prctl XCOMP_PERM).
  bool amx_permitted = false;

  bool has_avx2_level() const { return avx2 && fma && f16c; }
  bool has_avx512_level() const { return has_avx2_level() && avx512f && avx512bw && avx512vl && avx512dq; }
  // Every CPU with AVX512_BF16 so far also has AVX512_VNNI (the Q8_0 decode's integer dots).
  bool has_avx512_bf16_level() const { return has_avx512_level() && avx512_bf16 && avx512_vnni; }
  bool has_amx_bf16_level() const { return has_avx512_bf16_level() && amx_tile && amx_bf16 && amx_permitted; }
  std::string summary() const;  // e.g. "avx2 fma f16c avx512f ..."
};

const CpuFeatures& cpu_features();

}  // namespace opencamp
