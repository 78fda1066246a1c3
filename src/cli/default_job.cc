// What `nestcache` runs with no command (DESIGN.md §8): the seed's table.
//
// Kept to one small function so the main job is easy to change: it runs the
// bench tests registered with in_default_job (map, unmap and unmap-chunked)
// at a size that finishes in about a minute.
#include "cli/commands.h"

namespace nestcache::cli {

namespace {
constexpr double kDefaultJobScale = 0.25;   // of upstream's areas
constexpr double kDefaultJobSeconds = 0.5;  // upstream's -l, per run, in modelled time
}  // namespace

int run_default_job(bool json) {
  std::vector<const workloads::BenchInfo*> tests;
  for (const workloads::BenchInfo& b : workloads::benches())
    if (b.in_default_job) tests.push_back(&b);
  // The seed's three tests at 8192 slots on unmanaged memory, every
  // strategy; the areas and the time limit shrunk so that the nine runs
  // finish in about a minute on a 2-core machine.
  workloads::BenchOptions opts;
  opts.scale = kDefaultJobScale;
  opts.seconds = kDefaultJobSeconds;
  opts.breakdown = true;  // the parts that explain each row
  opts.json = json;
  int status = run_bench(tests, opts);
  if (!json)
    fmt::print("\n{}\n", wrap_text(
        "How to read this: times are modelled (DESIGN.md §5): every hardware exit costs the exit cost, every guest "
        "instruction a hardware-like cost, L0's own work (remap windows, pfn caches, the rest) what it measurably "
        "costs in CPU time here, and a thread that waits continues at the time of whoever it waited for — so the "
        "results do not depend on this machine's load or free cores, and the parts under each table add up to "
        "the totals. Each test ran once per strategy in one process, so the ratios compare like with like. "
        "\"per iteration\" is upstream memslot_perf's figure (all iterations averaged, the first one included); "
        "\"cold iteration\" is the first one, when every page is still populated and every discard costs a "
        "shootdown round trip; \"per round trip\" divides the time by the nested round trips, the cost the seed "
        "attacks (map pays remap windows on every one). The seed's \"before\" figures are single cold "
        "iterations and its \"after\" figures warm averages, so its 17x / 2353x / 2014x mix two views; compare "
        "them with the line \"measured the seed's way\", and read the per-round-trip ratio for the real gain. "
        "Areas here are scaled down (--scale); `nestcache bench --scale 1` runs upstream's sizes."));
  return status;
}

}  // namespace nestcache::cli
