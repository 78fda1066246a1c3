// The vCPU thread: L0's run loop and its exit handlers (DESIGN.md §5).
//
//   loop:  process requests (TLB flushes, refresh-guest-pages, stop)
//          enter guest mode; for L2, the last check before hardware entry
//          run operations until a VM exit (CpuModel)
//          leave guest mode, pay the transition, handle the exit
#include <chrono>
#include <thread>

#include "base/check.h"
#include "cpu/cpu_model.h"
#include "cpu/machine.h"

namespace nestcache::cpu {

using vmx::ExitReason;
using vmx::ExitTarget;
using vmx::InstrResult;

namespace {

OpResult to_op_result(const InstrResult& r) {
  switch (r.kind) {
    case InstrResult::Kind::ok: return OpResult::success(r.value);
    case InstrResult::Kind::fail_invalid: return OpResult::fail_invalid();
    case InstrResult::Kind::fail_valid: return OpResult::fail_valid(static_cast<uint32_t>(r.error));
    case InstrResult::Kind::ud: return OpResult::exception(kVectorUD);
  }
  return OpResult::exception(kVectorUD);
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

void Vcpu::wake() {
  MutexLock l(apic_mu_);
  woken_ = true;
  apic_cv_.notify_all();
}

void Vcpu::deliver_interrupt(uint8_t vector) {
  {
    MutexLock l(apic_mu_);
    l1_irr_[vector / 64] |= uint64_t{1} << (vector % 64);
    woken_ = true;
    apic_cv_.notify_all();
  }
  irq_arrived_.store(true);
}

std::optional<uint8_t> Vcpu::take_l1_interrupt(int except) {
  MutexLock l(apic_mu_);
  for (int w = 3; w >= 0; w--) {
    uint64_t pending = l1_irr_[w];
    if (except >= 0 && except / 64 == w) pending &= ~(uint64_t{1} << (except % 64));
    if (!pending) continue;
    int bit = 63 - __builtin_clzll(pending);
    l1_irr_[w] &= ~(uint64_t{1} << bit);
    return static_cast<uint8_t>(w * 64 + bit);
  }
  return std::nullopt;
}

bool Vcpu::take_notification() {
  const vmx::Vmcs12& v12 = nested().vmcs12();
  if (!nested().guest_mode() || !(v12.pin_based_controls & vmx::pin::kPostedInterrupts)) return false;
  uint8_t nv = static_cast<uint8_t>(v12.posted_intr_notification_vector);
  MutexLock l(apic_mu_);
  uint64_t bit = uint64_t{1} << (nv % 64);
  if (!(l1_irr_[nv / 64] & bit)) return false;
  l1_irr_[nv / 64] &= ~bit;
  return true;
}

bool Vcpu::block_until_event(std::chrono::microseconds timeout) {
  MutexLock l(apic_mu_);
  auto ready = [&]() NC_NO_THREAD_SAFETY_ANALYSIS {
    return woken_ || has_requests() || l1_irr_[0] || l1_irr_[1] || l1_irr_[2] || l1_irr_[3];
  };
  bool woke = true;
  if (timeout == std::chrono::microseconds::max())
    apic_cv_.wait(apic_mu_, ready);
  else
    woke = apic_cv_.wait_for(apic_mu_, timeout, ready);
  woken_ = false;
  return woke;
}

void Vcpu::burn_transition() {
  uint64_t ns = m_.config().exit_cost_ns;
  if (!ns) return;
  auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(ns);
  while (std::chrono::steady_clock::now() < until) {
  }
}

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
      counters().add(Counter::internal_errors);
      if (m_.config().retry_internal_errors) {
        // The VMM runs the vCPU again; the pages are still to be refreshed.
        make_request(vm::Request::kRefreshGuestPages);
        std::this_thread::yield();
      } else {
        m_.fail(fmt::format("vCPU {}: KVM internal error refreshing nested pages: {}", id(), st.error().message));
        stop_ = true;
      }
    }
    tlb02_.clear();
  }
}

