#include "cpu/local_apic.h"

namespace nestcache::cpu {

// --- timer ---------------------------------------------------------------------------

uint64_t ApicTimer::period_ns() const {
  // Divide configuration (SDM Vol. 3A Figure 10-10): bits 3, 1:0 encode
  // 2, 4, 8, 16, 32, 64, 128 and (0b111) 1.
  uint32_t code = ((divide_config_ >> 1) & 4) | (divide_config_ & 3);
  uint64_t divide = code == 7 ? 1 : uint64_t{2} << code;
  return uint64_t{initial_} * divide;
}

void ApicTimer::write_initial_count(uint32_t count, uint64_t now_ns) {
  initial_ = count;
  start_ns_ = now_ns;
  deadline_ns_ = count ? now_ns + period_ns() : 0;
}

uint32_t ApicTimer::current_count(uint64_t now_ns) const {
  if (!deadline_ns_ || now_ns >= deadline_ns_) return 0;
  uint64_t per = period_ns() / initial_;
  return static_cast<uint32_t>((deadline_ns_ - now_ns + per - 1) / per);
}

std::optional<uint64_t> ApicTimer::deadline() const {
  if (!deadline_ns_) return std::nullopt;
  return deadline_ns_;
}

std::optional<uint8_t> ApicTimer::expire(uint64_t now_ns) {
  if (!deadline_ns_ || now_ns < deadline_ns_) return std::nullopt;
  if (lvt_ & kPeriodic) {
    uint64_t period = period_ns();
    deadline_ns_ += (now_ns - deadline_ns_) / period * period + period;
  } else {
    deadline_ns_ = 0;
  }
  if (lvt_ & kMasked) return std::nullopt;
  return static_cast<uint8_t>(lvt_ & 0xff);
}

// --- interrupts and parking ---------------------------------------------------------

void LocalApic::deliver(uint8_t vector) {
  MutexLock l(mu_);
  irr_[vector / 64] |= uint64_t{1} << (vector % 64);
  // The arrival is visible before the wake: a thread woken by this delivery
  // sees it at its next operation boundary. Published after the wake, a
  // guest that only parks again (MWAIT) could miss it for good.
  arrived_.store(true);
  woken_ = true;
  cv_.notify_all();
}

void LocalApic::wake() {
  MutexLock l(mu_);
  woken_ = true;
  cv_.notify_all();
}

std::optional<uint8_t> LocalApic::take(int except) {
  MutexLock l(mu_);
  for (int w = 3; w >= 0; w--) {
    uint64_t pending = irr_[w];
    if (except >= 0 && except / 64 == w) pending &= ~(uint64_t{1} << (except % 64));
    if (!pending) continue;
    int bit = 63 - __builtin_clzll(pending);
    irr_[w] &= ~(uint64_t{1} << bit);
    return static_cast<uint8_t>(w * 64 + bit);
  }
  return std::nullopt;
}

bool LocalApic::take_vector(uint8_t vector) {
  MutexLock l(mu_);
  uint64_t bit = uint64_t{1} << (vector % 64);
  if (!(irr_[vector / 64] & bit)) return false;
  irr_[vector / 64] &= ~bit;
  return true;
}

bool LocalApic::park(bool until_pending, std::optional<std::chrono::steady_clock::time_point> deadline,
                     const std::function<bool()>& also) {
  MutexLock l(mu_);
  auto ready = [&]() NC_NO_THREAD_SAFETY_ANALYSIS {
    return woken_ || (until_pending && (irr_[0] | irr_[1] | irr_[2] | irr_[3])) || (also && also());
  };
  bool woke = true;
  if (!deadline)
    cv_.wait(mu_, ready);
  else
    woke = cv_.wait_for(mu_, *deadline - std::chrono::steady_clock::now(), ready);
  woken_ = false;
  return woke;
}

}  // namespace nestcache::cpu
