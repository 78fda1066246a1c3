// Counting what a run left behind (see teardown.h).
#include "workloads/teardown.h"

#include <dirent.h>

#include <string_view>

#include <fmt/format.h>

#include "host/fault_injection.h"
#include "vmx/vmx_nested_contexts.h"

namespace nestcache::workloads {

namespace {

// Entries of a /proc directory, without "." and ".."; -1 if it cannot be read.
int64_t count_entries(const char* path) {
  DIR* d = opendir(path);
  if (!d) return -1;
  int64_t n = 0;
  while (const dirent* e = readdir(d)) {
    std::string_view name = e->d_name;
    if (name != "." && name != "..") n++;
  }
  closedir(d);
  return n;
}

}  // namespace

ProcessResources ProcessResources::now() {
  ProcessResources r;
  r.threads = host::running_threads();
  int64_t fds = count_entries("/proc/self/fd");
  // Listing /proc/self/fd holds one descriptor open: the listing's own.
  r.fds = fds < 0 ? -1 : fds - 1;
  r.contexts = vmx::VmxNestedContext::live_count();
  return r;
}

void Teardown::add(const Leaks& l) {
  remap_windows_open += l.open_windows;
  pins += l.held_pins;
  active_caches += l.active_caches;
}

void Teardown::add(const Teardown& vms) {
  remap_windows_open += vms.remap_windows_open;
  pins += vms.pins;
  active_caches += vms.active_caches;
}

void Teardown::take_process(const ProcessResources& before) {
  ProcessResources after = ProcessResources::now();
  contexts = static_cast<int64_t>(after.contexts) - static_cast<int64_t>(before.contexts);
  threads = after.threads - before.threads;
  fds_leaked = after.fds - before.fds;
}

bool Teardown::none() const {
  return !remap_windows_open && !pins && !active_caches && !contexts && !threads && !fds_leaked;
}

std::string Teardown::to_string() const {
  return fmt::format("{} remap windows open, {} pins, {} active caches, {} contexts, {} threads, {} fds leaked",
                     remap_windows_open, pins, active_caches, contexts, threads, fds_leaked);
}

void to_json(nlohmann::json& j, const Teardown& t) {
  j = {{"remap_windows_open", t.remap_windows_open}, {"pins", t.pins},       {"active_caches", t.active_caches},
       {"contexts", t.contexts},                     {"threads", t.threads}, {"fds_leaked", t.fds_leaked}};
}

nlohmann::json process_teardown_json(const Teardown& t) {
  return {{"contexts", t.contexts}, {"threads", t.threads}, {"fds_leaked", t.fds_leaked}};
}

}  // namespace nestcache::workloads
