// The `memslots` selftest (see memslots_selftest.h for what it checks).
#include "workloads/memslots_selftest.h"

#include <algorithm>
#include <chrono>
#include <memory>

#include "base/rcu.h"
#include "host/host_mm.h"
#include "vm/host_map.h"
#include "vm/pfn_cache.h"
#include "vm/vm.h"

namespace nestcache::workloads {

namespace {

constexpr size_t kSpareFrames = 64;       // new frames for migrations and refaults
constexpr size_t kCachedPages = 4;        // pfn caches in stage 2
constexpr size_t kMaxListedFailures = 5;  // per stage; the rest are counted
constexpr uint64_t kSignature = 0x6e65737463616368;  // "nestcach"
constexpr uint64_t kRewritten = 0x5eed;              // written after a discard
constexpr uint64_t kProgressStep = 4096;

// Page i of the region backs slot i, one page at gfn 2i; odd gfns are holes.
constexpr Gfn slot_gfn(uint32_t slot) { return Gfn{2} * slot; }
constexpr uint64_t signature(Gfn gfn) { return kSignature ^ gfn; }

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Records at most kMaxListedFailures messages, then only counts.
class FailureList {
 public:
  explicit FailureList(SelftestResult& r) : r_(r) {}
  ~FailureList() {
    if (n_ > kMaxListedFailures) r_.fail(fmt::format("... and {} more like these", n_ - kMaxListedFailures));
  }
  template <class... Args>
  bool check(bool cond, fmt::format_string<Args...> f, Args&&... args) {
    if (cond) return true;
    if (n_++ < kMaxListedFailures) r_.fail(fmt::format(f, std::forward<Args>(args)...));
    return false;
  }

 private:
  SelftestResult& r_;
  size_t n_ = 0;
};

struct Env {
  MemoryKind kind = MemoryKind::unmanaged;
  uint32_t slots = 0;
  // Destroyed bottom up: the Vm unsubscribes before HostMm goes, HostMm
  // unmaps its regions before PhysMem goes.
  std::unique_ptr<host::PhysMem> phys;
  std::unique_ptr<host::HostMm> mm;
  std::unique_ptr<vm::Vm> vm;
  Hva base = 0;

