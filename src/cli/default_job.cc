// What `nestcache` runs with no command (DESIGN.md §8): the seed's table.
//
// Kept to one small function so the main job is easy to change: it runs
// the bench tests registered with in_default_job (issue 8: map, unmap and
// unmap-chunked at a size that finishes in about a minute), and while none
// is registered it runs every selftest instead, so a fresh build still
// exercises the whole stack.
#include "cli/commands.h"

namespace nestcache::cli {

int run_default_job(bool json) {
  std::vector<const workloads::BenchInfo*> tests;
  for (const workloads::BenchInfo& b : workloads::benches())
    if (b.in_default_job) tests.push_back(&b);
  if (!tests.empty()) {
    workloads::BenchOptions opts;  // the bench defaults; size the main job here
    opts.json = json;
    return run_bench(tests, opts);
  }
  if (!json)
    fmt::print("The main job (the seed's benchmark table) is not registered in this build yet;\n"
               "running every selftest instead. `nestcache --help` lists the commands.\n\n");
  std::vector<const workloads::SelftestInfo*> all;
  for (const workloads::SelftestInfo& t : workloads::selftests()) all.push_back(&t);
  workloads::RunOptions opts;
  opts.json = json;
  return run_selftests(all, opts);
}

}  // namespace nestcache::cli
