// The kernels compiled for avx2; see kernels.inc.
#define OPENCAMP_ISA_AVX2 1
#define OPENCAMP_ISA_NAME "avx2"
#define OPENCAMP_ISA_TABLE kernels_avx2
#include "backends/avx/kernels.inc"
