// A test seam for resource exhaustion: make the Nth mmap, munmap, memfd
// set-up or thread start of the process fail with a chosen errno, as the
// kernel does when an address-space, map-count, descriptor or thread limit is
// reached.
//
// The host layer asks the seam before each such operation (take_fault);
// everything above it sees the failure as the real one would look. A site
// can also count its operations without failing any (count_operations), so
// a test learns how many operations a step makes and then fails each in
// turn. The seam is process-wide and idle unless a test (or `nestcache
// --inject-fault`) arms it, so production runs pay one relaxed atomic load
// per operation.
//
// Thread safety: all functions may be called from any thread.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>

#include "base/error.h"

namespace nestcache::host {

// Where a fault can be injected.
enum class FaultSite : uint8_t {
  mmap,    // every mmap the host layer makes: physical memory, regions, page maps, remap windows
  memfd,   // memfd_create and sizing the memfd (physical memory set-up)
  thread,  // every thread started through start_thread (vCPUs, VMM and host helpers)
  munmap,  // every munmap of a remap window (PhysMem::close_window; see phys_mem.h)
};
inline constexpr int kFaultSites = 4;

// "mmap", "memfd", "thread", "munmap".
const char* fault_site_name(FaultSite site);

// One armed fault: the `nth` operation at `site` (1-based, counted from when
// it is armed) fails with `error`; with `and_later`, every later one too.
struct FaultSpec {
  FaultSite site = FaultSite::mmap;
  uint64_t nth = 1;
  bool and_later = false;
  int error = ENOMEM;
};

// Parses "SITE:N" or "SITE:N+" ("N+" = the Nth and every later one),
// optionally followed by ":ERRNO" by name ("thread:2:EAGAIN"). The default
// errno is ENOMEM for mmap and munmap, EMFILE for memfd and EAGAIN for
// thread. EINVAL naming the part that is wrong otherwise, and for munmap
// with EINVAL (a bad address, not a resource limit: PhysMem aborts on it).
Result<FaultSpec> parse_fault_spec(std::string_view text);

// Arms `spec`, replacing what was armed (or counted) at its site, and starts
// counting the site's operations from 0. Requires spec.nth >= 1.
void inject_fault(const FaultSpec& spec);
// Counts the operations at `site` from 0 on, failing none (replaces what was
// armed there). operations() reads the count.
void count_operations(FaultSite site);
// Disarms every site, stops counting and resets the counts.
void clear_faults();
// For the host layer, before each operation at `site`: 0 to go ahead, or the
// errno the operation must fail with.
int take_fault(FaultSite site);
// How many injected faults `site` has produced since it was armed.
uint64_t faults_injected(FaultSite site);
// How many operations `site` has seen (failed or not) since it was armed or
// began counting; 0 while the site is idle.
uint64_t operations(FaultSite site);

// mmap(2), unless a fault is armed at the mmap site: then MAP_FAILED with
// errno set to the injected error.
void* mmap_or_fault(void* addr, size_t len, int prot, int flags, int fd, off_t offset);
// munmap(2), unless a fault is armed at the munmap site: then -1 with errno
// set to the injected error (the mapping stays, as after a real failure).
int munmap_or_fault(void* addr, size_t len);

// Threads started through start_thread whose function has not returned
// yet, in the whole process. Once every such thread has been joined it is
// exactly the number the project has running: threads of the runtime
// (ThreadSanitizer's background thread, glibc helpers) are not in it, as
// they are in /proc/self/task.
int64_t running_threads();

namespace detail {
// start_thread's bookkeeping for running_threads(): one count from just
// before the thread is created until its function returns (or creation
// fails).
void thread_started();
void thread_ended();
struct RunningThread {
  RunningThread() = default;
  RunningThread(const RunningThread&) = delete;
  RunningThread& operator=(const RunningThread&) = delete;
  ~RunningThread() { thread_ended(); }
};
}  // namespace detail

// Starts a thread running `fn`. Fails, instead of throwing, with the errno
// the system gave (EAGAIN when a thread or memory limit is reached) and a
// message naming `what` ("the vCPU 1 thread"); the thread site's injected
// faults land here. The thread counts in running_threads() until `fn`
// returns.
template <class Fn>
Result<std::thread> start_thread(std::string_view what, Fn&& fn) {
  if (int e = take_fault(FaultSite::thread))
    return errorf(e, "cannot start {}: {} (injected)", what, std::generic_category().message(e));
  // Counted before the thread exists, so that a count taken while it starts
  // already includes it.
  detail::thread_started();
  try {
    return std::thread([body = std::forward<Fn>(fn)]() mutable {
      detail::RunningThread counted;  // uncounted when the body returns, or throws
      body();
    });
  } catch (const std::system_error& ex) {
    detail::thread_ended();
    return errorf(ex.code().value(), "cannot start {}: {}", what, ex.code().message());
  } catch (const std::bad_alloc&) {
    detail::thread_ended();
    return errorf(ENOMEM, "cannot start {}: out of memory", what);
  }
}

}  // namespace nestcache::host
