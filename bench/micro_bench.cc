// Micro-benchmarks of the host and vm layers: what one guest-page access
// costs through a one-shot HostMap against a persistent PfnCache (both read
// sides) and against a plain read through a pointer, on managed and unmanaged
// memory; how gfn -> memslot lookup scales with the number of slots, for a
// random and a local access pattern; how the MMU notifier's search for
// affected pfn caches scales with the number of registered caches; and what a
// refresh costs while another thread invalidates other pages non-stop.
//
// Everything is built before the timed loop; each loop does only the
// operation named. bench/bench_main.cc runs these with a second thread of this
// process busy on another CPU and prints the unmanaged HostMap / PfnCache and
// PfnCache / plain-read ratios.
#include <benchmark/benchmark.h>

#include <atomic>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "base/check.h"
#include "base/huge_pages.h"
#include "base/rcu.h"
#include "bench_env.h"
#include "vm/host_map.h"
#include "vm/memslots.h"
#include "vm/pfn_cache.h"

namespace nestcache::bench {
namespace {

using host::FrameKind;

constexpr uint64_t kGuestValue = 0x6e65737463616368;  // "nestcach", written once, read back
constexpr size_t kStreamLength = 4096;                // precomputed gfns / targets; a power of two
constexpr size_t kStreamMask = kStreamLength - 1;
constexpr uint64_t kSeed = 20241125;

// Creates the one-page environment the access benchmarks use, with the page
// written once so that every later read finds it resident.
std::unique_ptr<test_support::VmEnv> one_page_env(benchmark::State& state, FrameKind kind) {
  auto env = bench_env(kind, 1);
  if (!env) {
    state.SkipWithError(env.error().to_string().c_str());
    return nullptr;
  }
  if (auto st = (*env)->vm->write_guest(0, &kGuestValue, sizeof kGuestValue); !st) {
    state.SkipWithError(st.error().to_string().c_str());
    return nullptr;
  }
  return std::move(*env);
}

// Ends a run whose loop read something other than what was written.
void check_value(benchmark::State& state, uint64_t last) {
  if (last != kGuestValue) state.SkipWithError("read back a value that was never written");
}

// --- one access: HostMap against PfnCache --------------------------------------

// BM_HostMapAccess/<kind>: kvm_vcpu_map + 8-byte read + kvm_vcpu_unmap of one
// guest page (the "before"): managed = pin + direct map; unmanaged = mmap,
// first-touch fault, munmap with its TLB shootdown.
void BM_HostMapAccess(benchmark::State& state, FrameKind kind) {
  std::unique_ptr<test_support::VmEnv> env = one_page_env(state, kind);
  if (!env) return;
  const CounterSnapshot before = CounterSnapshot::of(env->phys->counters());
  const std::optional<uint64_t> tlb_before = tlb_shootdown_interrupts();
  uint64_t last = 0;
  for (auto _ : state) {
    Result<vm::HostMap> m = vm::HostMap::map(*env->vm, 0);
    if (!m) {
      state.SkipWithError(m.error().to_string().c_str());
      break;
    }
    last = m->read<uint64_t>(0);
    benchmark::DoNotOptimize(last);
    m->unmap(false);
  }
  const std::optional<uint64_t> tlb_after = tlb_shootdown_interrupts();
  const CounterSnapshot after = CounterSnapshot::of(env->phys->counters());
  per_iteration(state, Counter::remap_windows, before, after);
  per_iteration(state, Counter::pins, before, after);
  if (tlb_before && tlb_after) per_iteration(state, "tlb_ipis_machine", *tlb_after - *tlb_before);
  check_value(state, last);
}
BENCHMARK_CAPTURE(BM_HostMapAccess, managed, FrameKind::managed)->Unit(benchmark::kNanosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_HostMapAccess, unmanaged, FrameKind::unmanaged)->Unit(benchmark::kNanosecond)->UseRealTime();

// BM_PlainRead's timed loop, a function of its own and aligned to a cache
// line as access_loop is: a load, a decrement and a branch, which this
// processor runs at one or two iterations a cycle depending only on where the
// three instructions fall (0.29 against 0.14 ns, with the loop unchanged).
// volatile: one real load per iteration, which the compiler may neither hoist
// out of the loop nor drop.
[[gnu::noinline, gnu::aligned(64)]] uint64_t plain_loop(benchmark::State& state, const volatile uint64_t* p) {
  uint64_t last = 0;
  for (auto _ : state) {
    last = *p;
    benchmark::DoNotOptimize(static_cast<const uint64_t&>(last));
  }
  return last;
}

// BM_PlainRead: an 8-byte read through a plain pointer to the guest page (the
// VMM's own mapping of it): the floor a cached access is compared with.
void BM_PlainRead(benchmark::State& state) {
  std::unique_ptr<test_support::VmEnv> env = one_page_env(state, FrameKind::managed);
  if (!env) return;
  check_value(state, plain_loop(state, reinterpret_cast<const volatile uint64_t*>(env->base)));
}
BENCHMARK(BM_PlainRead)->Unit(benchmark::kNanosecond)->UseRealTime();

// The PfnCache reader protocol for one 8-byte read: check (taking the read
// side), read, release; empty if the check failed (the caller refreshes with
// nothing held, as refresh waits for readers).
[[gnu::always_inline]] inline std::optional<uint64_t> read_through(const vm::PfnCache& cache) {
  vm::CachePtr p = cache.read(0, sizeof(uint64_t));
  if (!p) return std::nullopt;
  return p.read<uint64_t>(0);
}

// The read that follows a failed check, out of line: inlined, its second copy
// of the read shared the first one's field addresses, which the compiler then
// computed before the loop and kept on the stack for want of registers.
[[gnu::noinline, gnu::cold]] std::optional<uint64_t> refresh_and_read(benchmark::State& state, vm::PfnCache& cache) {
  std::optional<uint64_t> v;
  while (!v) {  // nothing invalidates here, but a reader must be ready for it
    if (auto st = cache.refresh(sizeof(uint64_t)); !st) {
      state.SkipWithError(st.error().to_string().c_str());
      break;
    }
    v = read_through(cache);
  }
  return v;
}

// BM_PfnCacheAccess's timed loop; returns the last value read. A function of
// its own, so that the loop's values fit in registers as BM_PlainRead's do:
// inside the benchmark, with the setup's values live around it, the compiler
// kept the iteration count on the stack (a load and a store per iteration,
// each waiting for the last), a cost of the harness and not of the cache.
// The value is kept as BM_PlainRead keeps its (the non-const DoNotOptimize
// adds a memory clobber). Aligned to a cache line: the loop is a few
// instructions, and where it falls relative to 64-byte boundaries moved it
// by 15-20 % whenever code earlier in this file grew or shrank, with the
// loop's instructions unchanged.
[[gnu::noinline, gnu::aligned(64)]] uint64_t access_loop(benchmark::State& state, vm::PfnCache& cache) {
  uint64_t last = 0;
  for (auto _ : state) {
    std::optional<uint64_t> v = read_through(cache);
    if (!v) [[unlikely]] {
      v = refresh_and_read(state, cache);
      if (!v) break;
    }
    last = *v;
    benchmark::DoNotOptimize(static_cast<const uint64_t&>(last));
  }
  return last;
}

#if defined(__x86_64__)
// BM_AccessShape/<shape>: a cached access's instructions with none of their
// meaning, over plain memory set up so that every check passes.
//
// as_built: what the lock-free check + read compiles to (objdump -d -C
// nestcache_microbench, function access_loop), in the same order and with the
// same dependences: a TLS load of the thread's record, a load and test of its
// slot 0, a store into it, six loads from the cache's line, a test of the
// count's low bits, the count loaded and compared again, a test of the gpa,
// two dependent loads (the Vm, its memslot generation) and a compare, a load
// of the frame's version and a compare, the 8-byte read, and a store that
// leaves the slot: 13 loads, 2 stores and 7 branches besides the loop's own.
// Against BM_PlainRead it is the floor of that instruction sequence on the
// machine at hand; against BM_PfnCacheAccess/lockfree/unmanaged it is how much
// of the access is anything but its instructions.
//
// kvm_check: KVM's check without its lock: the valid bit, the gpa and the
// memslot generation, then the read (7 loads, 3 branches). No reader slot (so
// nothing stops an invalidation from unmapping the page under the read), no
// second load of the count (so a refresh may be half seen) and no frame tag
// (so a stale access goes unseen): what the checks our read keeps cost, as
// the difference between the two shapes.
//
// The summary prints both against the plain read and as_built against the
// access.
enum class Shape { as_built, kvm_check };

struct alignas(64) ShapeLine {
  uint64_t unused = 0;
  const uint64_t* vm_generation = nullptr;  // 0x08, as PfnCache's Vm pointer
  uint64_t count = 0;                       // 0x10: valid, lock-free
  uint64_t gpa = 0;                         // 0x18: the gpa asked for (0)
  uint64_t generation = 0;                  // 0x20
  const uint64_t* khva = nullptr;           // 0x28
  const uint64_t* version_cell = nullptr;   // 0x30
  uint64_t version = 0;                     // 0x38
};
}  // namespace
}  // namespace nestcache::bench

