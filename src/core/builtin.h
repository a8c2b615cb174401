// The backends and architectures compiled into this library, registered on first use (explicit
// calls rather than static initialisers, which a static library would drop at link time).
#pragma once

#include "opencamp/backend.h"
#include "opencamp/model.h"

namespace opencamp {

BackendInfo cpu_backend_info();

Architecture llama_architecture();
Architecture qwen2_architecture();
Architecture qwen3_architecture();

}  // namespace opencamp
