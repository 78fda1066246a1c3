// The vCPU thread: L0's run loop (DESIGN.md §5).
//
//   loop:  process requests (TLB flushes, refresh-guest-pages, VMM calls, stop)
//          enter guest mode; for L2, the last check before hardware entry
//            (vmx::NestedVmx::check_before_hardware_entry)
//          run guest operations until a VM exit (run_guest, CpuModel)
//          leave guest mode, charge the transition, handle the exit
//
// Modelled time: the loop measures everything it does outside run_guest as
// L0 work; run_guest charges each completed operation its fixed cost. Guest
// code never runs inside an exit handler: a handler leaves the answer of the
// exiting operation (answer_l1, L2Program::answer) and run_guest delivers it,
// so interpreting guest code is never counted as L0 work.
#include "cpu/vcpu.h"

#include "base/check.h"
#include "cpu/cpu_model.h"
#include "cpu/machine.h"
#include "vm/cache_readers.h"

namespace nestcache::cpu {

using vmx::ExitReason;

namespace {
uint64_t steady_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}
}  // namespace

Vcpu::Vcpu(Machine& m, int id) : vm::Vcpu(id), m_(m) {
  nested_ = std::make_unique<vmx::NestedVmx>(m.vm(), *this, m.config().strategy, &m.hw_, counters(),
                                             m.contexts_.get());
  m.vm().add_vcpu(this);
}

Vcpu::~Vcpu() {
  if (thread_.joinable()) thread_.join();
  nested_.reset();
  m_.vm().remove_vcpu(this);
}

void Vcpu::deliver_interrupt(uint8_t vector) {
  carry_current_time();  // before the interrupt is visible: the receiver merges it on seeing it
  apic_.deliver(vector);
}

// --- time -------------------------------------------------------------------------------

uint64_t Vcpu::now_ns() const { return m_.config().clock == ClockKind::modelled ? clock_.now() : steady_ns(); }

void Vcpu::charge_transition() {
  const uint64_t ns = m_.config().exit_cost_ns;
  clock_.charge(TimePart::transitions, ns);
  if (m_.config().clock != ClockKind::wall || !ns) return;
  const uint64_t until = steady_ns() + ns;  // the wall clock sees the cost too
  while (steady_ns() < until) {
  }
}

void Vcpu::run_timer() {
  auto deadline = apic_.timer().deadline();
  if (!deadline) return;
  uint64_t now = now_ns();
  if (now < *deadline) return;
  if (auto vector = apic_.timer().expire(now)) apic_.deliver(*vector);
}

bool Vcpu::park(bool until_pending, std::optional<std::chrono::steady_clock::time_point> deadline) {
  if (m_.config().clock == ClockKind::wall) {
    if (auto t = apic_.timer().deadline()) {
      auto timer = std::chrono::steady_clock::time_point(std::chrono::nanoseconds(*t));
      if (!deadline || timer < *deadline) deadline = timer;
    }
  }
  // Parked, this thread reads no pfn cache: invalidations need not interrupt
  // its CPU to wait for it (vm/cache_readers.h).
  vm::cache_readers::quiesce();
  // A halted vCPU also wakes for a request; one waiting in guest mode
  // (MWAIT) learns of requests from the kick that comes with them.
  bool woke = apic_.park(until_pending, deadline, [this] { return !nested().guest_mode() && has_requests(); });
  absorb_carried_time();
  return woke;
}

// --- the loop --------------------------------------------------------------------------------

GuestTask* Vcpu::current_task() {
  if (!nested().guest_mode()) return &l1_;
  return l2_ ? &l2_->task : nullptr;
}

void Vcpu::fail_op(GuestTask& t) {
  try {
    t.rethrow_if_failed();
  } catch (const std::exception& e) {
    m_.fail(fmt::format("vCPU {}: guest program failed: {}", id(), e.what()));
  } catch (...) {
    m_.fail(fmt::format("vCPU {}: guest program failed", id()));
  }
  stop_ = true;
}

