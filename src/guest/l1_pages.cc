#include "guest/l1_pages.h"

#include <stdexcept>

namespace nestcache::guest {

Gpa L1Pages::alloc() { return alloc(1); }

Gpa L1Pages::alloc(size_t pages) {
  if (next_ + pages * kPageSize > end_) throw std::runtime_error("L1 is out of memory for its own pages");
  Gpa g = next_;
  next_ += pages * kPageSize;
  return g;
}

}  // namespace nestcache::guest
