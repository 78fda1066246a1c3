// Stopwatch: times a benchmark's loop from inside the guest program that runs
// it, in modelled time by part (the vCPU thread's ModelClock, which every
// hand-over carries the other threads' time into: DESIGN.md §5) and in wall
// time beside it. Create and read it on the vCPU thread that runs the loop.
#pragma once

#include <chrono>

#include "base/check.h"
#include "base/model_time.h"

namespace nestcache::workloads {

struct LoopTime {
  TimeStamp modelled;   // by part
  double wall_seconds = 0;
};

class Stopwatch {
 public:
  Stopwatch() : clock_(ModelClock::current()), start_(clock_ ? clock_->stamp() : TimeStamp{}) {
    NC_CHECK(clock_);  // only a vCPU thread (or a host thread with a clock) times a loop
  }
  // The time since construction.
  LoopTime elapsed() const {
    return {TimeStamp::interval(start_, clock_->stamp()),
            std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_start_).count()};
  }

 private:
  const ModelClock* clock_;
  TimeStamp start_;
  std::chrono::steady_clock::time_point wall_start_ = std::chrono::steady_clock::now();
};

}  // namespace nestcache::workloads
