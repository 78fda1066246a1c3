// Progress: the terminal progress line (see progress.h).
#include "workloads/progress.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include <fmt/format.h>

namespace nestcache::workloads {

namespace {
constexpr auto kRedrawInterval = std::chrono::milliseconds(100);
}  // namespace

Progress::Progress(bool enabled) : active_(enabled && ::isatty(STDERR_FILENO) == 1) {}

Progress::~Progress() { finish(); }

std::string Progress::render(uint64_t done, uint64_t total, std::string_view label, int width) {
  if (total == 0) return fmt::format("{} {}", label, done);
  done = std::min(done, total);
  int filled = static_cast<int>(static_cast<double>(done) / static_cast<double>(total) * width);
  unsigned percent = static_cast<unsigned>(done * 100 / total);
  return fmt::format("[{}{}] {:3}% {}/{} {}", std::string(filled, '#'), std::string(width - filled, '.'), percent,
                     done, total, label);
}

void Progress::update(uint64_t done, uint64_t total, std::string_view label) {
  if (!active_) return;
  MutexLock l(mu_);
  auto now = std::chrono::steady_clock::now();
  bool must = label != last_label_ || (total > 0 && done >= total);
  if (!must && now - last_draw_ < kRedrawInterval) return;
  last_draw_ = now;
  last_label_ = std::string(label);
  std::string line = render(done, total, label);
  // Pad over what the previous, possibly longer, line left behind.
  size_t pad = drawn_width_ > line.size() ? drawn_width_ - line.size() : 0;
  std::fprintf(stderr, "\r%s%*s", line.c_str(), static_cast<int>(pad), "");
  std::fflush(stderr);
  drawn_width_ = line.size();
}

void Progress::finish() {
  if (!active_) return;
  MutexLock l(mu_);
  erase_locked();
}

void Progress::erase_locked() {
  if (drawn_width_ == 0) return;
  std::fprintf(stderr, "\r%*s\r", static_cast<int>(drawn_width_), "");
  std::fflush(stderr);
  drawn_width_ = 0;
  last_label_.clear();
}

}  // namespace nestcache::workloads
