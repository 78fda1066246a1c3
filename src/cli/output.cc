// Human and JSON output shared by the commands (see commands.h).
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>

#include <fmt/format.h>

#include "cli/commands.h"

namespace nestcache::cli {

namespace {
constexpr size_t kCounterLineWidth = 96;
}  // namespace

std::string format_seconds(double s) {
  struct Unit {
    double scale;
    const char* name;
  };
  static constexpr Unit kUnits[] = {{1, "s"}, {1e-3, "ms"}, {1e-6, "µs"}, {1e-9, "ns"}};
  if (s == 0) return "0 s";
  for (const Unit& u : kUnits) {
    double v = s / u.scale;
    if (std::fabs(v) >= 1 || u.scale == 1e-9) {
      int decimals = std::fabs(v) >= 100 ? 0 : std::fabs(v) >= 10 ? 1 : 2;
      return fmt::format("{:.{}f} {}", v, decimals, u.name);
    }
  }
  return fmt::format("{} s", s);
}

std::string format_row_time(const workloads::BenchRow& row, double workloads::BenchRow::*field) {
  return row.has_time(field) ? format_seconds(row.*field) : std::string("-");
}

std::string format_window_cost(const nlohmann::json& w) {
  return fmt::format("remap window {} ns (mmap {} + munmap {}), {}",
                     w["open_ns"].get<uint64_t>() + w["close_ns"].get<uint64_t>(), w["open_ns"].get<uint64_t>(),
                     w["close_ns"].get<uint64_t>(),
                     w["source"] == "calibrated"
                         ? fmt::format("calibrated with another thread of the process on another CPU ({} of {} samples{})",
                                       w["concurrent_samples"].get<uint64_t>(), w["samples"].get<uint64_t>(),
                                       w["sibling_ran"].get<bool>() ? "" : "; too few: all samples used")
                         : std::string("--window-cost-ns"));
}

std::string format_ratio(double num, double den) {
  if (den <= 0 || num < 0) return "-";
  double r = num / den;
  return r >= 100 ? fmt::format("{:.0f}x", r) : r >= 10 ? fmt::format("{:.1f}x", r) : fmt::format("{:.2f}x", r);
}

std::string wrap_text(std::string_view text, size_t width) {
  std::string out;
  size_t column = 0;
  while (!text.empty()) {
    if (text.front() == '\n') {
      out += '\n';
      column = 0;
      text.remove_prefix(1);
      continue;
    }
    size_t end = text.find_first_of(" \n");
    std::string_view word = text.substr(0, end);
    if (column > 0 && column + 1 + word.size() > width) {
      out += '\n';
      column = 0;
    } else if (column > 0) {
      out += ' ';
      column++;
    }
    out += word;
    column += word.size();
    text.remove_prefix(word.size());
    if (!text.empty() && text.front() == ' ') text.remove_prefix(1);
  }
  return out;
}

std::string dump_json(const nlohmann::json& j, int indent) {
  // Strings can hold bytes from the user (a file name, a parser's message
  // quoting a bad file): they are printed with U+FFFD for every byte that is
  // not UTF-8 rather than throwing.
  return j.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace);
}

void print_json(const nlohmann::json& j) {
  std::string text = dump_json(j, 2);
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fputc('\n', stdout);
}

void print_selftest_summary(std::string_view test, const workloads::RunOptions& opts,
                            const workloads::SelftestResult& r) {
  double seconds = r.details.value("seconds", 0.0);
  // A selftest that drives the vm layer directly says --strategy does not
  // apply to it (details.strategy_applies): the line then does not name one.
  const bool strategy_applies = r.details.value("strategy_applies", true);
  fmt::print("{}: {}  ({}memory {}, {})\n", test, r.passed ? "PASS" : "FAIL",
             strategy_applies ? fmt::format("strategy {}, ", vmx::strategy_name(opts.strategy)) : "",
             workloads::memory_kind_name(opts.memory), format_seconds(seconds));
  for (const std::string& f : r.failures) fmt::print("  failed: {}\n", f);
  for (const std::string& n : r.notes) fmt::print("  note: {}\n", n);

  // The counters that moved (all of them with --verbose), wrapped.
  std::string line = "  counters:";
  bool any = false;
  for (int i = 0; i < kNumCounters; i++) {
    Counter c = static_cast<Counter>(i);
    if (r.counters[c] == 0 && !opts.verbose) continue;
    std::string item = fmt::format(" {}={}", counter_name(c), r.counters[c]);
    if (line.size() + item.size() > kCounterLineWidth) {
      fmt::print("{}\n", line);
      line = "           ";
    }
    line += item;
    any = true;
  }
  if (any) fmt::print("{}\n", line);
  if (opts.verbose) fmt::print("  details: {}\n", dump_json(r.details));
}

namespace {
int report_error(bool json, std::string_view kind, int status, std::string_view command, const std::string& message) {
  if (json)
    print_json({{"error", {{"kind", kind}, {"command", command}, {"message", message}, {"exit_status", status}}}});
  else  // fputs, not fmt::print, which throws when stderr cannot be written (2>/dev/full)
    std::fputs(fmt::format("{}: {}\n", command, message).c_str(), stderr);
  return status;
}
}  // namespace

int usage_error(bool json, std::string_view command, const std::string& message) {
  return report_error(json, "usage", kExitUsage, command, message);
}

int run_error(bool json, std::string_view command, const std::string& message) {
  return report_error(json, "failed", kExitFailed, command, message);
}

int finish_output(int status, bool stdout_closed, int write_errno) {
  errno = 0;
  const bool failed = std::fflush(stdout) != 0 || std::ferror(stdout) != 0;
  if (!failed && !stdout_closed) return status;
  const int err = stdout_closed ? EBADF : write_errno != 0 ? write_errno : errno;
  // fprintf, not fmt::print, which throws when stderr fails too. A write
  // that failed before this flush (a command's own fflush) left no errno.
  if (err == 0)
    std::fputs("nestcache: cannot write the output: a write to stdout failed\n", stderr);
  else
    std::fprintf(stderr, "nestcache: cannot write the output: %s: %s\n", Error{err, ""}.code_name(),
                 stdout_closed ? "stdout is closed" : std::strerror(err));
  return status == kExitOk ? kExitFailed : status;
}

}  // namespace nestcache::cli
