# The avx backend: one translation unit of kernels per instruction set, each compiled with its
# own -m flags, chosen at run time by cpuid. The rest of the library stays baseline x86-64, so
# one build runs on any x86-64 CPU. Other architectures (or compilers without these flags) build
# without it; the cpu backend remains.
option(OPENCAMP_AVX "Build the avx backend (x86-64 with GCC or Clang)" ON)

if(OPENCAMP_AVX AND CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64"
   AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  set(avx_dir ${CMAKE_CURRENT_SOURCE_DIR}/src/backends/avx)
  target_sources(opencamp PRIVATE
    ${avx_dir}/avx_backend.cpp
    ${avx_dir}/cpu_features.cpp
    ${avx_dir}/quant_tiles.cpp
    ${avx_dir}/kernels_avx2.cpp
    ${avx_dir}/kernels_avx512.cpp
    ${avx_dir}/kernels_avx512_bf16.cpp
    ${avx_dir}/kernels_amx_bf16.cpp)
  set(avx2_flags -mavx2 -mfma -mf16c)
  set(avx512_flags ${avx2_flags} -mavx512f -mavx512bw -mavx512vl -mavx512dq)
  set_source_files_properties(${avx_dir}/kernels_avx2.cpp PROPERTIES COMPILE_OPTIONS "${avx2_flags}")
  set_source_files_properties(${avx_dir}/kernels_avx512.cpp PROPERTIES COMPILE_OPTIONS "${avx512_flags}")
  set_source_files_properties(${avx_dir}/kernels_avx512_bf16.cpp PROPERTIES
    COMPILE_OPTIONS "${avx512_flags};-mavx512bf16;-mavx512vnni")
  set_source_files_properties(${avx_dir}/kernels_amx_bf16.cpp PROPERTIES
    COMPILE_OPTIONS "${avx512_flags};-mavx512bf16;-mavx512vnni;-mamx-tile;-mamx-bf16")
  target_compile_definitions(opencamp PRIVATE OPENCAMP_HAVE_AVX=1)
  set(OPENCAMP_HAVE_AVX ON)
  message(STATUS "opencamp: avx backend ON (AVX2, AVX-512, AVX-512 BF16, AMX BF16 kernels)")
else()
  set(OPENCAMP_HAVE_AVX OFF)
  message(STATUS "opencamp: avx backend OFF (needs x86-64 and GCC or Clang)")
endif()
