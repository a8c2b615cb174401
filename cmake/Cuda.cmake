# The cuda backend (cuda/): GPU kernels compiled by nvcc into the opencamp library.
#
#   OPENCAMP_CUDA=AUTO  (default) build it when CMake finds a CUDA compiler; otherwise build its
#                       host code against the stub runtime (STUB below)
#   OPENCAMP_CUDA=ON    require it: configuring fails without nvcc
#   OPENCAMP_CUDA=STUB  build the host code (cuda/*.cpp) with the host compiler against
#                       cuda/stub/ (a stand-in for cuda_runtime_api.h and the kernel launchers),
#                       so a CPU-only build compiles and links it with the house warnings; the
#                       backend then registers as unusable, saying the build has no CUDA toolkit
#   OPENCAMP_CUDA=OFF   never build it
#
# Why a stub rather than a compile-only job with nvcc: CI machines may have no working nvcc, and
# a job that needs one would be skipped exactly where a change to backend.h goes unseen.
#   CMAKE_CUDA_ARCHITECTURES  default "80;90" (A100-class and H100-class, SASS + PTX, so newer
#                             GPUs run the PTX); any list nvcc accepts overrides it
#
# The library links the *static* CUDA runtime (libcudart_static.a, no libcudart.so, no cuBLAS):
# the CUDA driver (libcuda.so.1) is only looked for, with dlopen, when a program first asks for a
# GPU. Binaries built with the backend therefore run unchanged on machines without a GPU, a driver
# or any CUDA library installed; there the "cuda" backend reports itself unusable.
set(OPENCAMP_CUDA AUTO CACHE STRING "Build the cuda backend: AUTO (when nvcc is found, else STUB), ON (required), STUB or OFF")
set_property(CACHE OPENCAMP_CUDA PROPERTY STRINGS AUTO ON STUB OFF)

string(TOUPPER "${OPENCAMP_CUDA}" opencamp_cuda_mode)
if(opencamp_cuda_mode MATCHES "^(ON|YES|TRUE|1)$")
  set(opencamp_cuda_mode ON)
elseif(opencamp_cuda_mode MATCHES "^(OFF|NO|FALSE|0)$")
  set(opencamp_cuda_mode OFF)
elseif(NOT opencamp_cuda_mode MATCHES "^(AUTO|STUB)$")
  message(FATAL_ERROR "OPENCAMP_CUDA must be AUTO, ON, STUB or OFF, got '${OPENCAMP_CUDA}'")
endif()

set(OPENCAMP_HAVE_CUDA OFF)
set(OPENCAMP_CUDA_STUB OFF)
if(opencamp_cuda_mode STREQUAL "OFF")
  message(STATUS "opencamp: cuda backend OFF (OPENCAMP_CUDA=OFF)")
  return()
endif()

set(cuda_dir ${CMAKE_CURRENT_SOURCE_DIR}/cuda)
# The host code, by concern: the ops and their registration, argument checks, graphs, the fusion
# queue, kernel launches, device sampling, and the device's memory and stream.
set(opencamp_cuda_host_sources
  ${cuda_dir}/cuda_backend.cpp
  ${cuda_dir}/checks.cpp
  ${cuda_dir}/graphs.cpp
  ${cuda_dir}/fusion.cpp
  ${cuda_dir}/launches.cpp
  ${cuda_dir}/device_sampling.cpp
  ${cuda_dir}/device_context.cpp)

