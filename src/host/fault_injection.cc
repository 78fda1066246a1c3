#include "host/fault_injection.h"

#include <sys/mman.h>

#include <atomic>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <utility>

#include "base/check.h"

namespace nestcache::host {

namespace {

// One site's arming. `remaining` counts down to the failing operation; 0 is
// disarmed. Arming and taking race only in tests that arm while a run is
// going, where "some operation near the Nth fails" is all that is promised.
struct SiteState {
  std::atomic<bool> busy{false};     // armed or counting: take_fault looks further
  std::atomic<uint64_t> remaining{0};
  std::atomic<bool> and_later{false};
  std::atomic<bool> failing{false};  // and_later, after the Nth
  std::atomic<int> error{0};
  std::atomic<uint64_t> injected{0};
  std::atomic<uint64_t> ops{0};
};

SiteState g_sites[kFaultSites];

void reset(SiteState& s) {
  s.busy.store(false);
  s.remaining.store(0);
  s.failing.store(false);
  s.and_later.store(false);
  s.injected.store(0);
  s.ops.store(0);
}

std::atomic<int64_t> g_running_threads{0};

SiteState& state(FaultSite site) { return g_sites[static_cast<int>(site)]; }

int default_error(FaultSite site) {
  switch (site) {
    case FaultSite::mmap: return ENOMEM;
    case FaultSite::memfd: return EMFILE;
    case FaultSite::thread: return EAGAIN;
    case FaultSite::munmap: return ENOMEM;
  }
  return EINVAL;
}

Result<int> parse_errno_name(std::string_view name) {
  for (int e = 1; e < 134; e++) {
    const char* n = strerrorname_np(e);
    if (n && name == n) return e;
  }
  // strerrorname_np gives one name per number; <errno.h> has a few second
  // names for the same number, which a user may well write.
  static constexpr std::pair<std::string_view, int> kAliases[] = {
      {"EWOULDBLOCK", EWOULDBLOCK}, {"EDEADLOCK", EDEADLOCK}, {"ENOTSUP", ENOTSUP}};
  for (const auto& [alias, e] : kAliases)
    if (name == alias) return e;
  return errorf(EINVAL, "'{}' is not an errno name (ENOMEM, EAGAIN, EMFILE, ...)", name);
}

}  // namespace

const char* fault_site_name(FaultSite site) {
  switch (site) {
    case FaultSite::mmap: return "mmap";
    case FaultSite::memfd: return "memfd";
    case FaultSite::thread: return "thread";
    case FaultSite::munmap: return "munmap";
  }
  return "?";
}

Result<FaultSpec> parse_fault_spec(std::string_view text) {
  const std::string usage = "expected SITE:N[+][:ERRNO] with SITE mmap, munmap, memfd or thread (e.g. mmap:3, thread:1+:EAGAIN)";
  size_t colon = text.find(':');
  if (colon == std::string_view::npos) return errorf(EINVAL, "fault '{}': {}", text, usage);
  std::string_view site = text.substr(0, colon), rest = text.substr(colon + 1);
  FaultSpec spec;
  bool known = false;
  for (int i = 0; i < kFaultSites; i++) {
    if (site == fault_site_name(static_cast<FaultSite>(i))) {
      spec.site = static_cast<FaultSite>(i);
      known = true;
    }
  }
  if (!known) return errorf(EINVAL, "fault '{}': unknown site '{}'; {}", text, site, usage);
  spec.error = default_error(spec.site);
  std::string_view count = rest.substr(0, rest.find(':'));
  if (!count.empty() && count.back() == '+') {
    spec.and_later = true;
    count.remove_suffix(1);
  }
  auto [end, ec] = std::from_chars(count.data(), count.data() + count.size(), spec.nth);
  if (ec != std::errc() || end != count.data() + count.size() || spec.nth == 0)
    return errorf(EINVAL, "fault '{}': '{}' is not a count from 1; {}", text, count, usage);
  if (size_t c2 = rest.find(':'); c2 != std::string_view::npos) {
    auto e = parse_errno_name(rest.substr(c2 + 1));
    if (!e) return errorf(EINVAL, "fault '{}': {}", text, e.error().message);
    spec.error = *e;
  }
  // munmap gives EINVAL only for a range that is not a mapping of ours: a
  // bug, which PhysMem::close_window checks as an invariant (an abort), not a
  // resource limit the seam stands for.
  if (spec.site == FaultSite::munmap && spec.error == EINVAL)
    return errorf(EINVAL,
                  "fault '{}': munmap fails with EINVAL only for a bad address, not at a resource limit; use ENOMEM "
                  "(the default)",
                  text);
  return spec;
}

void inject_fault(const FaultSpec& spec) {
  NC_CHECK(spec.nth >= 1);
  SiteState& s = state(spec.site);
  reset(s);
  s.error.store(spec.error);
  s.and_later.store(spec.and_later);
  s.remaining.store(spec.nth);
  s.busy.store(true);
}

void count_operations(FaultSite site) {
  SiteState& s = state(site);
  reset(s);
  s.busy.store(true);
}

void clear_faults() {
  for (SiteState& s : g_sites) reset(s);
}

int take_fault(FaultSite site) {
  SiteState& s = state(site);
  if (!s.busy.load(std::memory_order_relaxed)) [[likely]]
    return 0;
  s.ops.fetch_add(1);
  if (s.failing.load()) {
    s.injected.fetch_add(1);
    return s.error.load();
  }
  uint64_t left = s.remaining.load(std::memory_order_relaxed);
  while (left != 0) {
    if (s.remaining.compare_exchange_weak(left, left - 1)) {
      if (left != 1) return 0;
      if (s.and_later.load()) s.failing.store(true);
      s.injected.fetch_add(1);
      return s.error.load();
    }
  }
  return 0;
}

void* mmap_or_fault(void* addr, size_t len, int prot, int flags, int fd, off_t offset) {
  if (int e = take_fault(FaultSite::mmap)) {
    errno = e;
    return MAP_FAILED;
  }
  return mmap(addr, len, prot, flags, fd, offset);
}

int munmap_or_fault(void* addr, size_t len) {
  if (int e = take_fault(FaultSite::munmap)) {
    errno = e;
    return -1;
  }
  return munmap(addr, len);
}

uint64_t faults_injected(FaultSite site) { return state(site).injected.load(); }

uint64_t operations(FaultSite site) { return state(site).ops.load(); }

int64_t running_threads() { return g_running_threads.load(std::memory_order_acquire); }

namespace detail {
void thread_started() { g_running_threads.fetch_add(1, std::memory_order_relaxed); }
// Release: a reader that sees the count drop also sees what the thread did.
void thread_ended() { g_running_threads.fetch_sub(1, std::memory_order_release); }
}  // namespace detail

}  // namespace nestcache::host