// The fake thread record's address, in TLS as a reader's record pointer is,
// with C linkage so that the loop can name it (%fs-relative, local-exec).
extern "C" {
constinit thread_local uintptr_t* nestcache_shape_record = nullptr;
}

namespace nestcache::bench {
namespace {

// The check both shapes make alike: the gpa asked for (0, in %rcx), then
// the memslot generation (in %rdi) against the Vm's, through its pointer.
#define NC_SHAPE_GPA_AND_GENERATION \
  "test %%rcx, %%rcx\n\t"           \
  "jne %l[failed]\n\t"              \
  "mov 0x08(%[line]), %%r10\n\t"    \
  "mov (%%r10), %%r10\n\t"          \
  "cmp %%r10, %%rdi\n\t"            \
  "jne %l[failed]\n\t"

// One aligned function per shape, as access_loop is.
template <Shape S>
[[gnu::noinline, gnu::aligned(64)]] uint64_t shape_loop(benchmark::State& state, const ShapeLine& line) {
  uint64_t last = 0;
  for (auto _ : state) {
    uint64_t v;
    if constexpr (S == Shape::as_built) {
      asm goto(
          "mov %%fs:nestcache_shape_record@tpoff, %%rax\n\t"
          "mov (%%rax), %%rdx\n\t"
          "test %%rdx, %%rdx\n\t"
          "jne %l[failed]\n\t"
          "mov %[line], (%%rax)\n\t"
          "mov 0x10(%[line]), %%rdx\n\t"
          "mov 0x18(%[line]), %%rcx\n\t"
          "mov 0x20(%[line]), %%rdi\n\t"
          "mov 0x28(%[line]), %%r9\n\t"
          "mov 0x30(%[line]), %%rsi\n\t"
          "mov 0x38(%[line]), %%r8\n\t"
          "test $3, %%dl\n\t"
          "jne %l[failed]\n\t"
          "mov 0x10(%[line]), %%r10\n\t"
          "cmp %%r10, %%rdx\n\t"
          "jne %l[failed]\n\t"
          NC_SHAPE_GPA_AND_GENERATION
          "mov (%%rsi), %%r10\n\t"
          "cmp %%r10, %%r8\n\t"
          "jne %l[failed]\n\t"
          "mov (%%r9), %[v]\n\t"
          "movq $0, (%%rax)"
          : [v] "=r"(v)
          : [line] "r"(&line)
          : "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "cc", "memory"
          : failed);
    } else {
      asm goto(
          "mov 0x10(%[line]), %%rdx\n\t"
          "mov 0x18(%[line]), %%rcx\n\t"
          "mov 0x20(%[line]), %%rdi\n\t"
          "mov 0x28(%[line]), %%r9\n\t"
          "test $3, %%dl\n\t"
          "jne %l[failed]\n\t"
          NC_SHAPE_GPA_AND_GENERATION
          "mov (%%r9), %[v]"
          : [v] "=r"(v)
          : [line] "r"(&line)
          : "rcx", "rdx", "rdi", "r9", "r10", "cc", "memory"
          : failed);
    }
    last = v;
    benchmark::DoNotOptimize(static_cast<const uint64_t&>(last));
    continue;
  failed:
    state.SkipWithError("a check of the shape failed: its memory is set up to pass");
    break;
  }
  return last;
}

template <Shape S>
void BM_AccessShape(benchmark::State& state) {
  alignas(64) static thread_local uintptr_t record[8] = {};  // slot 0 free
  static const uint64_t vm_generation = 7;
  static const uint64_t version = 3;
  static const uint64_t page_word = kGuestValue;
  const ShapeLine line{.vm_generation = &vm_generation,
                       .generation = vm_generation,
                       .khva = &page_word,
                       .version_cell = &version,
                       .version = version};
  nestcache_shape_record = record;
  check_value(state, shape_loop<S>(state, line));
}
BENCHMARK(BM_AccessShape<Shape::as_built>)->Name("BM_AccessShape/as_built")->Unit(benchmark::kNanosecond)->UseRealTime();
BENCHMARK(BM_AccessShape<Shape::kvm_check>)->Name("BM_AccessShape/kvm_check")->Unit(benchmark::kNanosecond)->UseRealTime();
#undef NC_SHAPE_GPA_AND_GENERATION
#endif

// BM_PfnCacheAccess/<read side>/<kind>: check + 8-byte read through an
// activated PfnCache (the "after"): the mapping persists, so neither kind
// makes a system call. rwlock: KVM's reader-writer lock taken shared;
// lockfree: a per-thread reader slot and a sequence count.
void BM_PfnCacheAccess(benchmark::State& state, vm::CacheReadSide side, FrameKind kind) {
  std::unique_ptr<test_support::VmEnv> env = one_page_env(state, kind);
  if (!env) return;
  vm::PfnCache cache(*env->vm, side);  // declared after env: deactivated before the Vm goes
  if (auto st = cache.activate(0, sizeof(uint64_t)); !st) {
    state.SkipWithError(st.error().to_string().c_str());
    return;
  }
  (void)read_through(cache);  // fault the window's page in before timing
  const CounterSnapshot before = CounterSnapshot::of(env->phys->counters());
  const CounterSnapshot vm_before = CounterSnapshot::of(env->vm->counters());
  const uint64_t last = access_loop(state, cache);
  const CounterSnapshot after = CounterSnapshot::of(env->phys->counters());
  const CounterSnapshot vm_after = CounterSnapshot::of(env->vm->counters());
  per_iteration(state, Counter::remap_windows, before, after);
  per_iteration(state, Counter::cache_refreshes, vm_before, vm_after);
  check_value(state, last);
}

const bool kAccessRegistered = [] {
  for (vm::CacheReadSide side : {vm::CacheReadSide::rwlock, vm::CacheReadSide::lockfree}) {
    for (FrameKind kind : {FrameKind::managed, FrameKind::unmanaged}) {
      const std::string name = std::string("BM_PfnCacheAccess/") + vm::cache_read_side_name(side) + "/" +
                               host::frame_kind_name(kind);
      benchmark::RegisterBenchmark(name.c_str(), BM_PfnCacheAccess, side, kind)
          ->Unit(benchmark::kNanosecond)
          ->UseRealTime();
    }
  }
  return true;
}();

// --- memslot lookup ----------------------------------------------------------------

constexpr Gfn kPagesPerSlot = 16;
constexpr size_t kRunLength = 16;  // local pattern: lookups per slot before moving on

// random         each gfn in a slot picked at random, at a random page of it;
// local          runs of kRunLength gfns within one slot (a guest working in
//                one region), each run in a slot picked at random;
// random_uneven  as random, over slots of 1 to kPagesPerSlot pages with holes
//                of up to 2 * kPagesPerSlot pages between them: no two slots
//                alike, so the gfn index's buckets hold zero, one or several.
enum class Pattern { random, local, random_uneven };
const char* pattern_name(Pattern p) {
  switch (p) {
    case Pattern::random: return "random";
    case Pattern::local: return "local";
    case Pattern::random_uneven: return "random_uneven";
  }
  return "?";
}

// A Vm with `slots` memslots from gfn 0, all pointing at the same region
// (overlapping hvas are allowed, as in KVM), and a precomputed stream of gfns
// inside them. Even: kPagesPerSlot pages each, back to back; uneven: as
// random_uneven says.
struct SlotsFixture {
  SlotsFixture(size_t slots, bool uneven) {
    auto e = bench_env(FrameKind::managed, kPagesPerSlot);  // slot 0
    NC_CHECK(e);
    env = std::move(*e);
    std::mt19937_64 rng(kSeed);
    std::uniform_int_distribution<uint64_t> size(1, kPagesPerSlot), hole(0, 2 * kPagesPerSlot);
    std::vector<vm::MemoryRegion> regions;
    ranges.push_back({0, kPagesPerSlot});
    for (uint32_t id = 1; id < slots; id++) {
      const Gfn end = ranges.back().first + ranges.back().second;
      ranges.push_back(uneven ? std::pair{end + hole(rng), size(rng)} : std::pair{end, kPagesPerSlot});
      regions.push_back({id, 0, gfn_to_gpa(ranges.back().first), ranges.back().second * kPageSize, env->base});
    }
    NC_CHECK(env->vm->set_memory_regions(regions));
    rcu::ReadLock rcu;
    NC_CHECK(env->vm->memslots().active()->size() == slots);
  }

