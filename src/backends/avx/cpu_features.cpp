#include "backends/avx/cpu_features.h"

#include <cpuid.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace opencamp {
namespace {

uint64_t read_xcr0() {
  uint32_t low, high;
  __asm__ volatile("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
  return (static_cast<uint64_t>(high) << 32) | low;
}

bool bit(unsigned value, int index) { return (value >> index) & 1u; }

// Asks the kernel for the AMX tile data state (Linux 5.16+); without it the first tile
// instruction faults.
bool request_amx_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = bit(ecx, 27);
  const uint64_t xcr0 = osxsave ? read_xcr0() : 0;
  const bool os_avx = (xcr0 & 0x6) == 0x6;       // SSE and AVX state
  const bool os_avx512 = (xcr0 & 0xe6) == 0xe6;  // plus opmask and the upper ZMM state
  const bool os_amx = (xcr0 & (3ull << 17)) == (3ull << 17);  // tile config and data
  f.fma = os_avx && bit(ecx, 12);
  f.f16c = os_avx && bit(ecx, 29);
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  f.avx2 = os_avx && bit(ebx, 5);
  f.avx512f = os_avx512 && bit(ebx, 16);
  f.avx512dq = os_avx512 && bit(ebx, 17);
  f.avx512bw = os_avx512 && bit(ebx, 30);
  f.avx512vl = os_avx512 && bit(ebx, 31);
  f.avx512_vnni = os_avx512 && bit(ecx, 11);
  f.amx_bf16 = os_amx && bit(edx, 22);
  f.amx_tile = os_amx && bit(edx, 24);
  const unsigned max_subleaf = eax;
  if (max_subleaf >= 1) {
    __cpuid_count(7, 1, eax, ebx, ecx, edx);
    f.avx512_bf16 = os_avx512 && bit(eax, 5);
  }
  f.amx_permitted = f.amx_tile && f.amx_bf16 && request_amx_permission();
  return f;
}

}  // namespace

std::string CpuFeatures::summary() const {
  std::string s;
  auto add = [&](bool on, const char* name) {
    if (!on) return;
    if (!s.empty()) s += ' ';
    s += name;
  };
  add(avx2, "avx2");
  add(fma, "fma");
  add(f16c, "f16c");
  add(avx512f, "avx512f");
  add(avx512bw, "avx512bw");
  add(avx512vl, "avx512vl");
  add(avx512dq, "avx512dq");
  add(avx512_bf16, "avx512_bf16");
  add(avx512_vnni, "avx512_vnni");
  add(amx_tile, "amx_tile");
  add(amx_bf16, "amx_bf16");
  add(amx_permitted, "amx_permitted");
  return s;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

}  // namespace opencamp