  Hva hva_of(uint32_t slot) const { return base + size_t{slot} * kPageSize; }
  uint64_t stale() const { return phys->counters().get(Counter::stale_accesses); }
};

// Stage 1a: PhysMem, HostMm, one region of `slots` pages, the memslots.
Result<Env> build(MemoryKind kind, uint32_t slots, nlohmann::json& details) {
  Env env;
  env.kind = kind;
  env.slots = slots;
  size_t frames = size_t{slots} + kSpareFrames;
  env.phys = NC_TRY(host::PhysMem::create({kind == MemoryKind::managed ? frames : kSpareFrames,
                                           kind == MemoryKind::unmanaged ? frames : kSpareFrames}));
  env.mm = std::make_unique<host::HostMm>(*env.phys);
  env.vm = std::make_unique<vm::Vm>(*env.mm, 1);
  env.base = NC_TRY(env.mm->create_region(size_t{slots} * kPageSize, kind));
  std::vector<vm::MemoryRegion> regions;
  regions.reserve(slots);
  for (uint32_t i = 0; i < slots; i++) regions.push_back({i, 0, gfn_to_gpa(slot_gfn(i)), kPageSize, env.hva_of(i)});
  auto start = std::chrono::steady_clock::now();
  NC_TRY(env.vm->set_memory_regions(regions));
  details["set_memory_regions_seconds"] = seconds_since(start);
  return env;
}

// Stage 1b: every page written through the VMM and read back through its
// memslot; holes and the gfn past the last slot resolve to nothing.
void fill_and_verify(Env& env, const RunOptions& o, SelftestResult& r) {
  vm::Vm& vm = *env.vm;
  FailureList bad(r);
  auto start = std::chrono::steady_clock::now();
  for (uint32_t i = 0; i < env.slots; i++) {
    if (i % kProgressStep == 0) o.report_progress(i, env.slots, "memslots: writing pages");
    uint64_t v = signature(slot_gfn(i));
    auto st = vm.write_guest(gfn_to_gpa(slot_gfn(i)), &v, sizeof v);
    bad.check(st.has_value(), "write_guest to slot {} (gfn {:#x}) failed: {}", i, slot_gfn(i),
              st ? "" : st.error().to_string());
  }
  {
    rcu::ReadLock rcu;
    size_t n = vm.memslots().active()->size();
    r.check(n == env.slots, "the active memslot set holds {} slots, expected {}", n, env.slots);
  }
  vm::LookupHint hint;
  for (uint32_t i = 0; i < env.slots; i++) {
    if (i % kProgressStep == 0) o.report_progress(i, env.slots, "memslots: resolving gfns");
    Gfn gfn = slot_gfn(i);
    auto hva = vm.gfn_to_hva(gfn, hint);
    if (!bad.check(hva.has_value(), "gfn {:#x} (slot {}) does not resolve: {}", gfn, i,
                   hva ? "" : hva.error().to_string()))
      continue;
    bad.check(*hva == env.hva_of(i), "gfn {:#x} resolves to hva {:#x}, expected {:#x}", gfn, *hva, env.hva_of(i));
    uint64_t v = 0;
    auto st = vm.read_guest(gfn_to_gpa(gfn), &v, sizeof v);
    bad.check(st && v == signature(gfn), "gfn {:#x} reads {:#x}, expected {:#x}", gfn, v, signature(gfn));
    auto hole = vm.gfn_to_hva(gfn + 1, hint);
    bad.check(!hole && hole.error().code == EFAULT, "the hole at gfn {:#x} resolves (expected EFAULT)", gfn + 1);
  }
  auto past = vm.gfn_to_hva(slot_gfn(env.slots));
  r.check(!past && past.error().code == EFAULT, "gfn {:#x}, past the last slot, resolves (expected EFAULT)",
          slot_gfn(env.slots));
  r.details["gfns_resolved"] = env.slots;
  r.details["holes_checked"] = env.slots + 1;
  r.details["fill_and_verify_seconds"] = seconds_since(start);
}

// The pfn a checked cache maps (kInvalidPfn if the check fails).
Pfn cached_pfn(vm::PfnCache& c) { return c.read(sizeof(uint64_t)).pfn(); }

bool cache_checks(vm::PfnCache& c) { return c.check(sizeof(uint64_t)); }

Result<uint64_t> read_through(vm::PfnCache& c, Gpa gpa) {
  vm::CachePtr p = NC_TRY(c.lock(gpa, sizeof(uint64_t)));
  return p.read<uint64_t>(0);
}

// Stage 2: pfn caches across migrate and discard: the first cached page is
// migrated (or, with `first_migrates` false, discarded), the next one gets
// the other change, and so on.
void caches_across_host_changes(Env& env, SelftestResult& r, bool first_migrates) {
  vm::Vm& vm = *env.vm;
  std::vector<uint32_t> slots;
  for (uint32_t s : {0u, env.slots - 1, env.slots / 2, env.slots / 4})
    if (slots.size() < kCachedPages && std::find(slots.begin(), slots.end(), s) == slots.end()) slots.push_back(s);

  struct Cached {
    uint32_t slot;
    Gpa gpa;
    bool migrate;  // else discard
    Pfn old_pfn = kInvalidPfn;
    std::unique_ptr<vm::PfnCache> cache;
  };
  std::vector<Cached> cached;
  for (size_t j = 0; j < slots.size(); j++) {
    Cached c{slots[j], gfn_to_gpa(slot_gfn(slots[j])), (j % 2 == 0) == first_migrates, kInvalidPfn,
             std::make_unique<vm::PfnCache>(vm)};
    auto st = c.cache->activate(c.gpa, sizeof(uint64_t));
    if (!r.check(st.has_value(), "activating a pfn cache at gpa {:#x} failed: {}", c.gpa,
                 st ? "" : st.error().to_string()))
      return;
    auto v = read_through(*c.cache, c.gpa);
    r.check(v && *v == signature(slot_gfn(c.slot)), "the cache at gpa {:#x} reads {:#x}, expected {:#x}", c.gpa,
            v.value_or(0), signature(slot_gfn(c.slot)));
    c.old_pfn = cached_pfn(*c.cache);
    cached.push_back(std::move(c));
  }

  uint64_t stale_before = env.stale();
  uint64_t invalidations_before = vm.counters().get(Counter::cache_invalidations);
  for (Cached& c : cached) {
    Hva hva = env.hva_of(c.slot);
    auto st = c.migrate ? env.mm->migrate(hva) : env.mm->discard(hva, kPageSize);
    r.check(st.has_value(), "{} of the page at gpa {:#x} failed: {}", c.migrate ? "migration" : "discard", c.gpa,
            st ? "" : st.error().to_string());
    r.check(c.cache->invalid(), "the cache at gpa {:#x} is still valid after its page was {}", c.gpa,
            c.migrate ? "migrated" : "discarded");
  }
  uint64_t invalidations = vm.counters().get(Counter::cache_invalidations) - invalidations_before;
  r.check(invalidations == cached.size(), "cache_invalidations = {}, expected {} (one per changed page)",
          invalidations, cached.size());

  nlohmann::json& report = r.details["caches"];
  if (!report.is_array()) report = nlohmann::json::array();
  for (Cached& c : cached) {
    auto st = c.cache->refresh(sizeof(uint64_t));
    if (!r.check(st.has_value(), "refreshing the cache at gpa {:#x} failed: {}", c.gpa,
                 st ? "" : st.error().to_string()))
      continue;
    r.check(cache_checks(*c.cache), "the cache at gpa {:#x} fails its check right after a refresh", c.gpa);
    Pfn now = cached_pfn(*c.cache);
    auto backing = env.mm->lookup(env.hva_of(c.slot));
    r.check(backing && backing->pfn == now, "the refreshed cache at gpa {:#x} maps pfn {}, not the page's frame",
            c.gpa, now);
    auto v = read_through(*c.cache, c.gpa);
    if (c.migrate) {
      r.check(now != c.old_pfn, "the cache at gpa {:#x} still maps pfn {} after the migration", c.gpa, now);
      r.check(v && *v == signature(slot_gfn(c.slot)), "data lost in migration at gpa {:#x}: reads {:#x}", c.gpa,
              v.value_or(0));
    } else {
      r.check(v && *v == 0, "the discarded page at gpa {:#x} reads {:#x}, expected a zero page", c.gpa,
              v.value_or(0));
      bool w = false;
      if (auto p = c.cache->lock(c.gpa, sizeof(uint64_t))) {  // ends before the VMM reads the page back
        p->write<uint64_t>(0, kRewritten);
        w = true;
      }
      uint64_t back = 0;
      auto rd = vm.read_guest(c.gpa, &back, sizeof back);
      r.check(w && rd && back == kRewritten, "a write through the refreshed cache at gpa {:#x} is not visible to the VMM",
              c.gpa);
    }
    report.push_back({{"gpa", c.gpa}, {"change", c.migrate ? "migrate" : "discard"}, {"old_pfn", c.old_pfn},
                      {"new_pfn", now}});
  }
  uint64_t stale = env.stale() - stale_before;
  r.check(stale == 0, "stale_accesses = {} through pfn caches, expected 0", stale);
  for (Cached& c : cached) c.cache->deactivate();
}

// Stage 3: a cache across a memslot move (the generation path, no notifier).
void cache_across_memslot_move(Env& env, SelftestResult& r) {
  vm::Vm& vm = *env.vm;
  uint32_t slot = env.slots - 1;
  Gpa old_gpa = gfn_to_gpa(slot_gfn(slot));
  Gpa new_gpa = gfn_to_gpa(slot_gfn(env.slots) + 2);  // past every slot and hole
  uint64_t expected = 0;
  if (!r.check(vm.read_guest(old_gpa, &expected, sizeof expected).has_value(), "cannot read gpa {:#x}", old_gpa))
    return;
  vm::PfnCache cache(vm);
  auto st = cache.activate(old_gpa, sizeof(uint64_t));
  if (!r.check(st.has_value(), "activating a cache at gpa {:#x} failed", old_gpa)) return;
  auto moved = vm.set_memory_region({slot, 0, new_gpa, kPageSize, env.hva_of(slot)});
  if (!r.check(moved.has_value(), "moving slot {} to gpa {:#x} failed: {}", slot, new_gpa,
               moved ? "" : moved.error().to_string())) {
    cache.deactivate();
    return;
  }
  r.check(!cache_checks(cache), "the cache at gpa {:#x} passes its check after its memslot moved", old_gpa);
  auto refreshed = cache.refresh(sizeof(uint64_t));
  r.check(!refreshed && refreshed.error().code == EFAULT,
          "refreshing at the moved-away gpa {:#x} did not report it unmapped (EFAULT)", old_gpa);
  auto v = read_through(cache, new_gpa);
  r.check(v && *v == expected, "the cache at the slot's new gpa {:#x} reads {:#x}, expected {:#x}", new_gpa,
          v.value_or(0), expected);
  cache.deactivate();
  auto back = vm.set_memory_region({slot, 0, old_gpa, kPageSize, env.hva_of(slot)});
  r.check(back.has_value(), "moving slot {} back failed", slot);
  r.details["memslot_move"] = {{"slot", slot}, {"from_gpa", old_gpa}, {"to_gpa", new_gpa}};
}

// Stage 4: a HostMap kept across a migration of its page.
void host_map_across_migration(Env& env, SelftestResult& r) {
  vm::Vm& vm = *env.vm;
  uint32_t slot = env.slots / 3;
  Gfn gfn = slot_gfn(slot);
  Gpa gpa = gfn_to_gpa(gfn);
  uint64_t before = 0;
  if (!r.check(vm.read_guest(gpa, &before, sizeof before).has_value(), "cannot read gpa {:#x}", gpa)) return;
  uint64_t stale_before = env.stale();
  uint64_t ebusy_before = env.mm->counters().get(Counter::migrate_ebusy);
  auto m = vm::HostMap::map(vm, gfn);
  if (!r.check(m.has_value(), "HostMap::map(gfn {:#x}) failed: {}", gfn, m ? "" : m.error().to_string())) return;
  r.check(m->read<uint64_t>(0) == before, "the HostMap of gfn {:#x} does not show the page's data", gfn);
  auto st = env.mm->migrate(env.hva_of(slot));
  nlohmann::json report = {{"gfn", gfn}};
  if (env.kind == MemoryKind::unmanaged) {
    // Unmanaged frames cannot be pinned and HostMap hears no notifier:
    // nothing stops the migration, and the map keeps the old frame.
    r.check(st.has_value(), "migrating an unmanaged page under a HostMap failed: {}",
            st ? "" : st.error().to_string());
    uint64_t after = before + 1;
    r.check(vm.write_guest(gpa, &after, sizeof after).has_value(), "cannot write gpa {:#x}", gpa);
    uint64_t seen = m->read<uint64_t>(0);
    uint64_t stale = env.stale() - stale_before;
    if (r.check(stale > 0, "a HostMap kept across a migration was read without a stale access being detected"))
      r.note(fmt::format("HostMap (the `map` strategy's primitive) kept across a migration on unmanaged memory: "
                         "{} stale access{} detected — the bug the seed fixes; the pfn caches were invalidated "
                         "and saw none",
                         stale, stale == 1 ? "" : "es"));
    report.update({{"outcome", "stale"}, {"stale_accesses", stale}, {"map_read", seen}, {"guest_value", after}});
  } else {
    // A managed map pins its frame, so the host cannot move it.
    uint64_t ebusy = env.mm->counters().get(Counter::migrate_ebusy) - ebusy_before;
    r.check(!st && st.error().code == EBUSY, "migrating a page pinned by a HostMap did not fail with EBUSY");
    r.check(ebusy == 1, "migrate_ebusy = {}, expected 1", ebusy);
    r.check(m->check(), "the HostMap went stale although its pin kept the page in place");
    r.note(
        "HostMap on managed memory pins its frame: the migration was refused with EBUSY (migrate_ebusy), so the "
        "host cannot move a page while L0 holds a map of it");
    m->unmap(false);
    auto again = env.mm->migrate(env.hva_of(slot));
    r.check(again.has_value(), "migrating the page after the unmap failed: {}",
            again ? "" : again.error().to_string());
    report.update({{"outcome", "ebusy"}, {"migrate_ebusy", ebusy}});
  }
  m->unmap(false);
  r.details["host_map"] = report;
}

// Stage 5: everything released.
void check_nothing_leaked(Env& env, SelftestResult& r) {
  r.check(env.phys->live_windows() == 0, "{} remap windows still open at the end", env.phys->live_windows());
  r.check(env.phys->live_pins() == 0, "{} frame pins still held at the end", env.phys->live_pins());
  size_t active = env.vm->caches().active_count();
  r.check(active == 0, "{} pfn caches still active at the end", active);
}

OptionSpec slots_option() {
  return {.flag = "--slots",
          .help = "memslots to fill, one page each",
          .default_value = std::to_string(kMemslotsDefaultSlots),
          .range = std::pair<int64_t, int64_t>{1, vm::kMaxUserMemslots},
          .type_name = "N"};
}

}  // namespace

SelftestResult run_memslots_selftest(const RunOptions& o) {
  SelftestResult r;
  auto slots = o.int_option("slots", kMemslotsDefaultSlots);
  if (!slots) {
    r.refuse(slots.error().message);
    return r;
  }
  if (*slots < 1 || *slots > vm::kMaxUserMemslots) {
    r.refuse(fmt::format("--slots {} is outside 1..{}", *slots, vm::kMaxUserMemslots));
    return r;
  }
  r.details["slots"] = *slots;
  r.details["strategy_applies"] = false;
  auto env = build(o.memory, static_cast<uint32_t>(*slots), r.details);
  if (!env) {
    r.fail(fmt::format("setting up {} slots on {} memory failed: {}", *slots, memory_kind_name(o.memory),
                       env.error().to_string()));
    return r;
  }
  fill_and_verify(*env, o, r);
  if (r.passed) caches_across_host_changes(*env, r, true);
  // One slot holds one cache, which the pass above migrated: discard it too.
  if (r.passed && *slots == 1) caches_across_host_changes(*env, r, false);
  if (r.passed) cache_across_memslot_move(*env, r);
  if (r.passed) host_map_across_migration(*env, r);
  check_nothing_leaked(*env, r);
  CounterSnapshot others[] = {CounterSnapshot::of(env->mm->counters()), CounterSnapshot::of(env->vm->counters())};
  r.counters = merge_run_counters(CounterSnapshot::of(env->phys->counters()), others);
  return r;
}

void register_memslots_selftest() {
  register_selftest({
      .name = "memslots",
      .summary = "fill memslots, migrate and discard pages under pfn caches and a HostMap (vm layer)",
      .description =
          "Fills --slots memslots and checks every gfn resolves to its page; activates pfn caches on a few "
          "pages, migrates and discards them and checks the caches were invalidated and refresh lands on the "
          "new frames with the data intact; moves a memslot under a cache; keeps a HostMap across a migration "
          "(unmanaged memory: the stale access must be detected; managed: the map's pin makes the migration "
          "fail with EBUSY); checks nothing leaked. Drives the vm layer directly: --strategy does not apply.",
      .options = {slots_option()},
      .run = run_memslots_selftest,
  });
}

}  // namespace nestcache::workloads