  // The gfns a pattern looks up, made on first use and checked to resolve.
  const std::vector<Gfn>& stream(Pattern p) {
    std::vector<Gfn>& gfns = streams[p];
    if (!gfns.empty()) return gfns;
    std::mt19937_64 rng(kSeed + static_cast<uint64_t>(p));
    std::uniform_int_distribution<size_t> slot(0, ranges.size() - 1);
    while (gfns.size() < kStreamLength) {
      const auto [base, pages] = ranges[slot(rng)];
      const size_t run = p == Pattern::local ? kRunLength : 1;
      for (size_t j = 0; j < run; j++) gfns.push_back(base + rng() % pages);
    }
    rcu::ReadLock rcu;
    const vm::MemslotSet* set = env->vm->memslots().active();
    for (Gfn g : gfns) NC_CHECK(set->find(g) && set->find(g)->contains(g));
    return gfns;
  }

  std::unique_ptr<test_support::VmEnv> env;
  std::vector<std::pair<Gfn, uint64_t>> ranges;  // slot i's base gfn and pages
  std::map<Pattern, std::vector<Gfn>> streams;
};

// Built once per size and layout and shared by the patterns: creating 32,764
// slots publishes, and waits for an RCU grace period, 32,764 times.
SlotsFixture& slots_fixture(size_t slots, bool uneven) {
  static std::map<std::pair<size_t, bool>, std::unique_ptr<SlotsFixture>> fixtures;
  auto& f = fixtures[{slots, uneven}];
  if (!f) f = std::make_unique<SlotsFixture>(slots, uneven);
  return *f;
}

// BM_MemslotLookup/<pattern>/<slots>: one gfn -> memslot lookup the way a vCPU
// makes it: inside an RCU read-side section (entered per lookup, as
// Vm::gfn_to_hva does), the vCPU's last-used slot first, then the set's gfn
// index.
void BM_MemslotLookup(benchmark::State& state, Pattern pattern) {
  SlotsFixture& f = slots_fixture(static_cast<size_t>(state.range(0)), pattern == Pattern::random_uneven);
  const vm::Memslots& slots = f.env->vm->memslots();
  const std::vector<Gfn>& gfns = f.stream(pattern);
  vm::LookupHint hint;
  size_t i = 0, misses = 0;
  for (auto _ : state) {
    rcu::ReadLock rcu;
    const vm::Memslot* before = hint.slot;
    const vm::Memslot* s = slots.active()->find(gfns[i++ & kStreamMask], hint);
    misses += s != before;
    benchmark::DoNotOptimize(s);
  }
  per_iteration(state, "hint_misses", misses);
}

const bool kLookupRegistered = [] {
  for (Pattern p : {Pattern::random, Pattern::local, Pattern::random_uneven}) {
    const std::string name = std::string("BM_MemslotLookup/") + pattern_name(p);
    benchmark::RegisterBenchmark(name.c_str(), BM_MemslotLookup, p)
        ->Arg(8)
        ->Arg(512)
        ->Arg(8192)
        ->Arg(32764)
        ->Unit(benchmark::kNanosecond);
  }
  return true;
}();

// --- invalidation search -------------------------------------------------------------

// The caches of a CachesFixture, in one block. KVM's caches are kernel
// objects, which live in the kernel's direct map on huge pages; L0's own
// tables here get the same from base/huge_pages.h, and so does this block
// when it reaches huge_pages::kHugeAllocMin (from about 4,000 caches).
class CachePool {
 public:
  explicit CachePool(size_t capacity)
      : capacity_(capacity),
        bytes_(capacity * sizeof(vm::PfnCache) + alignof(vm::PfnCache)),
        raw_(huge_pages::allocate(bytes_)) {
    void* p = raw_;
    size_t space = bytes_;
    caches_ = static_cast<vm::PfnCache*>(std::align(alignof(vm::PfnCache), capacity * sizeof(vm::PfnCache), p, space));
    NC_CHECK(caches_);
  }
  CachePool(const CachePool&) = delete;
  CachePool& operator=(const CachePool&) = delete;
  ~CachePool() {
    for (size_t i = size_; i-- > 0;) caches_[i].~PfnCache();
    huge_pages::deallocate(raw_, bytes_);
  }
  vm::PfnCache& emplace(vm::Vm& vm, vm::CacheReadSide side) {
    NC_CHECK(size_ < capacity_);
    return *new (caches_ + size_++) vm::PfnCache(vm, side);
  }
  vm::PfnCache& operator[](size_t i) { return caches_[i]; }