void Vcpu::process_requests() {
  if (check_request(vm::Request::kStop)) stop_ = true;
  if (check_request(vm::Request::kTlbFlush)) {
    tlb01_.clear();
    tlb02_.clear();
  }
  if (check_request(vm::Request::kTlbFlushGuest)) tlb02_.clear();
  check_request(vm::Request::kOutsideGuestMode);  // its only job was the exit
  // Nested state: a VMM call first (a set raises the request below), then
  // the restored vmcs12's pages, before any entry.
  if (check_request(vm::Request::kVmmCall)) serve_vmm_call();
  if (check_request(vm::Request::kGetNestedStatePages)) get_nested_state_pages();
  check_request(vm::Request::kEvent);
  if (check_request(vm::Request::kRefreshGuestPages)) {
    // The caches the hardware uses were invalidated: refresh them and
    // rewrite the vmcs02 pfns before the next entry.
    if (auto st = nested().refresh_guest_pages(); !st) {
      make_request(vm::Request::kRefreshGuestPages);  // still to do if the VMM runs the vCPU again
      internal_error(fmt::format("refreshing nested pages: {}", st.error().to_string()), st.error().code);
    }
    tlb02_.clear();
  }
}

void Vcpu::run_loop() {
  ModelClock::Binding bind_clock(clock_);
  vm::Vcpu::ThreadBinding bind_vcpu(*this);
  clock_.begin_measured();
  // Nothing escapes the thread: a failure (an allocation, a thread the
  // simulator could not start) ends the run with its cause, and the thread
  // still says it finished, so Machine::run returns and joins it.
  try {
    loop();
  } catch (const std::exception& e) {
    m_.fail_exception(id(), &e);
  } catch (...) {
    m_.fail_exception(id(), nullptr);
  }
  clock_.end_measured();
  stop_serving_vmm_calls();
  m_.vcpu_finished();
}

bool Vcpu::retry_internal_error(const std::string& cause, int code) {
  using std::chrono::steady_clock;
  if (!m_.config().retry_internal_errors) return false;
  // The VMM runs the vCPU again, as one that calls KVM_RUN after
  // KVM_EXIT_INTERNAL_ERROR. The cause may pass (a memslot moved back) or
  // not (no memory left): back off, and give up after kRetryLimit of
  // failures in a row, reporting the cause.
  // A streak can mix causes: a memslot the VMM moved away (EFAULT, which
  // passes) and a resource the host cannot give (ENOMEM, which does not).
  // The last cause that was not EFAULT is the one reported: it is why the
  // streak did not end. Retries run on the vCPU's own thread only, so the
  // record is per thread.
  thread_local Error lasting;
  auto now = steady_clock::now();
  if (internal_error_streak_++ == 0) {
    internal_error_since_ = now;
    lasting = Error{0, {}};
  }
  if (code != EFAULT) lasting = Error{code, cause};
  if (now - internal_error_since_ > kRetryLimit) {
    const Error& why = lasting.code ? lasting : Error{code, cause};
    m_.fail(fmt::format("vCPU {}: KVM internal error, still failing after {} attempts in {} ms, {}", id(),
                        internal_error_streak_, std::chrono::duration_cast<std::chrono::milliseconds>(kRetryLimit).count(),
                        why.message), why.code);
    stop_ = true;
    return true;  // handled: the run ends
  }
  if (internal_error_streak_ > 16) {
    auto pause = std::chrono::microseconds(std::min<uint64_t>(1000, uint64_t{10} << std::min<uint64_t>(internal_error_streak_ - 16, 7)));
    std::this_thread::sleep_for(pause);
  } else {
    std::this_thread::yield();
  }
  return true;
}

void Vcpu::internal_error(const std::string& cause, int code) {
  counters().add(Counter::internal_errors);
  if (retry_internal_error(cause, code)) return;
  m_.fail(fmt::format("vCPU {}: KVM internal error {}", id(), cause), code);
  stop_ = true;
}

