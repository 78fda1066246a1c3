// Large tables on transparent huge pages.
//
// Some of L0's tables are read at a random index by every MMU-notifier event
// and every refresh: the registry's page index, the host's per-page frame
// numbers, the frames' versions. With 100,000 caches they span thousands of
// 4 KiB pages, more than the processor's TLB covers, so each read could add
// a page walk. The kernel keeps its own tables in its direct map, on huge
// pages; HugePageAllocator does the same for ours: an allocation of
// kHugeAllocMin bytes or more is an anonymous mapping of its own, aligned to
// 2 MiB and advised MADV_HUGEPAGE. Smaller ones come from operator new. Where
// transparent huge pages are off the advice changes nothing, and under a
// sanitizer every allocation comes from operator new, so that ASan still
// checks the bounds of these tables.
#pragma once

#include <cstddef>
#include <new>

namespace nestcache::huge_pages {

inline constexpr size_t kHugePage = size_t{2} << 20;
inline constexpr size_t kHugeAllocMin = size_t{1} << 20;

// `bytes` of memory aligned to the default new alignment (to kHugePage when
// mapped); throws std::bad_alloc when there is none.
void* allocate(size_t bytes);
// Frees what allocate(bytes) returned.
void deallocate(void* p, size_t bytes) noexcept;
// True if allocate(bytes) maps its own memory (large and no sanitizer).
bool maps(size_t bytes);

}  // namespace nestcache::huge_pages

namespace nestcache {

// A std allocator for the tables above (std::vector<T, HugePageAllocator<T>>).
template <class T>
struct HugePageAllocator {
  static_assert(alignof(T) <= __STDCPP_DEFAULT_NEW_ALIGNMENT__, "over-aligned element");
  using value_type = T;
  HugePageAllocator() = default;
  template <class U>
  HugePageAllocator(const HugePageAllocator<U>&) noexcept {}
  T* allocate(size_t n) {
    if (n > static_cast<size_t>(-1) / sizeof(T)) throw std::bad_array_new_length();
    return static_cast<T*>(huge_pages::allocate(n * sizeof(T)));
  }
  void deallocate(T* p, size_t n) noexcept { huge_pages::deallocate(p, n * sizeof(T)); }
  template <class U>
  bool operator==(const HugePageAllocator<U>&) const noexcept {
    return true;
  }
};

}  // namespace nestcache