 private:
  size_t capacity_;
  size_t size_ = 0;
  size_t bytes_;
  void* raw_;
  vm::PfnCache* caches_ = nullptr;
};

// `caches` active PfnCaches of one read side, cache i on guest page 2i of one
// managed region of 2 * caches pages (memslot 0); the odd pages have no cache.
// Every page is faulted in, in ascending order, before the caches activate:
// consecutive frames mapped one page after another merge into one kernel
// mapping, which keeps 200,000 pages far below vm.max_map_count.
//
// Managed memory keeps set-up cheap (no remap window per cache) and does not
// change what is measured: the notifier's search is the same for both kinds.
struct CachesFixture {
  CachesFixture(size_t caches, vm::CacheReadSide side) : pool(caches) {
    auto e = bench_env(FrameKind::managed, 2 * caches);
    NC_CHECK(e);
    env = std::move(*e);
    for (size_t page = 0; page < 2 * caches; page++) NC_CHECK(env->mm->fault_in(env->base + page * kPageSize, true));
    for (size_t i = 0; i < caches; i++) {
      vm::PfnCache& c = pool.emplace(*env->vm, side);
      NC_CHECK(c.activate(gfn_to_gpa(2 * i), sizeof(uint64_t)));
    }
    NC_CHECK(env->vm->caches().active_count() == caches);
    std::mt19937_64 rng(kSeed);
    std::uniform_int_distribution<size_t> pick(0, caches - 1);
    for (size_t i = 0; i < kStreamLength; i++) {
      targets.push_back(pick(rng));
      target_caches.push_back(&pool[targets.back()]);
    }
  }
  Hva cache_hva(size_t i) const { return env->base + 2 * i * kPageSize; }

