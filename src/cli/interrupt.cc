#include "cli/interrupt.h"

#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <system_error>


namespace nestcache::cli {

namespace {

sigset_t interrupt_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

}  // namespace

const char* signal_name(int signo) { return signo == SIGINT ? "SIGINT" : "SIGTERM"; }

Result<std::unique_ptr<InterruptWatch>> InterruptWatch::start(std::function<void(int)> on_signal) {
  return start_stoppable([f = std::move(on_signal)](int signo) {
    f(signo);
    return true;
  });
}

Result<std::unique_ptr<InterruptWatch>> InterruptWatch::start_stoppable(std::function<bool(int)> on_signal) {
  std::unique_ptr<InterruptWatch> w(new InterruptWatch());
  w->on_signal_ = std::move(on_signal);
  sigset_t set = interrupt_signals();
  if (int e = pthread_sigmask(SIG_BLOCK, &set, nullptr)) return errorf(e, "blocking SIGINT and SIGTERM");
  InterruptWatch* raw = w.get();
  // Not through host::start_thread: the fault seam's thread count is the
  // workload's own threads.
  try {
    w->thread_ = std::thread([raw] { raw->wait_loop(); });
  } catch (const std::system_error& e) {
    pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
    return errorf(e.code().value(), "cannot start the signal-watching thread: {}", e.code().message());
  }
  return w;
}

InterruptWatch::~InterruptWatch() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
  sigset_t set = interrupt_signals();
  pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
}

void InterruptWatch::wait_loop() {
  const sigset_t set = interrupt_signals();
  // A short timeout, so that the destructor's stop is seen soon; a signal
  // that arrives meanwhile stays pending and is taken on the next wait.
  const timespec step{0, 50'000'000};
  while (!stop_.load()) {
    int signo = sigtimedwait(&set, nullptr, &step);
    if (signo <= 0) continue;
    if (!on_signal_(signo)) continue;  // the run stops by itself
    std::fflush(stdout);
    std::fflush(stderr);
    _exit(128 + signo);
  }
}

}  // namespace nestcache::cli
