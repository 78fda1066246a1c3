// The `memslots` selftest run from code, on both memory kinds and at the
// edges of its --slots range.
#include <gtest/gtest.h>

#include "workloads/memslots_selftest.h"

namespace nestcache::workloads {
namespace {

SelftestResult run(MemoryKind kind, int64_t slots) {
  RunOptions o;
  o.memory = kind;
  o.extra["slots"] = std::to_string(slots);
  return run_memslots_selftest(o);
}

std::string failures_of(const SelftestResult& r) {
  std::string s;
  for (const auto& f : r.failures) s += f + "\n";
  return s;
}

class MemslotsSelftest : public ::testing::TestWithParam<int64_t> {};

TEST_P(MemslotsSelftest, PassesOnUnmanagedMemoryAndDetectsTheStaleHostMap) {
  SelftestResult r = run(MemoryKind::unmanaged, GetParam());
  EXPECT_TRUE(r.passed) << failures_of(r);
  EXPECT_EQ(r.counters[Counter::stale_accesses], 1u) << "exactly the one read through the kept HostMap";
  EXPECT_EQ(r.counters[Counter::remap_windows], r.counters[Counter::remap_windows_closed]);
  EXPECT_EQ(r.counters[Counter::pins], 0u) << "unmanaged frames are never pinned";
  ASSERT_EQ(r.notes.size(), 1u);
  EXPECT_NE(r.notes[0].find("stale access detected"), std::string::npos) << r.notes[0];
  EXPECT_EQ(r.details["host_map"]["outcome"], "stale");
}

TEST_P(MemslotsSelftest, PassesOnManagedMemoryWhereTheHostMapPinBlocksMigration) {
  SelftestResult r = run(MemoryKind::managed, GetParam());
  EXPECT_TRUE(r.passed) << failures_of(r);
  EXPECT_EQ(r.counters[Counter::stale_accesses], 0u);
  EXPECT_EQ(r.counters[Counter::migrate_ebusy], 1u);
  EXPECT_EQ(r.counters[Counter::pins], r.counters[Counter::unpins]);
  EXPECT_EQ(r.counters[Counter::remap_windows], 0u) << "managed frames use the direct map";
  EXPECT_EQ(r.details["host_map"]["outcome"], "ebusy");
}

TEST_P(MemslotsSelftest, MigratesAndDiscardsAPageUnderACacheAtEverySlotCount) {
  // With one slot there is one cached page: it must still see both changes,
  // or the discard path would pass without having run.
  for (MemoryKind kind : {MemoryKind::unmanaged, MemoryKind::managed}) {
    SelftestResult r = run(kind, GetParam());
    EXPECT_TRUE(r.passed) << failures_of(r);
    int migrated = 0, discarded = 0;
    for (const auto& c : r.details["caches"]) (c["change"] == "migrate" ? migrated : discarded)++;
    EXPECT_GE(migrated, 1) << r.details["caches"].dump();
    EXPECT_GE(discarded, 1) << r.details["caches"].dump();
    EXPECT_GE(r.counters[Counter::discards], 1u);
  }
}

INSTANTIATE_TEST_SUITE_P(Slots, MemslotsSelftest, ::testing::Values(1, 2, 3, 512, 32764));

TEST(MemslotsSelftestOptions, ASlotCountOutsideTheRangeFailsWithAMessage) {
  SelftestResult r = run(MemoryKind::unmanaged, 0);
  EXPECT_FALSE(r.passed);
  ASSERT_EQ(r.failures.size(), 1u);
  EXPECT_EQ(r.failures[0], "--slots 0 is outside 1..32764");
  r = run(MemoryKind::unmanaged, 32765);
  EXPECT_FALSE(r.passed);
}

TEST(MemslotsSelftestOptions, WithoutExtraItUsesTheDefaultSlotCount) {
  SelftestResult r = run_memslots_selftest(RunOptions{});
  EXPECT_TRUE(r.passed) << failures_of(r);
  EXPECT_EQ(r.details["slots"], kMemslotsDefaultSlots);
}

}  // namespace
}  // namespace nestcache::workloads
