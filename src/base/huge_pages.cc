// Large tables on transparent huge pages (see huge_pages.h).
#include "base/huge_pages.h"

#include <sys/mman.h>

#include <cstdint>

#include "base/sanitizers.h"

namespace nestcache::huge_pages {
namespace {

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

}  // namespace

bool maps(size_t bytes) {
#if defined(NC_ASAN) || defined(NC_TSAN)
  (void)bytes;
  return false;
#else
  return bytes >= kHugeAllocMin;
#endif
}

void* allocate(size_t bytes) {
  if (!maps(bytes)) return ::operator new(bytes);
  // Rounding up, plus the alignment slack, must not wrap.
  if (bytes > SIZE_MAX - 2 * kHugePage) throw std::bad_alloc();
  const size_t len = round_up(bytes, kHugePage);
  // One huge page more than needed, then the unaligned head and tail go back.
  void* raw = mmap(nullptr, len + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const auto start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = round_up(start, kHugePage);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t tail = start + kHugePage - aligned;  // the slack not taken by the head
  if (tail) munmap(reinterpret_cast<void*>(aligned + len), tail);
  // Advice only: without transparent huge pages it fails or does nothing,
  // and the memory is ordinary pages.
  (void)madvise(reinterpret_cast<void*>(aligned), len, MADV_HUGEPAGE);
  return reinterpret_cast<void*>(aligned);
}

void deallocate(void* p, size_t bytes) noexcept {
  if (!maps(bytes)) {
    ::operator delete(p);
    return;
  }
  munmap(p, round_up(bytes, kHugePage));
}

}  // namespace nestcache::huge_pages
