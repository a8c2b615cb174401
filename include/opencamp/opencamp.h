// The whole public API of the opencamp C++ library.
#pragma once

#include "opencamp/backend.h"
#include "opencamp/bandwidth.h"
#include "opencamp/dtype.h"
#include "opencamp/engine.h"
#include "opencamp/error.h"
#include "opencamp/gguf.h"
#include "opencamp/kv_cache.h"
#include "opencamp/model.h"
#include "opencamp/model_config.h"
#include "opencamp/sampler.h"
#include "opencamp/scheduler.h"
#include "opencamp/tensor.h"
#include "opencamp/thread_pool.h"
#include "opencamp/version.h"
#include "opencamp/weights.h"
