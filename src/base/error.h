// Errors as values at API boundaries.
//
// Every fallible public function returns Result<T> (tl::expected, the C++23
// std::expected shape). The code is an errno value, as KVM's ioctls return;
// the message says what was wrong in words a user can act on.
#pragma once

#include <cerrno>
#include <string>
#include <type_traits>
#include <utility>

#include <fmt/format.h>
#include <tl/expected.hpp>

namespace nestcache {

struct Error {
  int code = EINVAL;  // an errno value
  std::string message;

  // "EBUSY" etc. for the code.
  const char* code_name() const;
  // "EBUSY: frame 42 is pinned".
  std::string to_string() const;
};

template <class T>
using Result = tl::expected<T, Error>;
using Status = tl::expected<void, Error>;

inline tl::unexpected<Error> make_error(int code, std::string message) {
  return tl::unexpected<Error>(Error{code, std::move(message)});
}

template <class... Args>
tl::unexpected<Error> errorf(int code, fmt::format_string<Args...> f, Args&&... args) {
  return make_error(code, fmt::format(f, std::forward<Args>(args)...));
}

inline Status ok() { return {}; }

namespace detail {
template <class T, class E>
T take_value(tl::expected<T, E>&& r) {
  if constexpr (!std::is_void_v<T>) return std::move(*r);
}
}  // namespace detail

}  // namespace nestcache

// Propagates the error of a Result/Status expression, or yields its value.
#define NC_TRY(expr)                                        \
  ({                                                        \
    auto&& nc_try_result_ = (expr);                         \
    if (!nc_try_result_) return tl::unexpected(std::move(nc_try_result_).error()); \
    ::nestcache::detail::take_value(std::move(nc_try_result_)); \
  })
