#include "base/error.h"

#include <cstring>

namespace nestcache {

const char* Error::code_name() const {
  switch (code) {
    case EINVAL: return "EINVAL";
    case ENOMEM: return "ENOMEM";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    case ENOENT: return "ENOENT";
    case EFAULT: return "EFAULT";
    case E2BIG: return "E2BIG";
    case EAGAIN: return "EAGAIN";
    case EPERM: return "EPERM";
    case ENOSPC: return "ENOSPC";
    case ERANGE: return "ERANGE";
    case EIO: return "EIO";
    case ENXIO: return "ENXIO";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    default: return "E?";
  }
}

std::string Error::to_string() const { return fmt::format("{}: {}", code_name(), message); }

}  // namespace nestcache
