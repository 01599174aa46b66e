#pragma once
// What the tests use to check that bad input gets a clear error.

#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <exception>
#include <string>

namespace accelerate::testing {

/// The message of what `fn` throws (c10::Error without its backtrace), or "(no error)".
template <class F>
std::string error_of(F&& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace accelerate::testing

/// Expects `statement` to throw an error whose message contains `text`.
#define EXPECT_ERROR_CONTAINS(statement, text)                                                   \
  do {                                                                                           \
    const std::string accelerate_message_ = ::accelerate::testing::error_of([&] { statement; }); \
    EXPECT_NE(accelerate_message_.find(text), std::string::npos)                                 \
        << "statement: " #statement "\nmessage: " << accelerate_message_;                        \
  } while (false)
