// Ending a command cleanly on SIGINT or SIGTERM: what finished is printed
// before the process exits, whether stdout is a terminal, a pipe or a file.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <thread>

#include "base/error.h"

namespace nestcache::cli {

// "SIGINT" or "SIGTERM": the signal an InterruptWatch reports, as the
// commands name it in their output.
const char* signal_name(int signo);

// While alive, SIGINT and SIGTERM are blocked in the thread that made it and
// in every thread started after, and one thread of its own waits for them.
// When one arrives, `on_signal(signo)` runs on that thread (it prints what
// finished, taking whatever lock guards it), stdout and stderr are flushed,
// and the process exits with 128 + signo (130 for SIGINT, 143 for SIGTERM),
// the status a shell gives a command a signal ended.
class InterruptWatch {
 public:
  // Must be made before the command starts any thread. Fails (with the
  // errno) only if its thread cannot be started.
  static Result<std::unique_ptr<InterruptWatch>> start(std::function<void(int)> on_signal);
  // As start, for a run that can stop by itself: `on_signal(signo)` returns
  // true to end the process as start does, or false once it has asked the
  // run to stop; the watch then goes on waiting, so that a later signal
  // (for which on_signal returns true) still ends a run that does not stop.
  static Result<std::unique_ptr<InterruptWatch>> start_stoppable(std::function<bool(int)> on_signal);
  // Stops the waiting thread and restores the signal mask.
  ~InterruptWatch();
  InterruptWatch(const InterruptWatch&) = delete;
  InterruptWatch& operator=(const InterruptWatch&) = delete;

 private:
  InterruptWatch() = default;
  void wait_loop();

  std::function<bool(int)> on_signal_;  // true: exit now
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace nestcache::cli
