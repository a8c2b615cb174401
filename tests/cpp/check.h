// A tiny test harness for the ctest executables: no third-party framework, no network.
//
//   TEST_CASE(name) { CHECK(x == 1); CHECK_NEAR(a, b, 1e-5); CHECK_EQ(a, b);
//                     CHECK_THROWS_WITH(expr, opencamp::ErrorKind::InvalidModel, "part", ...); }
//   int main(int argc, char** argv) { return opencamp_test::run_all(argc, argv); }
//
// A failed check prints file:line and what differed, counts a failure and carries on; an
// exception escaping a test case counts as one more failure. run_all returns nonzero when
// anything failed, so ctest sees it. `./test_x substring` runs only the matching cases.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <initializer_list>
#include <iostream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "opencamp/error.h"

namespace opencamp_test {

struct State {
  int failures = 0;
  int checks = 0;
};

inline State& state() {
  static State s;
  return s;
}

inline void report_failure(const char* file, int line, const std::string& what) {
  ++state().failures;
  std::cerr << file << ":" << line << ": FAILED: " << what << std::endl;
}

template <class T>
std::string to_text(const T& value) {
  std::ostringstream out;
  if constexpr (requires { out << value; }) {
    out.precision(9);
    out << value;
  } else {
    out << "<value>";
  }
  return out.str();
}

inline bool check_near(double actual, double expected, double tolerance, const char* file, int line,
                       const char* actual_text, const char* expected_text) {
  ++state().checks;
  const double diff = std::fabs(actual - expected);
  if (!(diff <= tolerance)) {  // NaN fails too
    std::ostringstream what;
    what.precision(9);
    what << "CHECK_NEAR(" << actual_text << ", " << expected_text << "): " << actual << " vs "
         << expected << ", |diff| " << diff << " > tolerance " << tolerance;
    report_failure(file, line, what.str());
    return false;
  }
  return true;
}

inline const char* kind_name(opencamp::ErrorKind kind) {
  switch (kind) {
    case opencamp::ErrorKind::InvalidArgument: return "InvalidArgument";
    case opencamp::ErrorKind::InvalidModel: return "InvalidModel";
    case opencamp::ErrorKind::Unsupported: return "Unsupported";
    case opencamp::ErrorKind::CapacityExceeded: return "CapacityExceeded";
    case opencamp::ErrorKind::QueueFull: return "QueueFull";
    case opencamp::ErrorKind::Timeout: return "Timeout";
    case opencamp::ErrorKind::Internal: return "Internal";
  }
  return "?";
}

// Runs `body`, which must throw opencamp::Error of `kind` whose message contains every one of
// `parts`. Returns the message (empty when nothing / something else was thrown).
inline std::string check_throws_with(const std::function<void()>& body, opencamp::ErrorKind kind,
                                     std::initializer_list<std::string_view> parts, const char* file,
                                     int line, const char* expr_text) {
  ++state().checks;
  try {
    body();
  } catch (const opencamp::Error& error) {
    const std::string message = error.what();
    bool ok = true;
    if (error.kind() != kind) {
      report_failure(file, line,
                     std::string(expr_text) + " threw ErrorKind::" + kind_name(error.kind()) +
                         ", expected ErrorKind::" + kind_name(kind) + "; message: " + message);
      ok = false;
    }
    for (std::string_view part : parts) {
      if (message.find(part) == std::string::npos) {
        report_failure(file, line,
                       std::string(expr_text) + ": message lacks \"" + std::string(part) +
                           "\"; message: " + message);
        ok = false;
      }
    }
    if (ok && std::getenv("OPENCAMP_TEST_VERBOSE")) {
      std::cerr << "  (expected error) " << kind_name(error.kind()) << ": " << message << "\n";
    }
    return message;
  } catch (const std::exception& other) {
    report_failure(file, line,
                   std::string(expr_text) + " threw a non-opencamp exception: " + other.what() +
                       " (expected opencamp::Error " + kind_name(kind) + ")");
    return {};
  } catch (...) {
    report_failure(file, line, std::string(expr_text) + " threw something that is not an exception");
    return {};
  }
  report_failure(file, line, std::string(expr_text) + " did not throw (expected ErrorKind::" +
                                 kind_name(kind) + ")");
  return {};
}

struct TestCase {
  const char* name;
  void (*body)();
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> cases;
  return cases;
}

struct Registrar {
  Registrar(const char* name, void (*body)()) { registry().push_back({name, body}); }
};

inline int run_all(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  int ran = 0;
  for (const TestCase& test : registry()) {
    if (!filter.empty() && std::string(test.name).find(filter) == std::string::npos) continue;
    ++ran;
    const int failures_before = state().failures;
    const auto start = std::chrono::steady_clock::now();
    try {
      test.body();
    } catch (const opencamp::Error& error) {
      report_failure(test.name, 0,
                     std::string("unexpected opencamp::Error (") + kind_name(error.kind()) +
                         "): " + error.what());
    } catch (const std::exception& error) {
      report_failure(test.name, 0, std::string("unexpected exception: ") + error.what());
    } catch (...) {
      report_failure(test.name, 0, "unexpected exception of unknown type");
    }
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    std::printf("[%s] %s (%.1f ms)\n", state().failures == failures_before ? "  ok  " : "FAILED",
                test.name, ms);
    std::fflush(stdout);
  }
  if (ran == 0) {
    std::fprintf(stderr, "no test case matches '%s'\n", filter.c_str());
    return 1;
  }
  std::printf("%d test cases, %d checks, %d failures\n", ran, state().checks, state().failures);
  return state().failures == 0 ? 0 : 1;
}

}  // namespace opencamp_test