  std::unique_ptr<test_support::VmEnv> env;
  CachePool pool;  // after env: destroyed (deactivated) before the Vm
  std::vector<size_t> targets;    // pseudo-random cache indices
  // &pool[targets[i]], read in order beside targets, as a vCPU holds its
  // caches: the stream itself adds no miss.
  std::vector<vm::PfnCache*> target_caches;
};

// Built once per size and read side and shared by the hit and miss
// benchmarks: activating 100,000 caches takes about a second.
CachesFixture& caches_fixture(size_t caches, vm::CacheReadSide side) {
  static std::map<std::pair<size_t, vm::CacheReadSide>, std::unique_ptr<CachesFixture>> fixtures;
  auto& f = fixtures[{caches, side}];
  if (!f) f = std::make_unique<CachesFixture>(caches, side);
  return *f;
}

// A thread that reads a cache of its own over and over, so that it is an
// active lock-free reader (vm/cache_readers.h) for as long as it lives: a
// vCPU running its guest on another CPU.
class ActiveReader {
 public:
  explicit ActiveReader(vm::Vm& vm) : cache_(vm, vm::CacheReadSide::lockfree) {
    NC_CHECK(cache_.activate(gfn_to_gpa(1), sizeof(uint64_t)));  // no other benchmark's cache there
    thread_ = std::thread([this] {
      while (!stop_.load(std::memory_order_relaxed)) {
        // Read, refreshing first if an invalidation got there.
        if (Result<vm::CachePtr> p = cache_.lock(gfn_to_gpa(1), sizeof(uint64_t)))
          benchmark::DoNotOptimize(p->read<uint64_t>(0));
      }
    });
  }
  ~ActiveReader() {
    stop_.store(true);
    thread_.join();
  }

