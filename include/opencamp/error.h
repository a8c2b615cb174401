// One exception type for everything that can go wrong in opencamp. It carries a kind (so
// bindings and the server can map it to the right Python exception or HTTP status) and a
// message that says what is wrong and what to do about it.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace opencamp {

enum class ErrorKind {
  InvalidArgument,  // a caller passed a bad value (shape, parameter, token id, ...)
  InvalidModel,     // a model file or config is missing, malformed or inconsistent
  Unsupported,      // a valid request that this build / backend / architecture cannot do
  CapacityExceeded, // KV cache or context is full
  QueueFull,        // the scheduler's waiting queue is full: try again later
  Timeout,          // a stream's reader read nothing for too long: the generation was ended
  Internal,         // a bug or an unexpected system failure
};

const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

// Builds the message from streamable parts: fail(ErrorKind::InvalidModel, "tensor ", name, " missing").
template <class... Parts>
[[noreturn]] void fail(ErrorKind kind, const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw Error(kind, message.str());
}

}  // namespace opencamp
