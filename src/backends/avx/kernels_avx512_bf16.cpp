// The kernels compiled for avx512_bf16; see kernels.inc.
#define OPENCAMP_ISA_AVX512_BF16 1
#define OPENCAMP_ISA_NAME "avx512_bf16"
#define OPENCAMP_ISA_TABLE kernels_avx512_bf16
#include "backends/avx/kernels.inc"