 private:
  vm::PfnCache cache_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// BM_CacheInvalidate/hit/<read side>/<caches>: one MMU-notifier invalidation
// (range start + end) of a page exactly one registered cache maps, plus that
// cache's refresh. With lockfree caches the invalidation also waits out the
// lock-free readers; with no other thread an active reader it needs no
// membarrier (vm/cache_readers.h).
//
// Why the notifier call and not HostMm::migrate: migrate adds a frame
// allocation, a 4 KiB copy and an mmap, which would bury the registry search.
// Why the refresh is inside the loop: the cache must be valid again before the
// next invalidation can affect it, and PauseTiming/ResumeTiming around it
// would cost more than the refresh itself. The refresh does not depend on the
// number of caches (the cache keeps its hva, so the registry is not touched).
//
// BM_CacheInvalidate/miss/<read side>/<caches>: one invalidation of a page
// between two cached pages, which no cache maps: the search alone, the common
// case of an event that touches no cache.
//
// BM_CacheInvalidate/hit/lockfree_active_reader/<caches>: a lock-free hit
// while an ActiveReader runs: the waiter cannot skip the membarrier.
void BM_CacheInvalidate(benchmark::State& state, bool hit, vm::CacheReadSide side, bool active_reader) {
  CachesFixture& f = caches_fixture(static_cast<size_t>(state.range(0)), side);
  vm::Vm& v = *f.env->vm;
  std::optional<ActiveReader> reader;
  if (active_reader) reader.emplace(v);
  const CounterSnapshot before = CounterSnapshot::of(v.counters());
  size_t i = 0;
  for (auto _ : state) {
    const size_t n = i++ & kStreamMask;
    const Hva hva = f.cache_hva(f.targets[n]) + (hit ? 0 : kPageSize);
    v.invalidate_range_start(hva, hva + kPageSize);
    v.invalidate_range_end(hva, hva + kPageSize);
    if (!hit) continue;
    if (auto st = f.target_caches[n]->refresh(sizeof(uint64_t)); !st) {
      state.SkipWithError(st.error().to_string().c_str());
      break;
    }
  }
  const CounterSnapshot after = CounterSnapshot::of(v.counters());
  per_iteration(state, Counter::cache_invalidations, before, after);
  per_iteration(state, Counter::cache_refreshes, before, after);
  per_iteration(state, Counter::cache_reader_waits, before, after);
  per_iteration(state, Counter::cache_reader_barriers, before, after);
}

const bool kInvalidateRegistered = [] {
  for (bool hit : {true, false}) {
    for (vm::CacheReadSide side : {vm::CacheReadSide::rwlock, vm::CacheReadSide::lockfree}) {
      const std::string name =
          std::string("BM_CacheInvalidate/") + (hit ? "hit/" : "miss/") + vm::cache_read_side_name(side);
      benchmark::RegisterBenchmark(name.c_str(), BM_CacheInvalidate, hit, side, false)
          ->Arg(1000)
          ->Arg(10000)
          ->Arg(100000)
          ->Unit(benchmark::kNanosecond);
    }
  }
  // The price of lock-free reads: a hit while another thread is an active
  // reader must interrupt its CPU (one membarrier).
  benchmark::RegisterBenchmark("BM_CacheInvalidate/hit/lockfree_active_reader", BM_CacheInvalidate, true,
                               vm::CacheReadSide::lockfree, true)
      ->Arg(1000)
      ->Arg(100000)
      ->Unit(benchmark::kNanosecond);
  return true;
}();

// --- refresh under a stream of invalidations ------------------------------------------

// A thread that invalidates page after page of one range of the VM (MMU-
// notifier start + end, as fast as it can) until destroyed, never the page
// at `spared`.
class Invalidator {
 public:
  Invalidator(vm::Vm& vm, Hva first, size_t pages, Hva spared) : thread_([=, &vm, this] {
      for (size_t i = 0; !stop_.load(std::memory_order_relaxed); i++) {
        const Hva hva = first + (i % pages) * kPageSize;
        if (hva == spared) continue;
        vm.invalidate_range_start(hva, hva + kPageSize);
        vm.invalidate_range_end(hva, hva + kPageSize);
        count_.fetch_add(1, std::memory_order_relaxed);
      }
    }) {}
  ~Invalidator() {
    stop_.store(true);
    thread_.join();
  }
  uint64_t count() const { return count_.load(std::memory_order_relaxed); }

