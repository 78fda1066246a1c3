#include "host/window_cost.h"

#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <optional>
#include <system_error>
#include <utility>
#include <thread>
#include <vector>

#include "base/model_time.h"
#include "base/types.h"

namespace nestcache::host {

namespace {

constexpr size_t kFrames = 16;
constexpr int kMinSamples = 1'000;
constexpr int kMaxSamples = 200'000;
constexpr size_t kWantConcurrent = 400;
constexpr auto kMaxTime = std::chrono::seconds(2);

// Keeps the calling thread on one CPU (when `cpu` >= 0).
void pin_to(int cpu) {
  if (cpu < 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  (void)sched_setaffinity(0, sizeof(set), &set);  // best effort: the samples say where they ran
}

// Two CPUs this process may run on, or -1s when it has only one.
std::pair<int, int> two_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return {-1, -1};
  int found[2] = {-1, -1};
  for (int cpu = 0, n = 0; cpu < CPU_SETSIZE && n < 2; cpu++)
    if (CPU_ISSET(cpu, &set)) found[n++] = cpu;
  if (found[1] < 0) return {-1, -1};
  return {found[0], found[1]};
}

// A thread of this process kept on a CPU of its own: while it runs, every
// munmap of the process must flush that CPU's TLB too.
class Sibling {
 public:
  Sibling() = default;
  Sibling(const Sibling&) = delete;
  Sibling& operator=(const Sibling&) = delete;
  ~Sibling() { stop(); }

  Status start(int cpu) {
    try {
      thread_ = std::thread([this, cpu] {
        pin_to(cpu);
        spin();
      });
    } catch (const std::system_error& e) {
      return errorf(e.code().value(), "cannot start the window-calibration thread: {}", e.what());
    }
    while (progress_.load(std::memory_order_acquire) == 0) std::this_thread::yield();
    return ok();
  }
  void stop() {
    stop_.store(true, std::memory_order_relaxed);
    if (thread_.joinable()) thread_.join();
  }
  uint64_t progress() const { return progress_.load(std::memory_order_acquire); }
  int cpu() const { return cpu_.load(std::memory_order_relaxed); }

 private:
  void spin() {
    while (!stop_.load(std::memory_order_relaxed)) {
      cpu_.store(sched_getcpu(), std::memory_order_relaxed);
      progress_.fetch_add(1, std::memory_order_release);
    }
  }

  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> progress_{0};
  std::atomic<int> cpu_{-1};
};

uint64_t median(std::vector<uint64_t>& v) {
  if (v.empty()) return 0;
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

uint64_t net(uint64_t from, uint64_t to) {
  uint64_t overhead = thread_cpu_read_overhead_ns();
  return to - from > overhead ? to - from - overhead : 0;
}

struct Samples {
  std::vector<uint64_t> open_all, close_all, open_concurrent, close_concurrent;
};

// Times windows on `fd` while `sibling` runs, on the calling thread, until
// enough samples met the condition or the time is up.
Status take_samples(int fd, const Sibling& sibling, Samples& out) {
  const auto deadline = std::chrono::steady_clock::now() + kMaxTime;
  for (int i = 0; i < kMaxSamples; i++) {
    if (i >= kMinSamples &&
        (out.open_concurrent.size() >= kWantConcurrent || std::chrono::steady_clock::now() > deadline))
      break;
    const int my_cpu = sched_getcpu();
    const uint64_t p0 = sibling.progress();
    const uint64_t t0 = thread_cpu_ns();
    void* p = mmap(nullptr, kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                   static_cast<off_t>((i % kFrames) * kPageSize));
    const uint64_t t1 = thread_cpu_ns();
    if (p == MAP_FAILED) return errorf(errno, "window calibration: mmap: {}", std::strerror(errno));
    const uint64_t p1 = sibling.progress();
    const uint64_t t2 = thread_cpu_ns();
    const int unmapped = munmap(p, kPageSize);
    const uint64_t t3 = thread_cpu_ns();
    if (unmapped != 0) return errorf(errno, "window calibration: munmap: {}", std::strerror(errno));
    const uint64_t p2 = sibling.progress();
    out.open_all.push_back(net(t0, t1));
    out.close_all.push_back(net(t2, t3));
    // The sibling moved on during both calls, on another CPU than ours.
    if (p1 > p0 && p2 > p1 && sibling.cpu() != my_cpu && sched_getcpu() == my_cpu) {
      out.open_concurrent.push_back(out.open_all.back());
      out.close_concurrent.push_back(out.close_all.back());
    }
  }
  return ok();
}

}  // namespace

Result<WindowCalibration> calibrate_window_cost() {
  int fd = memfd_create("nestcache-window-calibration", MFD_CLOEXEC);
  if (fd < 0) return errorf(errno, "window calibration: memfd_create: {}", std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { close(fd); }
  } closer{fd};
  if (ftruncate(fd, kFrames * kPageSize) != 0)
    return errorf(errno, "window calibration: sizing the memfd: {}", std::strerror(errno));

  // The sibling and the sampler each get a CPU of their own, so that they
  // can only be concurrent, never take turns on one CPU; the sampler is a
  // thread of its own so that the caller's affinity stays as it was.
  auto [sampler_cpu, sibling_cpu] = two_cpus();
  Sibling sibling;
  NC_TRY(sibling.start(sibling_cpu));
  (void)thread_cpu_read_overhead_ns();
  Samples samples;
  Status sampled = ok();
  try {
    std::thread sampler([&, cpu = sampler_cpu] {
      pin_to(cpu);
      sampled = take_samples(fd, sibling, samples);
    });
    sampler.join();
  } catch (const std::system_error& e) {
    return errorf(e.code().value(), "cannot start the window-calibration sampler thread: {}", e.what());
  }
  sibling.stop();
  NC_TRY(sampled);

  WindowCalibration c;
  c.samples = samples.open_all.size();
  c.concurrent = samples.open_concurrent.size();
  c.condition_met = samples.open_concurrent.size() >= kWantConcurrent / 4;
  auto& opens = c.condition_met ? samples.open_concurrent : samples.open_all;
  auto& closes = c.condition_met ? samples.close_concurrent : samples.close_all;
  c.cost = {median(opens), median(closes)};
  return c;
}

Result<WindowCalibration> calibrated_window_cost() {
  static std::mutex mu;
  static std::optional<WindowCalibration> done;
  std::lock_guard l(mu);
  if (!done) done = NC_TRY(calibrate_window_cost());
  return *done;
}

}  // namespace nestcache::host
