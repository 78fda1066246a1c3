// What nestcache_microbench prints after its table: the ratios the design is
// judged by, each taken from two benchmarks of the run that just ended (never
// from figures of another run, which on this kind of machine move by 10 %
// from day to day).
//
//   - the unmanaged HostMap access against the lock-free PfnCache access (the
//     seed's "before" and "after");
//   - each read side's cached access against a plain read through a pointer,
//     and the lock-free access against its own instructions run with no
//     meaning (BM_AccessShape: the floor of that sequence on this machine);
//   - "flat in scale": every family measured at a small and a large size (the
//     memslot lookup at 8 and 32,764 slots, an invalidation among 1,000 and
//     100,000 caches), the large figure over the small one;
//   - a refresh while another thread invalidates non-stop: its time and its
//     retries and waits per refresh.
// A line appears when both of its benchmarks ran (a --benchmark_filter may
// leave some out).
#pragma once

#include <benchmark/benchmark.h>

#include <cstdio>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace nestcache::bench {

// Forwards everything to the reporter --benchmark_format chose, and keeps, by
// benchmark name without the "/real_time" suffix, the real and CPU time per
// iteration and the counters of every run that succeeded: the "median"
// aggregate when repetitions produced one (with
// --benchmark_report_aggregates_only it is all there is; one slow repetition
// moves a median less than a mean), otherwise the average of the runs. Also
// remembers whether any run failed.
class CollectingReporter : public benchmark::BenchmarkReporter {
 public:
  explicit CollectingReporter(benchmark::BenchmarkReporter* inner) : inner_(inner) {}

  bool ReportContext(const Context& context) override { return inner_->ReportContext(context); }
  void ReportRuns(const std::vector<Run>& runs) override;
  void Finalize() override { inner_->Finalize(); }

  // One benchmark's figures, per iteration.
  struct Figures {
    double real_ns = 0;
    double cpu_ns = 0;
    std::map<std::string, double> counters;
  };
  // `name`'s figures, if it ran and succeeded.
  std::optional<Figures> figures(const std::string& name) const;
  bool any() const { return !runs_.empty(); }
  // Names of the benchmarks that reported an error (SkipWithError).
  const std::vector<std::string>& failed() const { return failed_; }
  // True if the display reporter is the console one (the summary then goes to
  // stdout with the table; otherwise to stderr, keeping stdout
  // machine-readable).
  bool console() const { return dynamic_cast<benchmark::ConsoleReporter*>(inner_) != nullptr; }

 private:
  struct Collected {
    std::optional<Figures> median;
    Figures sum;
    int runs = 0;
  };
  benchmark::BenchmarkReporter* inner_;
  std::map<std::string, Collected> runs_;
  std::vector<std::string> failed_;
};

// Prints the summary described at the top of this file to `out`. `busy` says
// whether the second thread ran (it decides what the HostMap figure holds).
void print_summary(const CollectingReporter& r, std::FILE* out, bool busy);

}  // namespace nestcache::bench