# The host code against the stub runtime: compiled and linked like the real thing, never runs.
macro(opencamp_cuda_stub why)
  add_library(opencamp_cuda OBJECT
    ${opencamp_cuda_host_sources}
    ${cuda_dir}/stub/cuda_runtime_stub.cpp
    ${cuda_dir}/stub/kernels_stub.cpp)
  set_target_properties(opencamp_cuda PROPERTIES POSITION_INDEPENDENT_CODE ON
                        CXX_STANDARD 20 CXX_STANDARD_REQUIRED ON)
  target_include_directories(opencamp_cuda BEFORE PRIVATE ${cuda_dir}/stub)
  target_include_directories(opencamp_cuda PRIVATE
    ${CMAKE_CURRENT_SOURCE_DIR}/include
    ${CMAKE_CURRENT_BINARY_DIR}/include
    ${CMAKE_CURRENT_SOURCE_DIR}/src
    ${cuda_dir})
  opencamp_warnings(opencamp_cuda)
  target_sources(opencamp PRIVATE $<TARGET_OBJECTS:opencamp_cuda>)
  target_compile_definitions(opencamp PRIVATE OPENCAMP_HAVE_CUDA=1)
  set(OPENCAMP_HAVE_CUDA ON)
  set(OPENCAMP_CUDA_STUB ON)
  message(STATUS "opencamp: cuda backend host code only, against the stub runtime (${why}); "
                 "the backend registers as unusable")
endmacro()

if(opencamp_cuda_mode STREQUAL "STUB")
  opencamp_cuda_stub("OPENCAMP_CUDA=STUB")
  return()
endif()

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  if(opencamp_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR
      "OPENCAMP_CUDA=ON but CMake found no CUDA compiler (nvcc). Install the CUDA toolkit "
      "(11.8 or newer), put nvcc on PATH or pass -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc; "
      "or configure with -DOPENCAMP_CUDA=AUTO (or OFF) to build without the cuda backend.")
  endif()
  opencamp_cuda_stub("no CUDA compiler found; pass -DCMAKE_CUDA_COMPILER=... or "
                     "-DOPENCAMP_CUDA=ON to require it")
  return()
endif()

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
  set(CMAKE_CUDA_ARCHITECTURES 80 90)  # before enable_language, which would pick its own
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
if(CUDAToolkit_VERSION VERSION_LESS 11.8)
  message(FATAL_ERROR "the cuda backend needs CUDA 11.8 or newer (found ${CUDAToolkit_VERSION}); "
                      "configure with -DOPENCAMP_CUDA=OFF to build without it")
endif()

add_library(opencamp_cuda OBJECT
  ${opencamp_cuda_host_sources}
  ${cuda_dir}/kernels/elementwise.cu
  ${cuda_dir}/kernels/matmul.cu
  ${cuda_dir}/kernels/attention.cu
  ${cuda_dir}/kernels/sampling.cu)
set_target_properties(opencamp_cuda PROPERTIES
  POSITION_INDEPENDENT_CODE ON
  CXX_STANDARD 20 CXX_STANDARD_REQUIRED ON
  CUDA_STANDARD 20 CUDA_STANDARD_REQUIRED ON)
target_include_directories(opencamp_cuda PRIVATE
  ${CMAKE_CURRENT_SOURCE_DIR}/include
  ${CMAKE_CURRENT_BINARY_DIR}/include
  ${CMAKE_CURRENT_SOURCE_DIR}/src
  ${cuda_dir})
target_link_libraries(opencamp_cuda PRIVATE CUDA::cudart_static)  # its include directories
# House warnings on the host code, through nvcc for the .cu files too.
target_compile_options(opencamp_cuda PRIVATE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra>
  $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<CXX_COMPILER_ID:GNU>>:-Wshadow=local>
  $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra>)
if(OPENCAMP_WERROR)
  target_compile_options(opencamp_cuda PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Werror>
    $<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings -Xcompiler=-Werror>)
endif()

target_sources(opencamp PRIVATE $<TARGET_OBJECTS:opencamp_cuda>)
target_link_libraries(opencamp PRIVATE CUDA::cudart_static)
target_compile_definitions(opencamp PRIVATE OPENCAMP_HAVE_CUDA=1)
set(OPENCAMP_HAVE_CUDA ON)
message(STATUS "opencamp: cuda backend ON (CUDA ${CUDAToolkit_VERSION}, architectures "
               "${CMAKE_CUDA_ARCHITECTURES}, static CUDA runtime)")
