// main() of nestcache_microbench: starts a busy second thread, runs the
// micro-benchmarks of bench/micro_bench.cc with the usual Google Benchmark
// flags (--benchmark_filter, --benchmark_format=json, --benchmark_out, ...),
// and prints, from the runs it just reported, the ratios
// BM_HostMapAccess/unmanaged : BM_PfnCacheAccess/lockfree/unmanaged and
// BM_PfnCacheAccess/<read side>/unmanaged : BM_PlainRead.
//
// Own flag: --busy_thread=0 runs without the second thread (to see what the
// TLB shootdowns add); the default is on.
#include <benchmark/benchmark.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

constexpr const char* kHostMapUnmanaged = "BM_HostMapAccess/unmanaged";
constexpr const char* kPfnCacheUnmanaged = "BM_PfnCacheAccess/lockfree/unmanaged";
constexpr const char* kPfnCacheRwlockUnmanaged = "BM_PfnCacheAccess/rwlock/unmanaged";
constexpr const char* kPlainRead = "BM_PlainRead";

// A thread of this process that keeps running and touching memory until
// stopped.
//
// Why it must exist: an unmanaged HostMap opens a remap window with mmap and
// closes it with munmap, and munmap may return only when no CPU can still use
// a TLB entry for the page. The kernel flushes the TLBs of the CPUs that are
// running this address space right now; a CPU that only ran it before, or is
// idle, is skipped or flushed lazily at its next switch. A single-threaded
// benchmark therefore pays only a local flush. A VMM is not single-threaded:
// its vCPU threads run on other CPUs all the time, so each of its munmaps
// sends a TLB-shootdown IPI and waits for the acknowledgement. Keeping one
// thread of this same process busy on the other CPU puts that IPI into the
// measurement. It writes to a page-strided buffer so that its TLB really
// holds entries of this address space, as a vCPU's would.
class BusyThread {
 public:
  void start() {
    thread_ = std::thread([this] { spin(); });
  }
  void stop() {
    stop_.store(true, std::memory_order_relaxed);
    if (thread_.joinable()) thread_.join();
  }
  ~BusyThread() { stop(); }

 private:
  void spin() {
    constexpr size_t kPages = 64;
    constexpr size_t kWordsPerPage = 4096 / sizeof(uint64_t);
    std::vector<std::atomic<uint64_t>> buf(kPages * kWordsPerPage);
    while (!stop_.load(std::memory_order_relaxed)) {
      for (size_t i = 0; i < buf.size(); i += kWordsPerPage)
        buf[i].store(buf[i].load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    }
  }

  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// Forwards everything to the reporter --benchmark_format chose, and keeps the
// real and CPU time per iteration of every successful run, by benchmark name
// without the "/real_time" suffix: the "mean" aggregate when repetitions produced one
// (with --benchmark_report_aggregates_only it is all there is), otherwise the
// average of the runs.
class CollectingReporter : public benchmark::BenchmarkReporter {
 public:
  explicit CollectingReporter(benchmark::BenchmarkReporter* inner) : inner_(inner) {}

  bool ReportContext(const Context& context) override { return inner_->ReportContext(context); }
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      if (r.error_occurred || r.iterations == 0) continue;
      std::string name = r.run_name.function_name;
      if (!r.run_name.args.empty()) name += "/" + r.run_name.args;
      const double to_ns = 1e9 / benchmark::GetTimeUnitMultiplier(r.time_unit);
      const Ns ns{r.GetAdjustedRealTime() * to_ns, r.GetAdjustedCPUTime() * to_ns};
      Times& t = times_[name];
      if (r.run_type == Run::RT_Iteration) {
        t.run_sum.real += ns.real;
        t.run_sum.cpu += ns.cpu;
        t.runs++;
      } else if (r.aggregate_name == "mean") {
        t.mean = ns;
      }
    }
    inner_->ReportRuns(runs);
  }
  void Finalize() override { inner_->Finalize(); }

  struct Ns {
    double real = 0;
    double cpu = 0;
  };
  // Nanoseconds per iteration of `name`, if it ran.
  std::optional<Ns> ns(const std::string& name) const {
    auto it = times_.find(name);
    if (it == times_.end()) return std::nullopt;
    const Times& t = it->second;
    if (t.mean) return t.mean;
    if (t.runs == 0) return std::nullopt;
    return Ns{t.run_sum.real / t.runs, t.run_sum.cpu / t.runs};
  }
  bool any() const { return !times_.empty(); }
  bool console() const { return dynamic_cast<benchmark::ConsoleReporter*>(inner_) != nullptr; }

