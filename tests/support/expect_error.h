#pragma once
// What the tests use to check errors and tensors.

#include <ATen/ATen.h>
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

/// Exact equality of dtype, shape and values, with both tensors printed on failure.
inline ::testing::AssertionResult same(const at::Tensor& actual, const at::Tensor& expected) {
  if (!actual.defined() || !expected.defined()) {
    return ::testing::AssertionFailure() << "undefined tensor";
  }
  if (actual.scalar_type() != expected.scalar_type() || actual.sizes() != expected.sizes() ||
      !at::equal(actual, expected)) {
    return ::testing::AssertionFailure()
           << "got " << actual.scalar_type() << " " << actual.sizes() << "\n"
           << actual << "\nexpected " << expected.scalar_type() << " " << expected.sizes() << "\n"
           << expected;
  }
  return ::testing::AssertionSuccess();
}

}  // namespace accelerate::testing

/// Expects `statement` to throw an error whose message contains `text`.
#define EXPECT_ERROR_CONTAINS(statement, text)                                                   \
  do {                                                                                           \
    const std::string accelerate_message_ = ::accelerate::testing::error_of([&] { statement; }); \
    EXPECT_NE(accelerate_message_.find(text), std::string::npos)                                 \
        << "statement: " #statement "\nmessage: " << accelerate_message_;                        \
  } while (false)
