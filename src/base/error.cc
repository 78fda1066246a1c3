#include "base/error.h"

#include <cstring>

namespace nestcache {

const char* Error::code_name() const {
  // glibc names every errno it knows (ETIMEDOUT, EMFILE, ...); a number it
  // does not know is a bug in the caller, named as such.
  if (const char* name = strerrorname_np(code)) return name;
  return "EUNKNOWN";
}

std::string Error::to_string() const { return fmt::format("{}: {}", code_name(), message); }

}  // namespace nestcache
