// L1's own page allocator: a bump allocator over a range of its physical
// memory, as a kernel's page allocator is L1 bookkeeping. Everything the L1
// mini-hypervisor builds (VMXON and VMCS regions, EPT12 tables, the pages of
// an L2's vmcs12) comes from one.
#pragma once

#include <cstddef>

#include "base/types.h"

namespace nestcache::guest {

class L1Pages {
 public:
  // Hands out the pages of [first, end).
  L1Pages(Gpa first, Gpa end) : next_(first), end_(end) {}
  // The next free page (not zeroed: fresh guest memory is zero). Throws
  // std::runtime_error when the range is used up (inside guest code, that
  // ends the L1 program with the message).
  Gpa alloc();
  // `pages` consecutive pages.
  Gpa alloc(size_t pages);
  // The first page not handed out yet.
  Gpa next() const { return next_; }

 private:
  Gpa next_;
  Gpa end_;
};

}  // namespace nestcache::guest
