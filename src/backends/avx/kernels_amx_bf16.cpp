// The avx512_bf16 kernels with AMX bf16 tile multiplies for prefills; see kernels.inc.
#define OPENCAMP_ISA_AVX512_BF16 1
#define OPENCAMP_ISA_AMX 1
#define OPENCAMP_ISA_NAME "amx_bf16"
#define OPENCAMP_ISA_TABLE kernels_amx_bf16
#include "backends/avx/kernels.inc"
