// `nestcache bench --sweep`: one parameter of one bench test over a list of
// values (workloads/sweep.h), printed as a table per strategy, as JSON, and
// written as CSV.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>

#include "base/mutex.h"
#include "cli/commands.h"
#include "cli/interrupt.h"
#include "workloads/progress.h"
#include "workloads/sweep.h"

namespace nestcache::cli {

namespace {

using CsvFile = std::unique_ptr<std::FILE, int (*)(std::FILE*)>;

// The points a sweep has finished, shared by the loop that runs them and the
// thread that prints them when a signal ends the run. The text table is
// written point by point as each finishes; JSON and the CSV at the end.
class SweepPrinter {
 public:
  SweepPrinter(const workloads::BenchInfo& test, const workloads::SweepSpec& spec, const workloads::BenchOptions& o,
               CsvFile csv, std::string csv_path)
      : test_(test), spec_(spec), options_(o), csv_(std::move(csv)), csv_path_(std::move(csv_path)) {
    options_.progress = nullptr;
  }

  void add(const workloads::SweepPoint& p) NC_EXCLUDES(mu_) {
    MutexLock l(mu_);
    points_.push_back(p);
    if (!options_.json) print_row_locked(p);
  }

  // A run that could not be done ended the sweep: `message` goes to stderr
  // and, with JSON, into the report as "error".
  void fail(const std::string& message) NC_EXCLUDES(mu_) {
    MutexLock l(mu_);
    error_ = message;
    run_error(false, "nestcache bench", message);
  }

  // The end of the run, or of what finished before a signal: the CSV, then
  // the JSON report or the text's last line. Once only. Returns false if the
  // CSV could not be written (the message is printed).
  bool finish(const char* interrupted_by = nullptr) NC_EXCLUDES(mu_) {
    MutexLock l(mu_);
    if (finished_) return true;
    finished_ = true;
    bool csv_ok = write_csv_locked();
    if (options_.json) {
      nlohmann::json j = workloads::sweep_json(test_.name, spec_, options_, points_);
      if (interrupted_by) j["interrupted"] = interrupted_by;
      if (!error_.empty()) j["error"] = error_;
      print_json(j);
    } else if (interrupted_by) {
      if (!header_printed_) print_header_locked(false, std::nullopt);
      fmt::print("\nInterrupted by {}: {} point{} finished.\n", interrupted_by, points_.size(),
                 points_.size() == 1 ? "" : "s");
    }
    std::fflush(stdout);
    return csv_ok;
  }

 private:
  // `exit_cost_ns`: the first point's; every point's unless the exit cost is
  // the parameter swept (then it is the first column).
  void print_header_locked(bool io, std::optional<uint64_t> exit_cost_ns) NC_REQUIRES(mu_) {
    header_printed_ = true;
    fmt::print("{} — sweep of {}\n", test_.name, workloads::sweep_param_name(spec_.param));
    if (exit_cost_ns && spec_.param != workloads::SweepParam::exit_cost_ns)
      fmt::print("  exit cost {} ns per VM exit + entry{}\n", *exit_cost_ns,
                 options_.exit_cost_ns ? "" : " (model default)");
    // The cost every map row's windows were charged, as bench prints it.
    if (nlohmann::json w = workloads::sweep_window_cost(options_); w.is_object())
      fmt::print("  {}\n", format_window_cost(w));
    fmt::print("  {:>12} {:<8} {:>14} {:>14} {:>11} {:>9} {:>6}{}\n", workloads::sweep_param_name(spec_.param),
               "strategy", io ? "per request" : "per iteration", "per round trip", "round trips", "windows", "stale",
               io ? "   requests/s  trips/request" : "");
  }

