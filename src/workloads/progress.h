// Progress: a one-line progress display for long runs, drawn on stderr.
//
// It draws only when asked to (the CLI turns it off for --json) and only when
// stderr is a terminal, so piped output and CI logs never see carriage
// returns. Redraws are throttled; the line is erased by finish() or the
// destructor, so the report printed afterwards starts on a clean line.
//
// Thread safety: update() may be called from any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include "base/mutex.h"

namespace nestcache::workloads {

class Progress {
 public:
  // `enabled` false (or stderr not a terminal) makes every call a no-op.
  explicit Progress(bool enabled);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // True if this display draws anything at all.
  bool active() const { return active_; }

  // Shows `label` with `done` of `total` steps (a bar and a percentage when
  // total > 0, just the count otherwise). Redraws at most every 100 ms,
  // except when the label changes or done reaches total.
  void update(uint64_t done, uint64_t total, std::string_view label) NC_EXCLUDES(mu_);

  // Erases the line. The display can be used again afterwards.
  void finish() NC_EXCLUDES(mu_);

  // The line update() would draw, without the terminal control characters;
  // `width` is the bar's width in characters. Exposed for tests.
  static std::string render(uint64_t done, uint64_t total, std::string_view label, int width = 24);

 private:
  void erase_locked() NC_REQUIRES(mu_);

  const bool active_;
  Mutex mu_{LockRank::kLeaf};
  std::chrono::steady_clock::time_point last_draw_ NC_GUARDED_BY(mu_){};
  std::string last_label_ NC_GUARDED_BY(mu_);
  size_t drawn_width_ NC_GUARDED_BY(mu_) = 0;  // characters on the line now
};

}  // namespace nestcache::workloads