 private:
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> count_{0};
  std::thread thread_;
};

// BM_PfnCacheRefresh/<quiet|invalidations>: the cache's page is invalidated,
// then the cache refreshed, on the benchmark thread; with `invalidations`,
// another thread invalidates the VM's other pages non-stop meanwhile (the
// case where a refresh that retries on any invalidation of the VM never
// finishes). Reports retries, waits and time waited per refresh.
void BM_PfnCacheRefresh(benchmark::State& state, bool invalidations) {
  constexpr size_t kPages = 64;
  auto e = bench_env(FrameKind::managed, kPages);
  if (!e) {
    state.SkipWithError(e.error().to_string().c_str());
    return;
  }
  std::unique_ptr<test_support::VmEnv> env = std::move(*e);
  vm::Vm& v = *env->vm;
  for (size_t page = 0; page < kPages; page++) NC_CHECK(env->mm->fault_in(env->base + page * kPageSize, true));
  vm::PfnCache cache(v);
  NC_CHECK(cache.activate(0, sizeof(uint64_t)));
  std::optional<Invalidator> other;
  if (invalidations) other.emplace(v, env->base, kPages, env->base);
  const uint64_t others_before = other ? other->count() : 0;
  const CounterSnapshot before = CounterSnapshot::of(v.counters());
  for (auto _ : state) {
    v.invalidate_range_start(env->base, env->base + kPageSize);
    v.invalidate_range_end(env->base, env->base + kPageSize);
    if (auto st = cache.refresh(sizeof(uint64_t)); !st) {
      state.SkipWithError(st.error().to_string().c_str());
      break;
    }
  }
  const CounterSnapshot after = CounterSnapshot::of(v.counters());
  if (other) per_iteration(state, "other_invalidations", other->count() - others_before);
  other.reset();
  per_iteration(state, Counter::cache_refreshes, before, after);
  per_iteration(state, Counter::cache_refresh_retries, before, after);
  per_iteration(state, Counter::cache_refresh_waits, before, after);
  per_iteration(state, Counter::cache_refresh_wait_ns, before, after);
}
BENCHMARK_CAPTURE(BM_PfnCacheRefresh, quiet, false)->Unit(benchmark::kNanosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_PfnCacheRefresh, invalidations, true)->Unit(benchmark::kNanosecond)->UseRealTime();

}  // namespace
}  // namespace nestcache::bench
