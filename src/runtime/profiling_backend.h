// OPENCAMP_PROFILE=1: every op of the engine's backend is timed, and a table of wall time per
// op (and per matmul shape) goes to stderr when the engine is destroyed. "Profile before you
// optimise" without an external profiler.
#pragma once

#include <memory>

#include "opencamp/backend.h"

namespace opencamp {

// Wraps `inner` when the OPENCAMP_PROFILE environment variable is set; otherwise returns it.
std::unique_ptr<Backend> maybe_profile(std::unique_ptr<Backend> inner);

}  // namespace opencamp