#define OPENCAMP_TEST_CONCAT2(a, b) a##b
#define OPENCAMP_TEST_CONCAT(a, b) OPENCAMP_TEST_CONCAT2(a, b)

#define TEST_CASE(name)                                                                     \
  static void OPENCAMP_TEST_CONCAT(test_body_, name)();                                     \
  static const ::opencamp_test::Registrar OPENCAMP_TEST_CONCAT(test_registrar_, name)(      \
      #name, &OPENCAMP_TEST_CONCAT(test_body_, name));                                      \
  static void OPENCAMP_TEST_CONCAT(test_body_, name)()

#define CHECK(condition)                                                                    \
  do {                                                                                      \
    ++::opencamp_test::state().checks;                                                      \
    if (!(condition)) ::opencamp_test::report_failure(__FILE__, __LINE__, "CHECK(" #condition ")"); \
  } while (0)

// CHECK with extra context streamed into the failure message: CHECK_MSG(ok, "row " << r).
#define CHECK_MSG(condition, message)                                                       \
  do {                                                                                      \
    ++::opencamp_test::state().checks;                                                      \
    if (!(condition)) {                                                                     \
      std::ostringstream check_message_;                                                    \
      check_message_ << "CHECK(" #condition "): " << message;                               \
      ::opencamp_test::report_failure(__FILE__, __LINE__, check_message_.str());            \
    }                                                                                       \
  } while (0)

#define CHECK_EQ(actual, expected)                                                          \
  do {                                                                                      \
    ++::opencamp_test::state().checks;                                                      \
    const auto& check_actual_ = (actual);                                                   \
    const auto& check_expected_ = (expected);                                               \
    if (!(check_actual_ == check_expected_)) {                                              \
      ::opencamp_test::report_failure(                                                      \
          __FILE__, __LINE__,                                                               \
          std::string("CHECK_EQ(" #actual ", " #expected "): ") +                           \
              ::opencamp_test::to_text(check_actual_) + " != " +                            \
              ::opencamp_test::to_text(check_expected_));                                   \
    }                                                                                       \
  } while (0)

#define CHECK_NEAR(actual, expected, tolerance)                                              \
  ::opencamp_test::check_near(static_cast<double>(actual), static_cast<double>(expected),     \
                              static_cast<double>(tolerance), __FILE__, __LINE__, #actual,    \
                              #expected)

// CHECK_THROWS_WITH(expr, ErrorKind, "substring", ...): expr must throw opencamp::Error of that
// kind whose message contains every substring. Evaluates to the message.
#define CHECK_THROWS_WITH(expr, kind, ...)                                                  \
  ::opencamp_test::check_throws_with([&]() { (void)(expr); }, kind, {__VA_ARGS__}, __FILE__, \
                                     __LINE__, #expr)

#define CHECK_NOTHROW(expr)                                                                 \
  do {                                                                                      \
    ++::opencamp_test::state().checks;                                                      \
    try {                                                                                   \
      (void)(expr);                                                                         \
    } catch (const std::exception& check_error_) {                                          \
      ::opencamp_test::report_failure(__FILE__, __LINE__,                                   \
                                      std::string(#expr " threw: ") + check_error_.what()); \
    }                                                                                       \
  } while (0)
