// Must not compile (see "Lambdas" in cpu/guest_task.h): a guest coroutine
// lambda whose captures have destructors. Awaited on its temporary closure, as
// here, GCC 12 destroys that closure — and the vector in it — twice, after the
// subtask has returned.
#include <vector>

#include "cpu/guest_task.h"

namespace nestcache::cpu {

GuestTask waits_for_flag(std::vector<Gpa> flags, uint64_t n) {
  co_await [flags, n]() -> GuestTask {
    co_await ops::write64(flags[1], 1);
    while (co_await ops::read64(flags[0]) != n) co_await ops::pause();
  }();
}

}  // namespace nestcache::cpu
