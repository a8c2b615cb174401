#include "opencamp/error.h"

namespace opencamp {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::InvalidArgument: return "invalid_argument";
    case ErrorKind::InvalidModel: return "invalid_model";
    case ErrorKind::Unsupported: return "unsupported";
    case ErrorKind::CapacityExceeded: return "capacity_exceeded";
    case ErrorKind::QueueFull: return "queue_full";
    case ErrorKind::Timeout: return "timeout";
    case ErrorKind::Internal: return "internal";
  }
  return "internal";
}

}  // namespace opencamp
