// What L0 does with each VM exit of a vCPU: the L1 instructions it emulates
// (VMX instructions, MSRs, IPIs, HLT), the L2 exits it handles itself or
// reflects to L1, the completion of a nested entry, and posted interrupts
// completed in software. Handlers never run guest code: they leave the
// exiting operation's answer for run_guest (vcpu.cc) to deliver.
#include "base/check.h"
#include "cpu/cpu_model.h"
#include "cpu/machine.h"

namespace nestcache::cpu {

using vmx::ExitReason;
using vmx::ExitTarget;

void Vcpu::handle_exit(const Exit& e) {
  const bool l2 = nested().guest_mode();
  switch (e.kind) {
    case Exit::Kind::none: return;
    case Exit::Kind::kick:
      counters().add(l2 ? Counter::l0_exits : Counter::l1_exits);
      return;
    case Exit::Kind::ept01_miss: {
      counters().add(l2 ? Counter::l0_exits : Counter::l1_exits);
      // With the vCPU's last-used memslot, as KVM's vCPU lookups do.
      if (m_.vm().ept01_fault(e.gfn, e.write, &memslot_hint())) return;  // the operation retries and finds the entry
      // No memslot, or a store to a read-only one: an MMIO exit to the VMM,
      // which completes the access (reads see all ones, writes are dropped)
      // and resumes the guest.
      counters().add(Counter::mmio_exits);
      OpResult all_ones = OpResult::success(~uint64_t{0});
      if (l2)
        l2_->answer = all_ones;
      else
        answer_l1(all_ones);
      return;
    }
    case Exit::Kind::halt:
      // L2 halted with HLT exiting off: L0 waits for the next event, for a
      // millisecond at most (a timer tick). The HLT then ends with no vector;
      // an interrupt that came is taken by the guest's next HLT. Guest code
      // can thus notice an interrupt that never comes.
      counters().add(Counter::l0_exits);
      park(true, std::chrono::steady_clock::now() + std::chrono::milliseconds(1));
      if (l2_) l2_->answer = OpResult::success(0);
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

// --- L1 instructions ------------------------------------------------------------------------

void Vcpu::handle_l1_op(const GuestOp& op) {
  vmx::NestedVmx& n = nested();
  if (auto* o = op.get_if<GuestOp::Vmxon>()) return answer_l1(n.vmxon(o->gpa));
  if (op.is<GuestOp::Vmxoff>()) {
    l2_ = nullptr;
    return answer_l1(n.vmxoff());
  }
  if (auto* o = op.get_if<GuestOp::Vmclear>()) return answer_l1(n.vmclear(o->gpa));
  if (auto* o = op.get_if<GuestOp::Vmptrld>()) return answer_l1(n.vmptrld(o->gpa));
  if (op.is<GuestOp::Vmptrst>()) return answer_l1(n.vmptrst());
  if (auto* o = op.get_if<GuestOp::Vmread>()) return answer_l1(n.vmread(o->field));
  if (auto* o = op.get_if<GuestOp::Vmwrite>()) return answer_l1(n.vmwrite(o->field, o->value));
  if (auto* o = op.get_if<GuestOp::Invept>()) return answer_l1(n.invept(static_cast<uint64_t>(o->type), o->eptp));
  if (auto* o = op.get_if<GuestOp::Invvpid>()) return answer_l1(n.invvpid(static_cast<uint64_t>(o->type), o->vpid, o->gla));
  if (op.is<GuestOp::Vmlaunch>() || op.is<GuestOp::Vmresume>())
    return complete_nested_entry(n.enter(op.is<GuestOp::Vmlaunch>()));
  if (auto* o = op.get_if<GuestOp::SendIpi>()) return answer_l1(l1_wrmsr(vmx::x2apic::kIcr, vmx::x2apic::icr(o->dest_apic_id, o->vector)));
  if (auto* o = op.get_if<GuestOp::Wrmsr>()) return answer_l1(l1_wrmsr(o->msr, o->value));
  if (auto* o = op.get_if<GuestOp::Rdmsr>()) return answer_l1(l1_rdmsr(o->msr));
  if (op.is<GuestOp::Hlt>()) {
    // KVM blocks the vCPU until an interrupt (or a request) and enters it
    // with the interrupt: one exit. A request alone leaves the HLT to run
    // again after it.
    for (;;) {
      run_timer();
      if (auto vec = apic_.take()) return answer_l1(OpResult::success(*vec));
      if (has_requests()) return;
      auto timer = apic_.timer().deadline();
      if (m_.config().clock == ClockKind::modelled && timer) {
        // Modelled time stands still while the thread sleeps: if nothing
        // but the timer comes promptly, the vCPU idles until the timer.
        if (!park(true, std::chrono::steady_clock::now() + std::chrono::milliseconds(1)))
          clock_.advance_to(*timer, TimePart::idle);
        continue;
      }
      park(true);
    }
  }
  if (op.is<GuestOp::Eoi>() || op.is<GuestOp::WriteCr8>() || op.is<GuestOp::Vmcall>())
    return answer_l1(OpResult::success());
  if (op.is<GuestOp::ReadCr8>()) return answer_l1(OpResult::success(0));
  answer_l1(OpResult::undefined(fmt::format("{} is not emulated for L1", op.name())));
}

OpResult Vcpu::l1_wrmsr(uint32_t msr, uint64_t value) {
  switch (msr) {
    case vmx::x2apic::kIcr:
      m_.send_ipi(id(), vmx::x2apic::icr_destination(value), vmx::x2apic::icr_vector(value));
      return OpResult::success();
    case vmx::x2apic::kLvtTimer: apic_.timer().write_lvt(static_cast<uint32_t>(value)); return OpResult::success();
    case vmx::x2apic::kTimerInitialCount:
      apic_.timer().write_initial_count(static_cast<uint32_t>(value), now_ns());
      return OpResult::success();
    case vmx::x2apic::kTimerDivide: apic_.timer().write_divide(static_cast<uint32_t>(value)); return OpResult::success();
    case vmx::kHvX64MsrVpAssistPage:
      // Hyper-V's VP-assist page: where an enlightened L1 names its eVMCS.
      if (!nested().set_vp_assist_msr(value))
        return OpResult::exception(kVectorGP, 0, fmt::format("VP-assist page value {:#x} refused", value));
      return OpResult::success();
    default: return OpResult::success();
  }
}

OpResult Vcpu::l1_rdmsr(uint32_t msr) {
  switch (msr) {
    case vmx::x2apic::kLvtTimer: return OpResult::success(apic_.timer().lvt());
    case vmx::x2apic::kTimerInitialCount: return OpResult::success(apic_.timer().initial_count());
    case vmx::x2apic::kTimerCurrentCount: return OpResult::success(apic_.timer().current_count(now_ns()));
    case vmx::x2apic::kTimerDivide: return OpResult::success(apic_.timer().divide_config());
    case vmx::kHvX64MsrVpAssistPage:
      if (!nested().evmcs_enabled()) return OpResult::exception(kVectorGP, 0, "no enlightened VMCS on this vCPU");
      return OpResult::success(nested().vp_assist_msr());
    default: return OpResult::success(0);
  }
}

// --- nested entry and exit -------------------------------------------------------------------

void Vcpu::complete_nested_entry(const vmx::EntryResult& r) {
  using K = vmx::EntryResult::Kind;
  switch (r.kind) {
    case K::failed: return answer_l1(r.result);
    case K::exit_to_l1: return answer_l1(OpResult::success());
    case K::internal_error:
      // A VMM that runs the vCPU again re-executes the VMLAUNCH/VMRESUME.
      return internal_error(fmt::format("on nested entry: {}", r.result.why), r.error);
    case K::entered: break;
  }
  internal_error_streak_ = 0;
  // L1's VMLAUNCH/VMRESUME stays pending while L2 runs; it completes at the
  // next reflected exit.
  if (reflected_since_entry_ && l1_.pending()->is<GuestOp::Vmresume>()) counters().add(Counter::nested_round_trips);
  reflected_since_entry_ = false;
  // An L2 belongs to its vmcs12, or to its eVMCS when L1 is enlightened.
  l2_ = m_.l2_program(nested().nested_vmptr());
  if (!l2_) return;  // run_loop reports the missing program
  if (take_notification()) complete_posted_interrupts_in_software();
}

bool Vcpu::take_notification() {
  const vmx::Vmcs12& v12 = nested().vmcs12();
  if (!nested().guest_mode() || !(v12.pin_based_controls & vmx::pin::kPostedInterrupts)) return false;
  return apic_.take_vector(static_cast<uint8_t>(v12.posted_intr_notification_vector));
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
      for (unsigned vec = 0; vec < 256; vec++)
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
    if (m_.config().retry_internal_errors) apic_.deliver(static_cast<uint8_t>(v.posted_intr_notification_vector));
    internal_error(fmt::format("completing posted interrupts: posted-interrupt descriptor unreachable: {}", st.error().to_string()),
                   st.error().code);
  }
}

void Vcpu::handle_l2_exit(const Exit& e) {
  vmx::NestedVmx& n = nested();
  if (n.route_exit(e.info, e.msr) == ExitTarget::l0) {
    counters().add(Counter::l0_exits);
    ExitReason reason = vmx::basic_exit_reason(e.info.exit_reason);
    if (reason == ExitReason::kMsrRead)
      l2_->answer = OpResult::success(l2_msrs_[e.msr]);
    else if (reason == ExitReason::kMsrWrite)
      l2_->answer = OpResult::success();
    else if (reason == ExitReason::kHlt)
      park(true);
    return;
  }
  // Reflect to L1: the exit information goes into vmcs12, the pages are put,
  // and L1 resumes after its VMLAUNCH/VMRESUME. An instruction L1 emulates
  // (VMCALL, an MSR access, an APIC access...) completes when L1 resumes this L2.
  if (e.complete_op && l2_) l2_->answer = OpResult::success(0);
  n.reflect_exit(e.info);
  l2_ = nullptr;
  reflected_since_entry_ = true;
  answer_l1(OpResult::success());
}

}  // namespace nestcache::cpu
