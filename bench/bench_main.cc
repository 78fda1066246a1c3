// main() of nestcache_microbench: starts a busy second thread, runs the
// micro-benchmarks of bench/micro_bench.cc with the usual Google Benchmark
// flags (--benchmark_filter, --benchmark_format=json, --benchmark_out, ...),
// and prints the ratio BM_HostMapAccess/unmanaged : BM_PfnCacheAccess/unmanaged
// taken from the runs it just reported.
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
constexpr const char* kPfnCacheUnmanaged = "BM_PfnCacheAccess/unmanaged";

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
// real time per iteration of every successful run, by benchmark name without
// the "/real_time" suffix, averaged over repetitions.
class CollectingReporter : public benchmark::BenchmarkReporter {
 public:
  explicit CollectingReporter(benchmark::BenchmarkReporter* inner) : inner_(inner) {}

  bool ReportContext(const Context& context) override { return inner_->ReportContext(context); }
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      if (r.run_type != Run::RT_Iteration || r.error_occurred || r.iterations == 0) continue;
      std::string name = r.run_name.function_name;
      if (!r.run_name.args.empty()) name += "/" + r.run_name.args;
      Mean& m = real_ns_[name];
      m.sum += r.real_accumulated_time / static_cast<double>(r.iterations) * 1e9;
      m.n++;
    }
    inner_->ReportRuns(runs);
  }
  void Finalize() override { inner_->Finalize(); }

  // Mean real nanoseconds per iteration of `name`, if it ran.
  std::optional<double> real_ns(const std::string& name) const {
    auto it = real_ns_.find(name);
    if (it == real_ns_.end() || it->second.n == 0) return std::nullopt;
    return it->second.sum / it->second.n;
  }
  bool any() const { return !real_ns_.empty(); }
  bool console() const { return dynamic_cast<benchmark::ConsoleReporter*>(inner_) != nullptr; }

 private:
  struct Mean {
    double sum = 0;
    int n = 0;
  };
  benchmark::BenchmarkReporter* inner_;
  std::map<std::string, Mean> real_ns_;
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
  std::optional<double> map_ns = reporter.real_ns(kHostMapUnmanaged);
  std::optional<double> cache_ns = reporter.real_ns(kPfnCacheUnmanaged);
  if (map_ns && cache_ns && *cache_ns > 0) {
    std::fprintf(out, "\nunmanaged HostMap / PfnCache access: %.1fx (%s %.1f ns, %s %.1f ns; real time, busy thread %s)\n",
                 *map_ns / *cache_ns, kHostMapUnmanaged, *map_ns, kPfnCacheUnmanaged, *cache_ns, busy ? "on" : "off");
  } else if (reporter.any()) {
    std::fprintf(out, "\nunmanaged HostMap / PfnCache ratio: not available (%s and %s must both run)\n",
                 kHostMapUnmanaged, kPfnCacheUnmanaged);
  }
  std::fflush(out);
  benchmark::Shutdown();
  return 0;
}
