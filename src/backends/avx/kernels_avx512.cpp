// The kernels compiled for avx512; see kernels.inc.
#define OPENCAMP_ISA_AVX512 1
#define OPENCAMP_ISA_NAME "avx512"
#define OPENCAMP_ISA_TABLE kernels_avx512
#include "backends/avx/kernels.inc"
