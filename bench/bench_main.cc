// main() of nestcache_microbench: starts a busy second thread, runs the
// micro-benchmarks of bench/micro_bench.cc with the usual Google Benchmark
// flags (--benchmark_filter, --benchmark_format=json, --benchmark_out, ...),
// and prints a summary of the ratios taken from the runs it just reported
// (run_summary.h). Exits 1 if a benchmark reported an error, 2 on a bad flag.
//
// Own flag: --busy_thread=0 runs without the second thread (to see what the
// TLB shootdowns add); the default is on.
#include <benchmark/benchmark.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <thread>
#include <vector>

#include "run_summary.h"

namespace {

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
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 2;
  benchmark::AddCustomContext("busy_thread", busy ? "on" : "off");

  BusyThread spinner;
  if (busy) spinner.start();
  // The library keeps ownership of its default display reporter.
  nestcache::bench::CollectingReporter reporter(benchmark::CreateDefaultDisplayReporter());
  benchmark::RunSpecifiedBenchmarks(&reporter);
  spinner.stop();

  // On stdout next to the console table; on stderr when stdout carries JSON
  // or CSV, so that it stays machine-readable.
  std::FILE* out = reporter.console() ? stdout : stderr;
  nestcache::bench::print_summary(reporter, out, busy);
  std::fflush(out);
  benchmark::Shutdown();
  // A benchmark that could not run (SkipWithError) fails the run.
  return reporter.failed().empty() ? 0 : 1;
}
