// nestcache_microbench's summary of the run (see run_summary.h).
#include "run_summary.h"

#include <string_view>

namespace nestcache::bench {

void CollectingReporter::ReportRuns(const std::vector<Run>& runs) {
  for (const Run& r : runs) {
    std::string name = r.run_name.function_name;
    if (!r.run_name.args.empty()) name += "/" + r.run_name.args;
    if (r.error_occurred) {
      if (r.run_type == Run::RT_Iteration) failed_.push_back(name);
      continue;
    }
    if (r.iterations == 0) continue;
    const double to_ns = 1e9 / benchmark::GetTimeUnitMultiplier(r.time_unit);
    Figures f{r.GetAdjustedRealTime() * to_ns, r.GetAdjustedCPUTime() * to_ns, {}};
    for (const auto& [counter, value] : r.counters) f.counters[counter] = value.value;
    Collected& c = runs_[name];
    if (r.run_type == Run::RT_Iteration) {
      c.sum.real_ns += f.real_ns;
      c.sum.cpu_ns += f.cpu_ns;
      for (const auto& [counter, value] : f.counters) c.sum.counters[counter] += value;
      c.runs++;
    } else if (r.aggregate_name == "median") {
      c.median = std::move(f);
    }
  }
  inner_->ReportRuns(runs);
}

std::optional<CollectingReporter::Figures> CollectingReporter::figures(const std::string& name) const {
  auto it = runs_.find(name);
  if (it == runs_.end()) return std::nullopt;
  const Collected& c = it->second;
  if (c.median) return c.median;
  if (c.runs == 0) return std::nullopt;
  Figures f{c.sum.real_ns / c.runs, c.sum.cpu_ns / c.runs, {}};
  for (const auto& [counter, value] : c.sum.counters) f.counters[counter] = value / c.runs;
  return f;
}

namespace {

constexpr const char* kHostMapUnmanaged = "BM_HostMapAccess/unmanaged";
constexpr const char* kPfnCacheUnmanaged = "BM_PfnCacheAccess/lockfree/unmanaged";
constexpr const char* kPfnCacheRwlockUnmanaged = "BM_PfnCacheAccess/rwlock/unmanaged";
constexpr const char* kPlainRead = "BM_PlainRead";
constexpr const char* kRefreshRaced = "BM_PfnCacheRefresh/invalidations";
constexpr const char* kShapeAsBuilt = "BM_AccessShape/as_built";
constexpr const char* kShapeKvmCheck = "BM_AccessShape/kvm_check";

// The families measured at a small and a large size, and the sizes.
struct ScaledFamily {
  const char* name;
  const char* small;
  const char* large;
  const char* unit;
};
constexpr ScaledFamily kScaled[] = {
    {"BM_MemslotLookup/random", "8", "32764", "slots"},
    {"BM_MemslotLookup/local", "8", "32764", "slots"},
    {"BM_MemslotLookup/random_uneven", "8", "32764", "slots"},
    {"BM_CacheInvalidate/miss/lockfree", "1000", "100000", "caches"},
    {"BM_CacheInvalidate/miss/rwlock", "1000", "100000", "caches"},
    {"BM_CacheInvalidate/hit/lockfree", "1000", "100000", "caches"},
    {"BM_CacheInvalidate/hit/rwlock", "1000", "100000", "caches"},
    {"BM_CacheInvalidate/hit/lockfree_active_reader", "1000", "100000", "caches"},
};

bool positive(const CollectingReporter::Figures& f) { return f.real_ns > 0 && f.cpu_ns > 0; }

double counter(const CollectingReporter::Figures& f, std::string_view name) {
  auto it = f.counters.find(std::string(name));
  return it == f.counters.end() ? 0 : it->second;
}

void print_map_vs_cache(const CollectingReporter& r, std::FILE* out, bool busy) {
  const auto map = r.figures(kHostMapUnmanaged);
  const auto cache = r.figures(kPfnCacheUnmanaged);
  if (!map || !cache || !positive(*map) || !positive(*cache)) {
    std::fprintf(out, "\nunmanaged HostMap / PfnCache ratio: not available (%s and %s must both run)\n",
                 kHostMapUnmanaged, kPfnCacheUnmanaged);
    return;
  }
  std::fprintf(out, "\nunmanaged HostMap / PfnCache access: %.1fx (%s %.1f ns, %s %.2f ns; real time, busy thread %s)\n",
               map->real_ns / cache->real_ns, kHostMapUnmanaged, map->real_ns, kPfnCacheUnmanaged, cache->real_ns,
               busy ? "on" : "off");
  std::fprintf(out, "  same run in CPU time: %.1fx (%.1f ns / %.2f ns)\n", map->cpu_ns / cache->cpu_ns, map->cpu_ns,
               cache->cpu_ns);
  // Real time well above CPU time means the thread waited for a CPU (other
  // load on the machine): the real-time ratio is then not the cost ratio.
  if (map->real_ns > 1.2 * map->cpu_ns || cache->real_ns > 1.2 * cache->cpu_ns)
    std::fprintf(out, "  warning: real time exceeds CPU time by more than 20%%: the benchmark thread waited "
                      "for a CPU; prefer the CPU-time ratio or rerun on a quieter machine\n");
}

void print_access_vs_plain(const CollectingReporter& r, std::FILE* out) {
  const auto plain = r.figures(kPlainRead);
  if (!plain || !positive(*plain)) return;
  for (const char* name : {kPfnCacheRwlockUnmanaged, kPfnCacheUnmanaged}) {
    if (const auto c = r.figures(name))
      std::fprintf(out, "%s / %s: %.1fx real time (%.2f ns / %.2f ns), %.1fx CPU time\n", name, kPlainRead,
                   c->real_ns / plain->real_ns, c->real_ns, plain->real_ns, c->cpu_ns / plain->cpu_ns);
  }
}

// The access against its own instructions (BM_AccessShape, x86-64 only): how
// much of it is the instructions' floor on this machine, and what a check
// without the reader slot, the second count load and the frame tag costs.
void print_access_shape(const CollectingReporter& r, std::FILE* out) {
  const auto plain = r.figures(kPlainRead);
  const auto shape = r.figures(kShapeAsBuilt);
  if (!plain || !shape || !positive(*plain) || !positive(*shape)) return;
  std::fprintf(out, "%s (the access's instructions, no protocol) / %s: %.1fx CPU time (%.2f ns / %.2f ns)\n",
               kShapeAsBuilt, kPlainRead, shape->cpu_ns / plain->cpu_ns, shape->cpu_ns, plain->cpu_ns);
  if (const auto cache = r.figures(kPfnCacheUnmanaged))
    std::fprintf(out, "  %s / %s: %.2fx CPU time (the access costs its instructions and no more at 1.00x)\n",
                 kPfnCacheUnmanaged, kShapeAsBuilt, cache->cpu_ns / shape->cpu_ns);
  if (const auto kvm = r.figures(kShapeKvmCheck))
    std::fprintf(out,
                 "%s (valid, gpa, generation; no reader slot, count reload or frame tag) / %s: %.1fx CPU time "
                 "(%.2f ns)\n",
                 kShapeKvmCheck, kPlainRead, kvm->cpu_ns / plain->cpu_ns, kvm->cpu_ns);
}

void print_scaled(const CollectingReporter& r, std::FILE* out) {
  bool header = false;
  for (const ScaledFamily& fam : kScaled) {
    const std::string name = fam.name;
    const auto small = r.figures(name + "/" + fam.small);
    const auto large = r.figures(name + "/" + fam.large);
    if (!small || !large || !positive(*small)) continue;
    if (!header) {
      std::fprintf(out, "\nflat in scale (CPU time per operation, large size / small size, this run):\n");
      header = true;
    }
    std::fprintf(out, "  %-46s %6s %s %9.1f ns / %6s %s %9.1f ns = %.2fx\n", fam.name, fam.large, fam.unit,
                 large->cpu_ns, fam.small, fam.unit, small->cpu_ns, large->cpu_ns / small->cpu_ns);
  }
}

void print_raced_refresh(const CollectingReporter& r, std::FILE* out) {
  const auto f = r.figures(kRefreshRaced);
  if (!f) return;
  std::fprintf(out,
               "\n%s: %.0f ns per refresh (CPU %.0f ns), %.3f retries and %.3f waits per refresh, "
               "%.1f other invalidations per refresh\n",
               kRefreshRaced, f->real_ns, f->cpu_ns, counter(*f, "cache_refresh_retries"),
               counter(*f, "cache_refresh_waits"), counter(*f, "other_invalidations"));
}

}  // namespace

void print_summary(const CollectingReporter& r, std::FILE* out, bool busy) {
  if (!r.any()) return;
  print_map_vs_cache(r, out, busy);
  print_access_vs_plain(r, out);
  print_access_shape(r, out);
  print_scaled(r, out);
  print_raced_refresh(r, out);
  for (const std::string& name : r.failed()) std::fprintf(out, "\nfailed: %s (see its error above)\n", name.c_str());
}

}  // namespace nestcache::bench
