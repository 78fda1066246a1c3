#include "vm/vcpu.h"

#include <vector>

#include "base/check.h"
#include "base/model_time.h"

namespace nestcache::vm {

void Vcpu::carry_time(const TimeStamp& t) {
  MutexLock l(carried_mu_);
  carried_ = TimeStamp::later(carried_, t);
  has_carried_.store(true, std::memory_order_release);
}

void Vcpu::carry_current_time() {
  if (ModelClock* c = ModelClock::current()) carry_time(c->stamp());
}

void Vcpu::merge_carried_time(ModelClock& clock) {
  if (!has_carried_.load(std::memory_order_acquire)) return;
  MutexLock l(carried_mu_);
  has_carried_.store(false, std::memory_order_relaxed);
  clock.merge(carried_);
}

void Vcpu::kick() {
  carry_current_time();
  counters_.add(Counter::kicks);
  uint64_t s = state_.load(std::memory_order_seq_cst);
  while ((s & kModeMask) == static_cast<uint64_t>(VcpuMode::in_guest)) {
    uint64_t exiting = (s & ~kModeMask) | static_cast<uint64_t>(VcpuMode::exiting);
    if (state_.compare_exchange_weak(s, exiting, std::memory_order_seq_cst)) break;
  }
  wake();
}

bool Vcpu::enter_guest_mode() {
  uint64_t s = state_.load(std::memory_order_relaxed);
  NC_DCHECK((s & kModeMask) == static_cast<uint64_t>(VcpuMode::outside));
  state_.store((s & ~kModeMask) | static_cast<uint64_t>(VcpuMode::in_guest), std::memory_order_seq_cst);
  // Only now look at requests: a requester that set its bit before our store
  // is seen here; one that sets it after sees us in guest mode and kicks.
  if (has_requests()) {
    exit_guest_mode();
    return false;
  }
  return true;
}

void Vcpu::exit_guest_mode() {
  uint64_t s = state_.load(std::memory_order_relaxed);
  uint64_t epoch = (s >> 2) + 1;
  state_.store((epoch << 2) | static_cast<uint64_t>(VcpuMode::outside), std::memory_order_seq_cst);
  ModelClock::FixedCost handoff(0);  // a wake-up, not L0 work (CondVar::notify_all)
  state_.notify_all();
}

void Vcpu::wait_for_exit(uint64_t seen) {
  // Waits until the state moves on from `seen`; any move of an in-guest or
  // exiting vCPU ends that guest-mode episode or marks it exiting, and we
  // keep waiting through the latter.
  for (uint64_t s = seen;;) {
    if ((s & kModeMask) == static_cast<uint64_t>(VcpuMode::outside) || (s >> 2) != (seen >> 2)) return;
    state_.wait(s, std::memory_order_seq_cst);
    s = state_.load(std::memory_order_seq_cst);
  }
}

namespace {
thread_local Vcpu* tls_vcpu = nullptr;
}  // namespace

Vcpu* Vcpu::on_this_thread() { return tls_vcpu; }
Vcpu::ThreadBinding::ThreadBinding(Vcpu& v) { tls_vcpu = &v; }
Vcpu::ThreadBinding::~ThreadBinding() { tls_vcpu = nullptr; }

void Vcpu::make_request_and_wait(std::span<Vcpu* const> vcpus, Request r) {
  std::vector<std::pair<Vcpu*, uint64_t>> waits;
  for (Vcpu* v : vcpus) {
    v->make_request(r);
    // Read the mode only after the request is visible (seq_cst both sides).
    uint64_t s = v->state_.load(std::memory_order_seq_cst);
    v->kick();  // on our own vCPU: marks it exiting, so it leaves at its next boundary
    if (v == tls_vcpu) continue;
    if ((s & kModeMask) != static_cast<uint64_t>(VcpuMode::outside)) waits.push_back({v, s});
  }
  for (auto& [v, s] : waits) {
    v->counters_.add(Counter::guest_mode_waits);
    v->wait_for_exit(s);
  }
}

}  // namespace nestcache::vm
