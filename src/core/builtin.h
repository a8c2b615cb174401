// The backends and architectures compiled into this library, registered on first use (explicit
// calls rather than static initialisers, which a static library would drop at link time).
#pragma once

#include "opencamp/backend.h"
#include "opencamp/model.h"

#include <string>
#include <vector>

namespace opencamp {

BackendInfo cpu_backend_info();
#ifdef OPENCAMP_HAVE_AVX
std::vector<BackendInfo> avx_backend_infos();  // "avx" and one per instruction set
std::string avx_isa_in_use();                  // what "avx" runs here ("none" without AVX2)
#endif
#ifdef OPENCAMP_HAVE_CUDA
BackendInfo cuda_backend_info();  // cuda/cuda_backend.cpp
#endif

Architecture llama_architecture();
Architecture mistral_architecture();
Architecture qwen2_architecture();
Architecture qwen3_architecture();
Architecture gemma3_architecture();       // "gemma3_text" (Hugging Face)
Architecture gemma3_gguf_architecture();  // "gemma3" (GGUF)

}  // namespace opencamp