 private:
  struct Times {
    std::optional<Ns> mean;
    Ns run_sum;
    int runs = 0;
  };
  benchmark::BenchmarkReporter* inner_;
  std::map<std::string, Times> times_;
};

void print_help() {
  benchmark::PrintDefaultHelp();
  std::fprintf(stdout,
               "nestcache_microbench also accepts:\n"
               "          [--busy_thread={1|0}]  keep a second thread of this process busy (default 1)\n");
}

// Removes --busy_thread=... from argv (Google Benchmark rejects flags it does
// not know) and returns its value; exits on a malformed value.
bool take_busy_thread_flag(int* argc, char** argv) {
  bool busy = true;
  int out = 1;
  for (int i = 1; i < *argc; i++) {
    std::string_view a = argv[i];
    constexpr std::string_view kFlag = "--busy_thread=";
    if (a.substr(0, kFlag.size()) != kFlag) {
      argv[out++] = argv[i];
      continue;
    }
    std::string_view v = a.substr(kFlag.size());
    if (v == "1" || v == "true") {
      busy = true;
    } else if (v == "0" || v == "false") {
      busy = false;
    } else {
      std::fprintf(stderr, "nestcache_microbench: --busy_thread takes 1 or 0, not '%.*s'\n",
                   static_cast<int>(v.size()), v.data());
      std::exit(2);
    }
  }
  *argc = out;
  argv[out] = nullptr;
  return busy;
}

}  // namespace

int main(int argc, char** argv) {
  const bool busy = take_busy_thread_flag(&argc, argv);
  benchmark::Initialize(&argc, argv, print_help);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("busy_thread", busy ? "on" : "off");

  BusyThread spinner;
  if (busy) spinner.start();
  // The library keeps ownership of its default display reporter.
  CollectingReporter reporter(benchmark::CreateDefaultDisplayReporter());
  benchmark::RunSpecifiedBenchmarks(&reporter);
  spinner.stop();

  // On stdout next to the console table; on stderr when stdout carries JSON
  // or CSV, so that it stays machine-readable.
  FILE* out = reporter.console() ? stdout : stderr;
  std::optional<CollectingReporter::Ns> map = reporter.ns(kHostMapUnmanaged);
  std::optional<CollectingReporter::Ns> cache = reporter.ns(kPfnCacheUnmanaged);
  if (map && cache && cache->real > 0 && cache->cpu > 0) {
    std::fprintf(out, "\nunmanaged HostMap / PfnCache access: %.1fx (%s %.1f ns, %s %.1f ns; real time, busy thread %s)\n",
                 map->real / cache->real, kHostMapUnmanaged, map->real, kPfnCacheUnmanaged, cache->real,
                 busy ? "on" : "off");
    std::fprintf(out, "  same run in CPU time: %.1fx (%.1f ns / %.1f ns)\n", map->cpu / cache->cpu, map->cpu,
                 cache->cpu);
    // Real time well above CPU time means the thread waited for a CPU (other
    // load on the machine): the real-time ratio is then not the cost ratio.
    if (map->real > 1.2 * map->cpu || cache->real > 1.2 * cache->cpu)
      std::fprintf(out, "  warning: real time exceeds CPU time by more than 20%%: the benchmark thread waited "
                        "for a CPU; prefer the CPU-time ratio or rerun on a quieter machine\n");
  } else if (reporter.any()) {
    std::fprintf(out, "\nunmanaged HostMap / PfnCache ratio: not available (%s and %s must both run)\n",
                 kHostMapUnmanaged, kPfnCacheUnmanaged);
  }
  // The cached access against the floor, for both read sides.
  if (std::optional<CollectingReporter::Ns> plain = reporter.ns(kPlainRead); plain && plain->real > 0 && plain->cpu > 0) {
    for (const char* name : {kPfnCacheRwlockUnmanaged, kPfnCacheUnmanaged}) {
      if (std::optional<CollectingReporter::Ns> c = reporter.ns(name))
        std::fprintf(out, "%s / %s: %.1fx real time (%.2f ns / %.2f ns), %.1fx CPU time\n", name, kPlainRead,
                     c->real / plain->real, c->real, plain->real, c->cpu / plain->cpu);
    }
  }
  std::fflush(out);
  benchmark::Shutdown();
  return 0;
}
