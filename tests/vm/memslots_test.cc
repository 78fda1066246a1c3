// KVM_SET_USER_MEMORY_REGION rules and memslot lookups.
#include <gtest/gtest.h>

#include <map>
#include <random>

#include "vm_fixture.h"

namespace nestcache::vm {
namespace {

struct MemslotsTest : ::testing::Test {
  void SetUp() override {
    phys = std::move(*host::PhysMem::create({1024, 0}));
    mm = std::make_unique<host::HostMm>(*phys);
    vm = std::make_unique<Vm>(*mm, 1);
    hva = *mm->create_region(256 * kPageSize, host::FrameKind::managed);
  }
  int set(uint32_t slot, Gpa gpa, uint64_t size, Hva uaddr, uint32_t flags = 0) {
    auto st = vm->set_memory_region({slot, flags, gpa, size, uaddr});
    return st ? 0 : st.error().code;
  }
  std::unique_ptr<host::PhysMem> phys;
  std::unique_ptr<host::HostMm> mm;
  std::unique_ptr<Vm> vm;
  Hva hva = 0;
};

TEST_F(MemslotsTest, CreateMakesTheRangeTranslatable) {
  EXPECT_EQ(set(3, 0x10000, 4 * kPageSize, hva), 0);
  EXPECT_EQ(*vm->gfn_to_hva(0x12), hva + 2 * kPageSize);
  EXPECT_EQ(vm->gfn_to_hva(0x14).error().code, EFAULT);
  EXPECT_EQ(vm->gfn_to_hva(0x0f).error().code, EFAULT);
}

TEST_F(MemslotsTest, UnknownFlagsAreEinval) { EXPECT_EQ(set(0, 0, kPageSize, hva, 1u << 5), EINVAL); }
TEST_F(MemslotsTest, SlotIdBeyondTheLimitIsEinval) { EXPECT_EQ(set(kMaxUserMemslots, 0, kPageSize, hva), EINVAL); }
TEST_F(MemslotsTest, MisalignedSizeIsEinval) { EXPECT_EQ(set(0, 0, 100, hva), EINVAL); }
TEST_F(MemslotsTest, MisalignedGuestAddressIsEinval) { EXPECT_EQ(set(0, 0x10, kPageSize, hva), EINVAL); }
TEST_F(MemslotsTest, MisalignedUserAddressIsEinval) { EXPECT_EQ(set(0, 0, kPageSize, hva + 8), EINVAL); }
TEST_F(MemslotsTest, WrappingGuestRangeIsEinval) { EXPECT_EQ(set(0, ~uint64_t{0} & kPageMask, 2 * kPageSize, hva), EINVAL); }
TEST_F(MemslotsTest, RangeBeyondPhysicalAddressWidthIsEinval) {
  EXPECT_EQ(set(0, uint64_t{1} << kMaxPhysAddrBits, kPageSize, hva), EINVAL);
}
TEST_F(MemslotsTest, DeletingAMissingSlotIsEinval) { EXPECT_EQ(set(7, 0, 0, 0), EINVAL); }

TEST_F(MemslotsTest, OverlapWithAnotherSlotIsEexist) {
  ASSERT_EQ(set(0, 0x10000, 4 * kPageSize, hva), 0);
  EXPECT_EQ(set(1, 0x13000, 4 * kPageSize, hva), EEXIST);  // tail overlap
  EXPECT_EQ(set(1, 0xe000, 4 * kPageSize, hva), EEXIST);   // head overlap
  EXPECT_EQ(set(1, 0x11000, kPageSize, hva), EEXIST);      // inside
  EXPECT_EQ(set(1, 0x14000, kPageSize, hva), 0);           // adjacent is fine
}

TEST_F(MemslotsTest, ResizingOrRemappingAnExistingSlotIsEinval) {
  ASSERT_EQ(set(0, 0, 4 * kPageSize, hva), 0);
  EXPECT_EQ(set(0, 0, 8 * kPageSize, hva), EINVAL);
  EXPECT_EQ(set(0, 0, 4 * kPageSize, hva + kPageSize), EINVAL);
  EXPECT_EQ(set(0, 0, 4 * kPageSize, hva, kMemReadonly), EINVAL);
}

TEST_F(MemslotsTest, SettingTheSameLayoutAgainIsANoOp) {
  ASSERT_EQ(set(0, 0, 4 * kPageSize, hva), 0);
  uint64_t gen = vm->memslots().generation();
  EXPECT_EQ(set(0, 0, 4 * kPageSize, hva), 0);
  EXPECT_EQ(vm->memslots().generation(), gen);
}

TEST_F(MemslotsTest, DirtyLoggingFlagChangeKeepsTheSlotAndBumpsTheGeneration) {
  ASSERT_EQ(set(0, 0, 4 * kPageSize, hva), 0);
  uint64_t gen = vm->memslots().generation();
  EXPECT_EQ(set(0, 0, 4 * kPageSize, hva, kMemLogDirtyPages), 0);
  EXPECT_GT(vm->memslots().generation(), gen);
  rcu::ReadLock r;
  EXPECT_EQ(vm->memslots().active()->by_id(0)->flags, kMemLogDirtyPages);
}

TEST_F(MemslotsTest, MoveTranslatesTheNewRangeOnlyAndPublishesTwice) {
  ASSERT_EQ(set(0, 0x10000, 4 * kPageSize, hva), 0);
  uint64_t gen = vm->memslots().generation();
  ASSERT_EQ(set(0, 0x40000, 4 * kPageSize, hva), 0);
  EXPECT_EQ(vm->memslots().generation(), gen + 2);  // invalid, then final
  EXPECT_EQ(vm->gfn_to_hva(0x10).error().code, EFAULT);
  EXPECT_EQ(*vm->gfn_to_hva(0x41), hva + kPageSize);
}

TEST_F(MemslotsTest, MoveOntoAnOverlappingRangeOfItselfIsAllowed) {
  ASSERT_EQ(set(0, 0x10000, 4 * kPageSize, hva), 0);
  EXPECT_EQ(set(0, 0x12000, 4 * kPageSize, hva), 0);
  EXPECT_EQ(*vm->gfn_to_hva(0x12), hva);
}

TEST_F(MemslotsTest, DeleteRemovesTheSlotAndItsEpt01Entries) {
  ASSERT_EQ(set(0, 0, 4 * kPageSize, hva), 0);
  ASSERT_TRUE(vm->ept01_fault(1, true));
  EXPECT_TRUE(vm->ept01_lookup(1));
  ASSERT_EQ(set(0, 0, 0, 0), 0);
  EXPECT_FALSE(vm->ept01_lookup(1));
  EXPECT_EQ(vm->gfn_to_hva(1).error().code, EFAULT);
  EXPECT_EQ(set(0, 0, 4 * kPageSize, hva), 0) << "the id is free again";
}

TEST_F(MemslotsTest, ReadOnlySlotsRefuseWriteFaults) {
  ASSERT_EQ(set(0, 0, 4 * kPageSize, hva, kMemReadonly), 0);
  EXPECT_TRUE(vm->ept01_fault(0, false));
  EXPECT_EQ(vm->ept01_fault(0, true).error().code, EFAULT);
}

TEST_F(MemslotsTest, ErrorsLeaveTheSlotsUnchanged) {
  ASSERT_EQ(set(0, 0, 4 * kPageSize, hva), 0);
  uint64_t gen = vm->memslots().generation();
  EXPECT_NE(set(1, 0x1000, kPageSize, hva), 0);
  EXPECT_NE(set(0, 0, 8 * kPageSize, hva), 0);
  EXPECT_EQ(vm->memslots().generation(), gen);
  rcu::ReadLock r;
  EXPECT_EQ(vm->memslots().active()->size(), 1u);
}

TEST_F(MemslotsTest, TheHintIsTriedFirstAndDroppedWhenTheGenerationMoves) {
  ASSERT_EQ(set(0, 0x10000, 4 * kPageSize, hva), 0);
  ASSERT_EQ(set(1, 0x20000, 4 * kPageSize, hva), 0);
  LookupHint hint;
  {
    rcu::ReadLock r;
    const MemslotSet* s = vm->memslots().active();
    EXPECT_EQ(s->find(0x11, hint)->id, 0u);
    EXPECT_EQ(hint.slot->id, 0u);
    EXPECT_EQ(hint.generation, s->generation());
    EXPECT_EQ(s->find(0x22, hint)->id, 1u) << "a miss searches and moves the hint";
    EXPECT_EQ(hint.slot->id, 1u);
    EXPECT_EQ(s->find(0x30, hint), nullptr);
    EXPECT_EQ(hint.slot->id, 1u) << "a hole leaves the hint alone";
  }
  // Moving slot 1 publishes new sets: the old hint's generation no longer
  // matches, so it is not trusted even for a gfn its stale slot would hold.
  ASSERT_EQ(set(1, 0x40000, 4 * kPageSize, hva), 0);
  rcu::ReadLock r;
  const MemslotSet* s = vm->memslots().active();
  EXPECT_NE(hint.generation, s->generation());
  EXPECT_EQ(s->find(0x22, hint), nullptr);
  EXPECT_EQ(s->find(0x41, hint)->id, 1u);
  EXPECT_EQ(hint.generation, s->generation());
}

TEST_F(MemslotsTest, AVcpuFaultUsesAndUpdatesItsOwnHint) {
  ASSERT_EQ(set(0, 0x10000, 4 * kPageSize, hva), 0);
  ASSERT_EQ(set(1, 0x20000, 4 * kPageSize, hva + 4 * kPageSize), 0);
  testing::HarnessVcpu vcpu(0);
  ASSERT_TRUE(vm->ept01_fault(0x21, true, &vcpu.memslot_hint()));
  ASSERT_NE(vcpu.memslot_hint().slot, nullptr);
  EXPECT_EQ(vcpu.memslot_hint().slot->id, 1u);
  auto h = vm->gfn_to_hva(0x12, vcpu.memslot_hint());
  ASSERT_TRUE(h);
  EXPECT_EQ(*h, hva + 2 * kPageSize);
  EXPECT_EQ(vcpu.memslot_hint().slot->id, 0u);
}

// Where a layout puts its slots' base gfns (46-bit guest-physical space).
enum class Layout {
  dense,       // all within the first 256 gfns
  sparse,      // anywhere in the guest-physical space
  far_slots,   // mostly the first 256 gfns, one in four near the top: the
               // low slots share one gfn-index bucket
  high_dense,  // mostly 256 gfns near the top, one in four near 0
};
constexpr Gfn kTopGfn = (Gfn{1} << (kMaxPhysAddrBits - kPageShift)) - 8;

Gfn pick_base(Layout layout, std::mt19937_64& rng) {
  const bool far = rng() % 4 == 0;
  switch (layout) {
    case Layout::dense: return rng() % 256;
    case Layout::sparse: return rng() % kTopGfn;
    case Layout::far_slots: return far ? kTopGfn - rng() % 256 : rng() % 256;
    case Layout::high_dense: return far ? rng() % 256 : kTopGfn - rng() % 256;
  }
  return 0;
}

// The gfns a step checks: the dense range, every slot's edges and the gfns
// beside them, random ones and the highest.
std::vector<Gfn> probes(Layout layout, const std::map<uint32_t, std::pair<Gfn, uint64_t>>& model,
                        std::mt19937_64& rng) {
  std::vector<Gfn> gfns;
  for (Gfn g = 0; g < 264; g++) gfns.push_back(g);
  for (Gfn g = kTopGfn - 264; g < kTopGfn + 8; g++) gfns.push_back(g);
  for (auto& [id, r] : model)
    for (Gfn g : {r.first - 1, r.first, r.first + r.second - 1, r.first + r.second}) gfns.push_back(g);
  for (int i = 0; i < 32; i++) gfns.push_back(pick_base(layout, rng));
  gfns.push_back(~Gfn{0});
  return gfns;
}

class MemslotsModel : public ::testing::TestWithParam<Layout> {};

// Random creates, deletes, moves and flag changes against a plain std::map
// model: after every change each slot resolves its gfns (by search, by the
// set's last-used slot and by a hint), the gfns around it resolve to their own
// slot or nothing, by_id agrees, and the gfn index stays within its bound of
// 4 buckets per slot (64 at least), whatever the layout.
TEST_P(MemslotsModel, RandomUpdatesKeepEveryLookupRight) {
  const Layout layout = GetParam();
  auto phys = std::move(*host::PhysMem::create({64, 0}));
  host::HostMm mm(*phys);
  Vm vm(mm, 1);
  Hva hva = *mm.create_region(4 * kPageSize, host::FrameKind::managed);
  std::map<uint32_t, std::pair<Gfn, uint64_t>> model;  // id -> base, pages
  std::mt19937_64 rng(5);
  auto holder = [&](Gfn g) -> int64_t {
    for (auto& [id, r] : model)
      if (g >= r.first && g < r.first + r.second) return id;
    return -1;
  };
  LookupHint hint;
  for (int step = 0; step < 600; step++) {
    const uint32_t id = rng() % 48;
    const Gfn base = pick_base(layout, rng);
    const uint64_t pages = 1 + rng() % 4;
    MemoryRegion r{id, 0, gfn_to_gpa(base), pages * kPageSize, hva};
    auto it = model.find(id);
    if (it != model.end()) {
      if (rng() % 3 == 0) {
        r = {id, 0, 0, 0, 0};  // delete
      } else {
        r.memory_size = it->second.second * kPageSize;  // move: same size
        if (pages == 1) r.flags = kMemLogDirtyPages;  // sometimes a flag change too
      }
    }
    bool overlaps = false;
    for (auto& [oid, o] : model)
      if (oid != id && r.memory_size && base < o.first + o.second && o.first < base + r.memory_size / kPageSize)
        overlaps = true;
    Status st = vm.set_memory_region(r);
    if (overlaps) {
      ASSERT_FALSE(st);
      ASSERT_EQ(st.error().code, EEXIST);
    } else {
      ASSERT_TRUE(st) << st.error().to_string();
      if (r.memory_size == 0) {
        model.erase(id);
      } else {
        model[id] = {base, r.memory_size / kPageSize};
      }
    }
    rcu::ReadLock rl;
    const MemslotSet* set = vm.memslots().active();
    ASSERT_EQ(set->size(), model.size());
    ASSERT_LE(set->index_buckets(), 4 * std::max<size_t>(set->size(), 16)) << "step " << step;
    for (Gfn g : probes(layout, model, rng)) {
      const int64_t want = holder(g);
      const Memslot* a = set->find(g);
      const Memslot* b = set->find(g, hint);
      ASSERT_EQ(a ? int64_t(a->id) : -1, want) << "step " << step << " gfn " << g;
      ASSERT_EQ(a, b);
      if (a) {
        ASSERT_EQ(set->by_id(a->id), a);
        ASSERT_EQ(a->base_gfn, model[a->id].first);
        ASSERT_EQ(a->npages, model[a->id].second);
        ASSERT_FALSE(a->invalid);
      }
    }
    for (uint32_t i = 0; i < 48; i++) ASSERT_EQ(set->by_id(i) != nullptr, model.count(i) == 1);
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, MemslotsModel,
                         ::testing::Values(Layout::dense, Layout::sparse, Layout::far_slots, Layout::high_dense),
                         [](const auto& info) {
                           switch (info.param) {
                             case Layout::dense: return "dense";
                             case Layout::sparse: return "sparse";
                             case Layout::far_slots: return "far_slots";
                             case Layout::high_dense: return "high_dense";
                           }
                           return "unknown";
                         });

// One slot at the top of the guest-physical space widens the index's buckets
// (its size stays bounded by the slot count, not the gfn span), and removing
// it narrows them again: the low slots do not stay crowded into one bucket.
TEST(MemslotsIndex, AFarSlotWidensTheBucketsAndItsRemovalNarrowsThem) {
  constexpr uint32_t n = 1024;
  auto phys = std::move(*host::PhysMem::create({64, 0}));
  host::HostMm mm(*phys);
  Vm vm(mm, 1);
  Hva hva = *mm.create_region(kPageSize, host::FrameKind::managed);
  std::vector<MemoryRegion> rs;
  for (uint32_t i = 0; i < n; i++) rs.push_back({i, 0, gfn_to_gpa(Gfn{2} * i), kPageSize, hva});
  ASSERT_TRUE(vm.set_memory_regions(rs));
  auto check_all = [&](bool with_far) {
    rcu::ReadLock rl;
    const MemslotSet* set = vm.memslots().active();
    for (uint32_t i = 0; i < n; i++) {
      ASSERT_NE(set->find(Gfn{2} * i), nullptr);
      ASSERT_EQ(set->find(Gfn{2} * i)->id, i);
      ASSERT_EQ(set->find(Gfn{2} * i + 1), nullptr);
    }
    const Memslot* far = set->find(kTopGfn);
    ASSERT_EQ(far != nullptr, with_far);
    if (with_far) {
      ASSERT_EQ(far->id, n);
    }
  };
  unsigned narrow = 0;
  {
    rcu::ReadLock rl;
    narrow = vm.memslots().active()->index_shift();
    EXPECT_GE(vm.memslots().active()->index_buckets() * 2, size_t{n});
  }
  check_all(false);

  ASSERT_TRUE(vm.set_memory_region({n, 0, gfn_to_gpa(kTopGfn), kPageSize, hva}));
  {
    rcu::ReadLock rl;
    EXPECT_LE(vm.memslots().active()->index_buckets(), 4 * size_t{n + 1});
    EXPECT_GT(vm.memslots().active()->index_shift(), narrow);
  }
  check_all(true);

  ASSERT_TRUE(vm.set_memory_region({n, 0, 0, 0, 0}));
  {
    rcu::ReadLock rl;
    EXPECT_EQ(vm.memslots().active()->index_shift(), narrow);
    EXPECT_GE(vm.memslots().active()->index_buckets() * 2, size_t{n});
  }
  check_all(false);
}

class MemslotsScale : public ::testing::TestWithParam<uint32_t> {};

TEST_P(MemslotsScale, EveryGfnOfEverySlotResolvesAndTheHintFollows) {
  const uint32_t n = GetParam();
  auto phys = std::move(*host::PhysMem::create({n + 16, 0}));
  host::HostMm mm(*phys);
  Vm vm(mm, 1);
  Hva hva = *mm.create_region(size_t{n} * kPageSize, host::FrameKind::managed);
  std::vector<MemoryRegion> rs;
  // Slots one page each, with a one-page hole between neighbours.
  for (uint32_t i = 0; i < n; i++) rs.push_back({i, 0, Gpa{2} * i * kPageSize, kPageSize, hva + size_t{i} * kPageSize});
  ASSERT_TRUE(vm.set_memory_regions(rs));
  rcu::ReadLock r;
  const MemslotSet* set = vm.memslots().active();
  ASSERT_EQ(set->size(), n);
  LookupHint hint;
  for (uint32_t i = 0; i < n; i++) {
    const Memslot* s = set->find(Gfn{2} * i, hint);
    ASSERT_NE(s, nullptr);
    ASSERT_EQ(s->id, i);
    ASSERT_EQ(set->find(Gfn{2} * i + 1), nullptr) << "holes resolve to nothing";
    ASSERT_EQ(hint.slot, s);
  }
  EXPECT_EQ(set->find(Gfn{2} * n), nullptr);
}

INSTANTIATE_TEST_SUITE_P(Slots, MemslotsScale, ::testing::Values(1u, 8u, 512u, 8192u, kMaxUserMemslots));

TEST(MemslotsLimit, The32765thSlotIsRefused) {
  auto phys = std::move(*host::PhysMem::create({16, 0}));
  host::HostMm mm(*phys);
  Vm vm(mm, 1);
  Hva hva = *mm.create_region(kPageSize, host::FrameKind::managed);
  std::vector<MemoryRegion> rs;
  for (uint32_t i = 0; i < kMaxUserMemslots; i++) rs.push_back({i, 0, Gpa{i} * kPageSize, kPageSize, hva});
  ASSERT_TRUE(vm.set_memory_regions(rs));
  auto st = vm.set_memory_region({kMaxUserMemslots, 0, Gpa{kMaxUserMemslots} * kPageSize, kPageSize, hva});
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, EINVAL);
}

}  // namespace
}  // namespace nestcache::vm
