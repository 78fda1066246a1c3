// HugePageAllocator: small tables from operator new, large ones mapped on
// their own, aligned for huge pages, usable through their whole length and
// given back whole.
#include "base/huge_pages.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <vector>

namespace nestcache {
namespace {

TEST(HugePages, OnlyLargeAllocationsAreMappedAndTheyAreAlignedToAHugePage) {
  EXPECT_FALSE(huge_pages::maps(huge_pages::kHugeAllocMin - 1));
  for (size_t bytes : {size_t{64}, huge_pages::kHugeAllocMin, huge_pages::kHugePage + 1, 3 * huge_pages::kHugePage}) {
    void* p = huge_pages::allocate(bytes);
    ASSERT_NE(p, nullptr);
    if (huge_pages::maps(bytes)) {
      EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % huge_pages::kHugePage, 0u) << bytes;
    }
    // Every byte is there (a short mapping would fault at its end).
    auto* b = static_cast<unsigned char*>(p);
    for (size_t i = 0; i < bytes - 1; i += 4096) b[i] = static_cast<unsigned char>(i >> 12);
    b[bytes - 1] = 0x5a;
    for (size_t i = 0; i < bytes - 1; i += 4096) EXPECT_EQ(b[i], static_cast<unsigned char>(i >> 12)) << i;
    EXPECT_EQ(b[bytes - 1], 0x5a);
    huge_pages::deallocate(p, bytes);
  }
}

TEST(HugePages, AVectorGrowsAcrossTheThresholdAndKeepsItsElements) {
  std::vector<uint64_t, HugePageAllocator<uint64_t>> v;
  const size_t n = 3 * huge_pages::kHugePage / sizeof(uint64_t);  // crosses it on the way
  for (size_t i = 0; i < n; i++) v.push_back(i * 0x9e3779b97f4a7c15ull);
  for (size_t i = 0; i < n; i += 997) ASSERT_EQ(v[i], i * 0x9e3779b97f4a7c15ull) << i;
  std::vector<uint64_t, HugePageAllocator<uint64_t>> moved = std::move(v);
  EXPECT_EQ(moved.size(), n);
  EXPECT_EQ(moved[n - 1], (n - 1) * 0x9e3779b97f4a7c15ull);
  // Atomics (the frames' versions) value-initialised to zero.
  std::vector<std::atomic<uint64_t>, HugePageAllocator<std::atomic<uint64_t>>> versions(n);
  EXPECT_EQ(versions[0].load(), 0u);
  EXPECT_EQ(versions[n - 1].load(), 0u);
}

TEST(HugePages, AnImpossibleSizeThrowsInsteadOfWrapping) {
  HugePageAllocator<uint64_t> a;
  EXPECT_THROW((void)a.allocate(static_cast<size_t>(-1) / 4), std::bad_array_new_length);
  // Sizes whose rounding to huge pages would wrap. (Under a sanitizer they
  // go to operator new, whose sanitizer reports them instead of throwing.)
  if (huge_pages::maps(SIZE_MAX)) {
    HugePageAllocator<uint8_t> bytes;
    EXPECT_THROW((void)bytes.allocate(SIZE_MAX - huge_pages::kHugePage / 2), std::bad_alloc);
    EXPECT_THROW((void)huge_pages::allocate(SIZE_MAX), std::bad_alloc);
  }
}

}  // namespace
}  // namespace nestcache