void Vcpu::run_loop() {
  l1_.start();
  while (!stop_) {
    process_requests();
    if (stop_) break;
    if (l1_.done()) {
      if (l1_.failed()) fail_op(l1_);
      break;
    }
    GuestTask* task = current_task();
    if (!task) {
      m_.fail(fmt::format("vCPU {}: no L2 program is bound to vmcs12 {:#x}", id(), nested().nested_vmptr()));
      break;
    }
    if (!enter_guest_mode()) continue;  // a request came in: go round
    if (before_last_check_ && nested().guest_mode()) before_last_check_();  // tests only
    if (nested().last_check_fails()) {
      // Seed patch 3: a page the hardware would use was invalidated after
      // vmcs02 was built. Cancel the entry; the request refreshes it.
      exit_guest_mode();
      make_request(vm::Request::kRefreshGuestPages);
      counters().add(Counter::entry_cancels);
      continue;
    }
    if (nested().guest_mode()) nested().set_run_pending(false);  // L2 is on the hardware now
    Exit e = run_guest();
    exit_guest_mode();
    if (e.kind != Exit::Kind::none) burn_transition();
    handle_exit(e);
  }
  stop_serving_vmm_calls();
  m_.vcpu_finished();
}

Vcpu::Exit Vcpu::run_guest() {
  GuestTask* t = current_task();
  bool l2 = nested().guest_mode();
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
    if (l2 && irq_arrived_.exchange(false)) {
      if (take_notification()) {
        if (nested().vmcs02().pin & vmx::pin::kPostedInterrupts) {
          CpuModel::process_posted_interrupts(*this);  // the hardware's own processing
        } else {
          // vmcs02 runs without posted interrupts (KVM's fallback for a
          // descriptor it could not map): the notification is an ordinary
          // interrupt, which exits to L0 for a software completion.
          irq_arrived_.store(true);  // look again for other vectors next time
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
        if (auto vec = take_l1_interrupt(nv)) {
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
      t->resume_with(*r);
      continue;
    }
    return std::get<Exit>(o);
  }
}

void Vcpu::handle_exit(const Exit& e) {
  bool l2 = nested().guest_mode();
  switch (e.kind) {
    case Exit::Kind::none: return;
    case Exit::Kind::kick:
      counters().add(l2 ? Counter::l0_exits : Counter::l1_exits);
      return;
    case Exit::Kind::ept01_miss: {
      counters().add(l2 ? Counter::l0_exits : Counter::l1_exits);
      auto r = m_.vm().ept01_fault(e.gfn, true);
      if (r) return;  // the operation retries and finds the entry
      // No memslot: an MMIO exit to the VMM, which completes the access
      // (reads see all ones, writes are dropped) and resumes the guest.
      counters().add(Counter::mmio_exits);
      current_task()->resume_with(OpResult::success(~uint64_t{0}));
      return;
    }
    case Exit::Kind::halt:
      // L2 halted with HLT exiting off: L0 waits for the next event, for a
      // millisecond at most (a timer tick). The HLT then ends with no vector;
      // an interrupt that came is taken by the guest's next HLT. Guest code
      // can thus notice an interrupt that never comes.
      counters().add(Counter::l0_exits);
      block_until_event(std::chrono::milliseconds(1));
      if (l2_) l2_->task.resume_with(OpResult::success(0));
      return;
    case Exit::Kind::l1_op:
      counters().add(Counter::l1_exits);
      handle_l1_op(*l1_.pending());
      return;
    case Exit::Kind::l2:
      handle_l2_exit(e);
      return;
    case Exit::Kind::pi_software:
      counters().add(Counter::l0_exits);
      complete_posted_interrupts_in_software();
      return;
  }
}

void Vcpu::handle_l1_op(const GuestOp& op) {
  vmx::NestedVmx& n = nested();
  auto done = [&](const InstrResult& r) { l1_.resume_with(to_op_result(r)); };
  if (auto* o = op.get_if<GuestOp::Vmxon>()) return done(n.vmxon(o->gpa));
  if (op.is<GuestOp::Vmxoff>()) {
    l2_ = nullptr;
    return done(n.vmxoff());
  }
  if (auto* o = op.get_if<GuestOp::Vmclear>()) return done(n.vmclear(o->gpa));
  if (auto* o = op.get_if<GuestOp::Vmptrld>()) return done(n.vmptrld(o->gpa));
  if (op.is<GuestOp::Vmptrst>()) return done(n.vmptrst());
  if (auto* o = op.get_if<GuestOp::Vmread>()) return done(n.vmread(o->field));
  if (auto* o = op.get_if<GuestOp::Vmwrite>()) return done(n.vmwrite(o->field, o->value));
  if (auto* o = op.get_if<GuestOp::Invept>()) return done(n.invept(static_cast<uint64_t>(o->type), o->eptp));
  if (auto* o = op.get_if<GuestOp::Invvpid>()) return done(n.invvpid(static_cast<uint64_t>(o->type), o->vpid));
  if (op.is<GuestOp::Vmlaunch>() || op.is<GuestOp::Vmresume>()) {
    bool launch = op.is<GuestOp::Vmlaunch>();
    return complete_nested_entry(n.enter(launch));
  }
  if (auto* o = op.get_if<GuestOp::SendIpi>()) {
    m_.send_ipi(id(), o->dest_apic_id, o->vector);
    return l1_.resume_with(OpResult::success());
  }
  if (auto* o = op.get_if<GuestOp::Wrmsr>()) {
    if (o->msr == vmx::x2apic::kIcr) m_.send_ipi(id(), vmx::x2apic::icr_destination(o->value), vmx::x2apic::icr_vector(o->value));
    // Hyper-V's VP-assist page: where an enlightened L1 names its eVMCS.
    if (o->msr == vmx::kHvX64MsrVpAssistPage && !n.set_vp_assist_msr(o->value))
      return l1_.resume_with(OpResult::exception(kVectorGP));
    return l1_.resume_with(OpResult::success());
  }
  if (auto* o = op.get_if<GuestOp::Rdmsr>()) {
    if (o->msr == vmx::kHvX64MsrVpAssistPage) {
      if (!n.evmcs_enabled()) return l1_.resume_with(OpResult::exception(kVectorGP));
      return l1_.resume_with(OpResult::success(n.vp_assist_msr()));
    }
    return l1_.resume_with(OpResult::success(0));
  }
  if (op.is<GuestOp::Hlt>()) {
    if (auto vec = take_l1_interrupt()) return l1_.resume_with(OpResult::success(*vec));
    block_until_event();  // the HLT stays pending and is retried
    return;
  }
  if (op.is<GuestOp::Eoi>() || op.is<GuestOp::WriteCr8>() || op.is<GuestOp::Vmcall>())
    return l1_.resume_with(OpResult::success());
  if (op.is<GuestOp::ReadCr8>()) return l1_.resume_with(OpResult::success(0));
  l1_.resume_with(OpResult::exception(kVectorUD));
}

void Vcpu::complete_nested_entry(const vmx::EntryResult& r) {
  using K = vmx::EntryResult::Kind;
  switch (r.kind) {
    case K::failed: return l1_.resume_with(to_op_result(r.instr));
    case K::exit_to_l1: return l1_.resume_with(OpResult::success());
    case K::internal_error:
      counters().add(Counter::internal_errors);
      if (m_.config().retry_internal_errors) return;  // the VMLAUNCH/VMRESUME runs again
      m_.fail(fmt::format("vCPU {}: KVM internal error on nested entry: {}", id(), r.message));
      stop_ = true;
      return;
    case K::entered: break;
  }
  nested().set_run_pending(true);  // until L2 is on the hardware (nested state)
  // L1's VMLAUNCH/VMRESUME stays pending while L2 runs; it completes at the
  // next reflected exit.
  if (reflected_since_entry_ && l1_.pending()->is<GuestOp::Vmresume>()) counters().add(Counter::nested_round_trips);
  reflected_since_entry_ = false;
  // An L2 belongs to its vmcs12, or to its eVMCS when L1 is enlightened.
  l2_ = m_.l2_program(nested().nested_vmptr());
  if (!l2_) return;  // run_loop reports the missing program
  if (!l2_->task.started()) l2_->task.start();
  if (l2_->complete_pending) {
    l2_->complete_pending = false;
    l2_->task.resume_with(OpResult::success(l2_->complete_value));
  }
  if (take_notification()) complete_posted_interrupts_in_software();
}

// KVM's vmx_complete_nested_posted_interrupt: the notification arrived while
// L2 was not on the hardware, so L0 software moves PIR into the virtual IRR
// through the strategy's mappings of the descriptor and the virtual-APIC page.
void Vcpu::complete_posted_interrupts_in_software() {
  const vmx::Vmcs12& v = nested().vmcs12();
  Gpa desc = v.posted_intr_desc_addr;
  size_t off = page_offset(desc);
  uint64_t pir[4] = {};
  bool on = false;
  auto no_op = [](const vmx::PageView&) {};
  // KVM holds both pages before it touches either; we check that the
  // virtual-APIC page is reachable first, and if it goes away between taking
  // PIR and setting IRR, put the bits back: a failed completion must leave
  // the interrupts pending, never drop them.
  Status st = nested().access_page(vmx::L1Page::vapic, v.virtual_apic_page_addr, no_op);
  if (st) {
    st = nested().access_page(vmx::L1Page::pi_desc, desc, [&](const vmx::PageView& view) {
      on = view.fetch_and8(off + vmx::pi_desc::kControl, static_cast<uint8_t>(~vmx::pi_desc::kOn)) & vmx::pi_desc::kOn;
      if (on)
        for (int w = 0; w < 4; w++) pir[w] = view.exchange64(off + vmx::pi_desc::pir_word(64 * w), 0);
    });
  }
  if (st && on) {
    st = nested().access_page(vmx::L1Page::vapic, v.virtual_apic_page_addr, [&](const vmx::PageView& view) {
      for (int vec = 0; vec < 256; vec++)
        if ((pir[vec / 64] >> (vec % 64)) & 1) view.fetch_or32(vmx::vapic::word_of(vmx::vapic::kIrr, vec), 1u << (vec % 32));
    });
    if (!st) {
      Status back = nested().access_page(vmx::L1Page::pi_desc, desc, [&](const vmx::PageView& view) {
        for (int w = 0; w < 4; w++)
          if (pir[w]) view.fetch_or64(off + vmx::pi_desc::pir_word(64 * w), pir[w]);
        view.fetch_or64(off + vmx::pi_desc::kControl, vmx::pi_desc::kOn);
      });
      if (!back) counters().add(Counter::lost_posted_interrupts);
    }
  }
  if (!st) {
    // KVM's mmio_needed: an internal error for the VMM. A VMM that runs the
    // vCPU again gets the completion retried.
    counters().add(Counter::internal_errors);
    if (m_.config().retry_internal_errors) {
      deliver_interrupt(static_cast<uint8_t>(v.posted_intr_notification_vector));
      std::this_thread::yield();
      return;
    }
    m_.fail(fmt::format("vCPU {}: KVM internal error: posted-interrupt descriptor unreachable: {}", id(),
                        st.error().message));
    stop_ = true;
  }
}

void Vcpu::handle_l2_exit(const Exit& e) {
  vmx::NestedVmx& n = nested();
  if (n.route_exit(e.info, e.msr) == ExitTarget::l0) {
    counters().add(Counter::l0_exits);
    ExitReason reason = vmx::basic_exit_reason(e.info.exit_reason);
    if (reason == ExitReason::kMsrRead)
      l2_->task.resume_with(OpResult::success(l2_msrs_[e.msr]));
    else if (reason == ExitReason::kMsrWrite)
      l2_->task.resume_with(OpResult::success());
    else if (reason == ExitReason::kHlt)
      block_until_event();
    return;
  }
  // Reflect to L1: the exit information goes into vmcs12, the pages are put,
  // and L1 resumes after its VMLAUNCH/VMRESUME.
  if (e.complete_op && l2_) {
    l2_->complete_pending = true;
    l2_->complete_value = 0;
  }
  n.reflect_exit(e.info);
  l2_ = nullptr;
  reflected_since_entry_ = true;
  l1_.resume_with(OpResult::success());
}

}  // namespace nestcache::cpu