void Vcpu::loop() {
  while (!stop_) {
    absorb_carried_time();
    process_requests();
    if (stop_) break;
    if (l1_.started() && l1_.done()) {
      if (l1_.failed()) fail_op(l1_);
      break;
    }
    if (!current_task()) {
      m_.fail(fmt::format("vCPU {}: no L2 program is bound to vmcs12 {:#x}", id(), nested().nested_vmptr()));
      break;
    }
    if (!enter_guest_mode()) continue;  // a request came in: go round
    if (before_last_check_ && nested().guest_mode()) before_last_check_();  // tests only
    if (!nested().check_before_hardware_entry()) {
      exit_guest_mode();  // cancelled: the request it raised rewrites vmcs02
      continue;
    }
    clock_.end_measured();
    Exit e = run_guest();
    exit_guest_mode();
    if (e.kind != Exit::Kind::none) charge_transition();
    clock_.begin_measured();
    handle_exit(e);
  }
}

void Vcpu::deliver_answer(GuestTask& t) {
  if (!t.started()) t.start();
  std::optional<OpResult>& answer = &t == &l1_ ? l1_answer_ : l2_->answer;
  if (!answer) return;
  OpResult r = std::move(*answer);
  answer.reset();
  if (t.pending()) t.resume_with(r);
}

Vcpu::Exit Vcpu::run_guest() {
  GuestTask* t = current_task();
  const bool l2 = nested().guest_mode();
  const GuestCosts& costs = m_.config().costs;
  deliver_answer(*t);
  for (;;) {
    if (t->done()) {
      if (t->failed()) {
        fail_op(*t);
        return {};
      }
      if (!l2) return {};
      Exit e;  // an L2 program that returns has nothing left to run: shut it down
      e.kind = Exit::Kind::l2;
      e.info = vmx::ExitInfo::of(ExitReason::kTripleFault);
      return e;
    }
    if (exit_requested()) {
      Exit e;
      e.kind = Exit::Kind::kick;
      return e;
    }
    run_timer();
    if (l2 && apic_.interrupt_arrived()) {
      absorb_carried_time();  // the interrupt cannot be taken before it was sent
      if (take_notification()) {
        if (nested().vmcs02().pin & vmx::pin::kPostedInterrupts) {
          CpuModel::process_posted_interrupts(*this);  // the hardware's own processing
        } else {
          // vmcs02 runs without posted interrupts (KVM's fallback for a
          // descriptor it could not map): the notification is an ordinary
          // interrupt, which exits to L0 for a software completion.
          apic_.mark_arrived();  // look again for other vectors next time
          Exit e;
          e.kind = Exit::Kind::pi_software;
          return e;
        }
      }
      // Any other interrupt is L1's: with external-interrupt exiting in
      // vmcs12 it exits L2 at once (acknowledged on exit: the vector goes
      // into the exit interruption information); otherwise it waits in L1's
      // APIC until L1 runs.
      const vmx::Vmcs12& v12 = nested().vmcs12();
      if (v12.pin_based_controls & vmx::pin::kExternalInterruptExiting) {
        // The notification vector is never L1's here: it may have arrived
        // since take_notification() looked, and is handled next time round.
        int nv = (v12.pin_based_controls & vmx::pin::kPostedInterrupts) ? v12.posted_intr_notification_vector : -1;
        if (auto vec = apic_.take(nv)) {
          Exit e;
          e.kind = Exit::Kind::l2;
          e.info = vmx::ExitInfo::of(ExitReason::kExternalInterrupt);
          e.info.interruption_info = *vec | vmx::intr_info::kValid;
          return e;
        }
      }
    }
    const GuestOp& op = *t->pending();
    CpuModel::Outcome o = l2 ? CpuModel::execute_l2(*this, op) : CpuModel::execute_l1(*this, op);
    if (auto* r = std::get_if<OpResult>(&o)) {
      clock_.charge(TimePart::guest_ops, CpuModel::cost(costs, op));
      t->resume_with(*r);
      continue;
    }
    return std::get<Exit>(o);
  }
}

}  // namespace nestcache::cpu
