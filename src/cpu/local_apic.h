// LocalApic: the local APIC of one vCPU as L0 emulates it for L1 (x2APIC
// mode) — interrupt requests raised by other vCPUs and by the APIC timer, and
// the parking of the vCPU thread while its guest halts or waits.
//
// Threads: deliver() and wake() run on any thread; everything else on the
// vCPU's own thread. A parked thread wakes on an interrupt, a wake() (a kick,
// a request, a monitored write) or its deadline.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>

#include "base/mutex.h"

namespace nestcache::cpu {

// The APIC timer (SDM Vol. 3A 10.5.4), driven by whichever clock the machine
// runs on. As KVM's emulated APIC, the timer counts at 1 GHz before the
// divide configuration.
class ApicTimer {
 public:
  // WRMSR to the LVT timer register: vector in 7:0, masked (bit 16),
  // periodic (bits 18:17 = 01; 00 is one-shot).
  void write_lvt(uint32_t value) { lvt_ = value; }
  // WRMSR to the initial-count register at time `now_ns`: (re)starts the
  // timer; 0 stops it.
  void write_initial_count(uint32_t count, uint64_t now_ns);
  // WRMSR to the divide-configuration register (bits 0, 1 and 3).
  void write_divide(uint32_t value) { divide_config_ = value & 0xb; }
  uint32_t lvt() const { return lvt_; }
  uint32_t initial_count() const { return initial_; }
  uint32_t divide_config() const { return divide_config_; }
  // The current-count register at `now_ns`.
  uint32_t current_count(uint64_t now_ns) const;
  // When the timer next fires (unmasked or not), if it is counting.
  std::optional<uint64_t> deadline() const;
  // If the timer has fired by `now_ns`: its vector, unless masked, and the
  // next period armed (periodic; missed periods coalesce into one
  // interrupt, as one IRR bit holds them) or the timer stopped (one-shot).
  std::optional<uint8_t> expire(uint64_t now_ns);

  static constexpr uint32_t kMasked = 1u << 16;
  static constexpr uint32_t kPeriodic = 1u << 17;

 private:
  uint64_t period_ns() const;
  uint32_t lvt_ = kMasked;
  uint32_t initial_ = 0;
  uint32_t divide_config_ = 0;  // divide by 2
  uint64_t start_ns_ = 0;
  uint64_t deadline_ns_ = 0;  // 0: not counting
};

class LocalApic {
 public:
  // --- any thread -------------------------------------------------------------
  // Raises `vector` in the interrupt-request register and wakes the thread.
  void deliver(uint8_t vector) NC_EXCLUDES(mu_);
  // Wakes the thread if it is parked (a kick, a request, a monitored write);
  // a thread about to park does not.
  void wake() NC_EXCLUDES(mu_);

  // --- the vCPU thread --------------------------------------------------------
  // True (once) if an interrupt was delivered since the last call.
  bool interrupt_arrived() { return arrived_.exchange(false); }
  // Makes interrupt_arrived() true again (a vector left for later).
  void mark_arrived() { arrived_.store(true); }
  // The highest pending vector other than `except` (-1: none), taken out of
  // the request register.
  std::optional<uint8_t> take(int except = -1) NC_EXCLUDES(mu_);
  // Takes `vector` out of the request register; false if it was not there.
  bool take_vector(uint8_t vector) NC_EXCLUDES(mu_);

  // Parks the thread until wake() or deliver() is called, or, with
  // `until_pending`, an interrupt is pending; or `deadline` (steady clock)
  // passes; or `also()` holds (checked under the APIC lock, for conditions
  // whose setters call wake()). Returns false if the deadline ended it.
  bool park(bool until_pending, std::optional<std::chrono::steady_clock::time_point> deadline,
            const std::function<bool()>& also) NC_EXCLUDES(mu_);

  ApicTimer& timer() { return timer_; }

 private:
  Mutex mu_{LockRank::kLeaf};
  CondVar cv_;
  std::array<uint64_t, 4> irr_ NC_GUARDED_BY(mu_) = {};
  bool woken_ NC_GUARDED_BY(mu_) = false;
  std::atomic<bool> arrived_{false};  // an interrupt reached irr_ since last looked
  ApicTimer timer_;                   // the vCPU thread's
};

}  // namespace nestcache::cpu