  void print_row_locked(const workloads::SweepPoint& p) NC_REQUIRES(mu_) {
    const workloads::BenchRow& r = p.row;
    const bool io = r.extra.contains("requests_per_second");
    if (!header_printed_) print_header_locked(io, r.exit_cost_ns);
    std::string tail;
    if (io)
      tail = fmt::format(" {:>12.0f} {:>14.2f}", r.extra.value("requests_per_second", 0.0),
                         r.extra.value("round_trips_per_request", 0.0));
    fmt::print("  {:>12} {:<8} {:>14} {:>14} {:>11} {:>9} {:>6}{}\n", p.value, vmx::strategy_name(r.strategy),
               format_row_time(r, &workloads::BenchRow::seconds_per_iteration),
               format_row_time(r, &workloads::BenchRow::seconds_per_round_trip),
               r.counters[Counter::nested_round_trips], r.counters[Counter::remap_windows],
               r.counters[Counter::stale_accesses], tail);
    // The value is what was asked for; an area with fewer pages than slots
    // ran with fewer (bench's note), once per value.
    if (r.extra.value("slots_capped", false) && capped_noted_ != p.value) {
      capped_noted_ = p.value;
      fmt::print("  {:>12} too many slots for this area; ran with {} slots of {} page(s)\n", "",
                 r.extra.value("slots_used", 0), r.extra.value("pages_per_slot", 0));
    }
    for (const auto& f : r.failures)
      fmt::print("  FAILED {}={} / {}: {}\n", workloads::sweep_param_name(spec_.param), p.value,
                 vmx::strategy_name(r.strategy), f);
    std::fflush(stdout);
  }

  bool write_csv_locked() NC_REQUIRES(mu_) {
    if (!csv_) return true;
    std::string text = workloads::sweep_csv(spec_, points_);
    bool written = std::fwrite(text.data(), 1, text.size(), csv_.get()) == text.size();
    written = std::fclose(csv_.release()) == 0 && written;
    if (!written) {
      // On stderr, and in the JSON report as "error" (it only lacked the file).
      const std::string message = fmt::format("--csv: cannot write {}: {}", csv_path_, std::strerror(errno));
      run_error(false, "nestcache bench", message);
      if (error_.empty()) error_ = message;
    }
    return written;
  }

  const workloads::BenchInfo& test_;
  const workloads::SweepSpec spec_;
  workloads::BenchOptions options_;
  Mutex mu_{LockRank::kLeaf};
  CsvFile csv_ NC_GUARDED_BY(mu_);
  const std::string csv_path_;
  std::vector<workloads::SweepPoint> points_ NC_GUARDED_BY(mu_);
  bool header_printed_ NC_GUARDED_BY(mu_) = false;
  std::optional<uint64_t> capped_noted_ NC_GUARDED_BY(mu_);  // the last value noted as capped
  bool finished_ NC_GUARDED_BY(mu_) = false;
  std::string error_ NC_GUARDED_BY(mu_);
};

}  // namespace

int run_sweep(const workloads::BenchInfo& test, workloads::BenchOptions o, const std::string& sweep,
              const std::string& csv_path) {
  auto spec = workloads::parse_sweep(sweep);
  Status st = spec ? workloads::check_sweep_applies(test, spec->param) : Status(tl::unexpected(spec.error()));
  if (st) st = workloads::validate_sweep(test, o, *spec);
  if (!st) return usage_error(o.json, "nestcache bench", st.error().message);
  // The CSV file is opened before the runs, so a path that cannot be written
  // costs nothing but the message.
  CsvFile csv(nullptr, &std::fclose);
  if (!csv_path.empty()) {
    csv.reset(std::fopen(csv_path.c_str(), "w"));
    if (!csv)
      return run_error(o.json, "nestcache bench",
                       fmt::format("--csv: cannot write {}: {}", csv_path, std::strerror(errno)));
  }
  SweepPrinter printer(test, *spec, o, std::move(csv), csv_path);
  // SIGINT / SIGTERM: the points finished so far are printed (and written to
  // the CSV), marked as interrupted, and the run exits 130 / 143, as bench's.
  auto watch = InterruptWatch::start([&printer](int signo) {
    std::fputs("\n", stderr);  // past the progress line
    printer.finish(signal_name(signo));
  });
  if (!watch) return run_error(o.json, "nestcache bench", watch.error().to_string());
  // The progress display draws on stderr only, and only on a terminal, so
  // --json output stays pure data.
  workloads::Progress progress(true);
  o.progress = &progress;
  bool ok = true;
  auto points = workloads::run_sweep(test, o, *spec, [&](const workloads::SweepPoint& p) {
    ok = ok && p.row.failures.empty();
    progress.finish();  // the row starts on a clean line
    printer.add(p);
  });
  o.progress = nullptr;
  if (!points) {
    progress.finish();
    ok = false;
    printer.fail(fmt::format("{} could not run: {}", test.name, points.error().to_string()));
  }
  if (!printer.finish()) ok = false;
  return ok ? kExitOk : kExitFailed;
}

}  // namespace nestcache::cli
