#include "cpu/cpu_model.h"

#include <atomic>
#include <optional>
#include <chrono>
#include <cstring>

#include "base/check.h"
#include "cpu/machine.h"

namespace nestcache::cpu {

using vmx::ExitInfo;
using vmx::ExitReason;
using Exit = Vcpu::Exit;

namespace {

Exit l2_exit(ExitReason r, uint64_t qual, bool complete, uint32_t msr = 0) {
  Exit e;
  e.kind = Exit::Kind::l2;
  e.info = ExitInfo::of(r, qual);
  e.msr = msr;
  e.complete_op = complete;
  return e;
}

}  // namespace

std::byte* CpuModel::frame(Vcpu& v, const host::FrameTag& tag, const char* what) {
  v.m_.vm().phys().check(tag, what, &v.counters());
  return v.m_.hw_.frame(tag.pfn);
}

// --- translation ----------------------------------------------------------------------

CpuModel::Xlate CpuModel::translate_l1(Vcpu& v, Gfn gfn, bool write) {
  if (auto it = v.tlb01_.find(gfn); it != v.tlb01_.end()) {
    if (write && !it->second.writable) return {Xlate::Kind::ept01_miss, {}, gfn, true};
    return {Xlate::Kind::ok, it->second.tag, gfn};
  }
  auto e = v.m_.vm().ept01_lookup(gfn);
  if (!e || (write && !e->writable)) return {Xlate::Kind::ept01_miss, {}, gfn, write};
  v.tlb01_.emplace(gfn, Vcpu::Tlb01Entry{e->tag, e->writable});
  return {Xlate::Kind::ok, e->tag, gfn};
}

CpuModel::Xlate CpuModel::translate_l2(Vcpu& v, Gpa l2_gpa, bool write) {
  const vmx::Vmcs02& vmcs02 = v.nested().vmcs02();
  if (v.tlb02_eptp_ != vmcs02.eptp12) {
    v.tlb02_.clear();
    v.tlb02_eptp_ = vmcs02.eptp12;
  }
  Gfn l2_gfn = gpa_to_gfn(l2_gpa);
  if (auto it = v.tlb02_.find(l2_gfn); it != v.tlb02_.end()) {
    if (!write) return {Xlate::Kind::ok, it->second.tag, it->second.l1_gfn};
    return translate_l1(v, it->second.l1_gfn, true);  // a store also needs the L1 page writable
  }
  Gpa table = vmcs02.eptp12;
  for (int level = vmx::ept::kLevels; level >= 1; level--) {
    Gpa entry_gpa = table + vmx::ept::index(l2_gpa, level) * 8;
    Xlate t = translate_l1(v, gpa_to_gfn(entry_gpa));
    if (t.kind != Xlate::Kind::ok) return t;
    // L1 may rewrite this entry from another vCPU while the walk reads it
    // (a discard zapping EPT12, as the hardware walker races software on a
    // real CPU): an atomic load, like every other access to guest memory.
    auto* entry_ptr = reinterpret_cast<uint64_t*>(frame(v, t.tag, "EPT12 walk") + page_offset(entry_gpa));
    uint64_t entry = std::atomic_ref<uint64_t>(*entry_ptr).load(std::memory_order_relaxed);
    if (!vmx::ept::present(entry)) return {Xlate::Kind::ept12_violation, {}, 0};
    if (vmx::ept::misconfigured(entry)) return {Xlate::Kind::ept12_misconfig, {}, 0};
    table = entry & vmx::ept::kAddressMask;
  }
  Xlate leaf = translate_l1(v, gpa_to_gfn(table), write);
  if (leaf.kind != Xlate::Kind::ok) return leaf;
  v.tlb02_.emplace(l2_gfn, Vcpu::Tlb02Entry{leaf.tag, gpa_to_gfn(table)});
  return leaf;
}

// --- memory access ------------------------------------------------------------------------

CpuModel::Outcome CpuModel::access(Vcpu& v, const GuestOp& op, const host::FrameTag& tag, Gpa gpa) {
  std::byte* p = frame(v, tag, "guest memory") + page_offset(gpa);
  // Guest memory is shared between vCPU threads as real memory is between
  // CPUs: every access is an atomic access of its size (relaxed, as plain
  // x86 loads and stores to aligned addresses are).
  auto load = [&](uint8_t size) -> uint64_t {
    switch (size) {
      case 1: return std::atomic_ref<uint8_t>(*reinterpret_cast<uint8_t*>(p)).load(std::memory_order_relaxed);
      case 2: return std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(p)).load(std::memory_order_relaxed);
      case 4: return std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(p)).load(std::memory_order_relaxed);
      default: return std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(p)).load(std::memory_order_relaxed);
    }
  };
  auto store = [&](uint8_t size, uint64_t x) {
    switch (size) {
      case 1: std::atomic_ref<uint8_t>(*reinterpret_cast<uint8_t*>(p)).store(x, std::memory_order_relaxed); break;
      case 2: std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(p)).store(x, std::memory_order_relaxed); break;
      case 4: std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(p)).store(x, std::memory_order_relaxed); break;
      default: std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(p)).store(x, std::memory_order_relaxed); break;
    }
  };
  // Every access goes through the machine's monitor table: a store wakes the
  // vCPUs that MWAIT on its line, and on a watched line the clocks of reader
  // and writer meet (cpu/monitor.h).
  MonitorTable& monitors = v.m_.monitors();
  // No instruction moves another width: #UD, never a division by zero
  // (size 0) or an 8-byte access past the frame (size 6 at offset 4092).
  if (auto* r = op.get_if<GuestOp::Read>()) {
    if (!is_access_width(r->size)) return OpResult::exception(kVectorUD);
    if (gpa % r->size) return OpResult::exception(kVectorGP);  // the model needs natural alignment
    uint64_t value = 0;
    monitors.access(tag.pfn, page_offset(gpa), v.clock_, [&] {
      value = load(r->size);
      return false;
    });
    return OpResult::success(value);
  }
  if (auto* w = op.get_if<GuestOp::Write>()) {
    if (!is_access_width(w->size)) return OpResult::exception(kVectorUD);
    if (gpa % w->size) return OpResult::exception(kVectorGP);
    monitors.access(tag.pfn, page_offset(gpa), v.clock_, [&] {
      store(w->size, w->value);
      return true;
    });
    return OpResult::success();
  }
  auto* c = op.get_if<GuestOp::CmpXchg>();
  NC_CHECK(c);
  if (gpa % 8) return OpResult::exception(kVectorGP);
  // Guest memory shared between vCPU threads is accessed like real memory:
  // a locked compare-exchange on the frame itself.
  std::atomic_ref<uint64_t> word(*reinterpret_cast<uint64_t*>(p));
  uint64_t expected = c->expected;
  monitors.access(tag.pfn, page_offset(gpa), v.clock_, [&] { return word.compare_exchange_strong(expected, c->desired); });
  return OpResult::success(expected);
}

CpuModel::Outcome CpuModel::mwait(Vcpu& v, const GuestOp::Mwait& op, const host::FrameTag& tag) {
  if (op.gpa % 8) return OpResult::exception(kVectorGP);
  std::byte* p = frame(v, tag, "monitored line") + page_offset(op.gpa);
  std::atomic_ref<uint64_t> word(*reinterpret_cast<uint64_t*>(p));
  MonitorTable& monitors = v.m_.monitors();
  const uint64_t offset = page_offset(op.gpa);
  if (!monitors.arm(tag.pfn, offset, &v, v.clock_, [&] { return word.load() == op.expected; }))
    return OpResult::success();  // it already changed: no sleep
  std::optional<std::chrono::steady_clock::time_point> deadline;
  if (op.timeout_ns) deadline = std::chrono::steady_clock::now() + std::chrono::nanoseconds(op.timeout_ns);
  // Nothing may touch the monitored frame while the thread sleeps: a
  // migration zaps EPT01 and kicks this vCPU awake first.
  v.park(false, deadline);
  monitors.disarm(tag.pfn, offset, &v, v.clock_);
  return OpResult::success();
}

CpuModel::Outcome CpuModel::sleep(Vcpu& v, uint64_t timeout_ns) {
  if (timeout_ns) v.park(false, std::chrono::steady_clock::now() + std::chrono::nanoseconds(timeout_ns));
  return OpResult::success();
}

CpuModel::Outcome CpuModel::tpause(Vcpu& v, uint64_t deadline_ns) {
  if (v.m_.config().clock == ClockKind::modelled) {
    v.clock_.advance_to(deadline_ns, TimePart::idle);  // the delay is modelled time, not a wait
    return OpResult::success();
  }
  uint64_t now = v.now_ns();
  if (deadline_ns > now) v.park(false, std::chrono::steady_clock::now() + std::chrono::nanoseconds(deadline_ns - now));
  return OpResult::success();
}

std::optional<CpuModel::Outcome> CpuModel::execute_common(Vcpu& v, const GuestOp& op) {
  if (op.is<GuestOp::Now>()) return OpResult::success(v.now_ns());
  if (op.is<GuestOp::Pause>() || op.is<GuestOp::Yield>()) return OpResult::success();
  if (auto* t = op.get_if<GuestOp::Tpause>()) return tpause(v, t->deadline_ns);
  if (auto* m = op.get_if<GuestOp::Mwait>(); m && m->gpa == kInvalidGpa) return sleep(v, m->timeout_ns);
  return std::nullopt;
}

uint64_t CpuModel::cost(const GuestCosts& costs, const GuestOp& op) {
  if (op.is<GuestOp::CmpXchg>()) return costs.locked_op_ns;
  if (op.is<GuestOp::Pause>()) return costs.pause_ns;
  if (op.is<GuestOp::Yield>()) return 0;  // not an instruction: an operation boundary
  return costs.op_ns;
}

static Gpa op_gpa(const GuestOp& op) {
  if (auto* r = op.get_if<GuestOp::Read>()) return r->gpa;
  if (auto* w = op.get_if<GuestOp::Write>()) return w->gpa;
  if (auto* m = op.get_if<GuestOp::Mwait>()) return m->gpa;
  return op.get_if<GuestOp::CmpXchg>()->gpa;
}

// Operations that reach memory through the guest's translation: loads,
// stores, locked RMWs and a MONITOR of a real address.
static bool is_memory_op(const GuestOp& op) {
  if (auto* m = op.get_if<GuestOp::Mwait>()) return m->gpa != kInvalidGpa;
  return op.is<GuestOp::Read>() || op.is<GuestOp::Write>() || op.is<GuestOp::CmpXchg>();
}

// A locked compare-exchange writes as far as paging is concerned, whether or
// not the comparison succeeds.
static bool is_store(const GuestOp& op) { return op.is<GuestOp::Write>() || op.is<GuestOp::CmpXchg>(); }

// The exit reason of a VMX instruction L2 executes: every one exits to L1
// (nestcache's L2 has no VMCS of its own, and no VMCS shadowing).
static std::optional<ExitReason> vmx_instruction_exit(const GuestOp& op) {
  if (op.is<GuestOp::Vmxon>()) return ExitReason::kVmxon;
  if (op.is<GuestOp::Vmxoff>()) return ExitReason::kVmxoff;
  if (op.is<GuestOp::Vmclear>()) return ExitReason::kVmclear;
  if (op.is<GuestOp::Vmptrld>()) return ExitReason::kVmptrld;
  if (op.is<GuestOp::Vmptrst>()) return ExitReason::kVmptrst;
  if (op.is<GuestOp::Vmread>()) return ExitReason::kVmread;
  if (op.is<GuestOp::Vmwrite>()) return ExitReason::kVmwrite;
  if (op.is<GuestOp::Vmlaunch>()) return ExitReason::kVmlaunch;
  if (op.is<GuestOp::Vmresume>()) return ExitReason::kVmresume;
  if (op.is<GuestOp::Invept>()) return ExitReason::kInvept;
  if (op.is<GuestOp::Invvpid>()) return ExitReason::kInvvpid;
  return std::nullopt;
}

// The exit to L0 for an L1 gfn EPT01 does not map yet (L1's access or the
// second stage of L2's).
Vcpu::Exit CpuModel::ept01_miss_exit(const Xlate& x) {
  Exit e;
  e.kind = Exit::Kind::ept01_miss;
  e.gfn = x.gfn;
  e.write = x.write;
  return e;
}

// --- L1 ---------------------------------------------------------------------------------------

CpuModel::Outcome CpuModel::execute_l1(Vcpu& v, const GuestOp& op) {
  if (is_memory_op(op)) {
    Gpa gpa = op_gpa(op);
    Xlate x = translate_l1(v, gpa_to_gfn(gpa), is_store(op));
    if (x.kind == Xlate::Kind::ept01_miss) return ept01_miss_exit(x);
    if (auto* m = op.get_if<GuestOp::Mwait>()) return mwait(v, *m, x.tag);
    return access(v, op, x.tag, gpa);
  }
  if (auto done = execute_common(v, op)) return *done;
  Exit e;  // everything else is L0's to emulate
  e.kind = Exit::Kind::l1_op;
  return e;
}

// --- L2 ---------------------------------------------------------------------------------------

CpuModel::Outcome CpuModel::execute_l2_memory(Vcpu& v, const GuestOp& op) {
  const vmx::Vmcs02& vmcs02 = v.nested().vmcs02();
  Gpa gpa = op_gpa(op);
  Xlate x = translate_l2(v, gpa, is_store(op));
  if (x.kind == Xlate::Kind::ept12_violation) {
    Exit e = l2_exit(ExitReason::kEptViolation, op.is<GuestOp::Read>() ? 1 : 2, false);
    e.info.guest_physical_address = gpa;
    return e;
  }
  if (x.kind == Xlate::Kind::ept12_misconfig) {
    // An MMIO page of L1's (a misconfigured EPT12 leaf): L1 emulates the
    // access, so it completes when L1 resumes L2 (a load reads 0).
    Exit e = l2_exit(ExitReason::kEptMisconfig, 0, true);
    e.info.guest_physical_address = gpa;
    return e;
  }
  if (x.kind == Xlate::Kind::ept01_miss) return ept01_miss_exit(x);
  // The hardware compares every access with the APIC-access address it
  // was given; if that frame no longer backs the page, the comparison is
  // against a stale pfn (the map strategy after a migration or discard).
  if (vmcs02.apic_access.valid()) v.m_.vm().phys().check(vmcs02.apic_access.tag, "APIC-access page", &v.counters());
  if (vmcs02.apic_access.valid() && x.tag.pfn == vmcs02.apic_access.pfn()) {
    // An access to the APIC-access page: the processor recognises it by
    // the physical address vmcs02 holds and exits (SDM 30.4).
    return l2_exit(ExitReason::kApicAccess,
                   vmx::apic_access_qual::make(page_offset(gpa), op.is<GuestOp::Read>()
                                                                      ? vmx::apic_access_qual::kLinearRead
                                                                      : vmx::apic_access_qual::kLinearWrite), true);
  }
  if (auto* m = op.get_if<GuestOp::Mwait>()) return mwait(v, *m, x.tag);
  return access(v, op, x.tag, gpa);
}

CpuModel::Outcome CpuModel::execute_l2(Vcpu& v, const GuestOp& op) {
  const vmx::Vmcs02& vmcs02 = v.nested().vmcs02();
  if (is_memory_op(op)) return execute_l2_memory(v, op);
  if (auto* r = op.get_if<GuestOp::Rdmsr>()) {
    if (!vmcs02.use_msr_bitmap || vmx::msr_bitmap::intercepts(vmcs02.msr_bitmap, r->msr, false)) return l2_exit(ExitReason::kMsrRead, 0, true, r->msr);
    return OpResult::success(v.l2_msrs_[r->msr]);
  }
  if (auto* w = op.get_if<GuestOp::Wrmsr>()) {
    if (!vmcs02.use_msr_bitmap || vmx::msr_bitmap::intercepts(vmcs02.msr_bitmap, w->msr, true)) {
      Exit e = l2_exit(ExitReason::kMsrWrite, 0, true, w->msr);
      v.l2_msrs_[w->msr] = w->value;  // what L0 stores if the exit stays with L0
      return e;
    }
    v.l2_msrs_[w->msr] = w->value;
    return OpResult::success();
  }
  if (auto* c = op.get_if<GuestOp::WriteCr8>()) {
    if (vmcs02.proc & vmx::proc::kUseTprShadow) {
      // The TPR shadow: the processor writes VTPR into the virtual-APIC page
      // through the pfn L0 put in vmcs02 (SDM 30.3).
      std::byte* page = frame(v, vmcs02.vapic.tag, "virtual-APIC page");
      page[vmx::vapic::kTpr] = static_cast<std::byte>(vmx::vapic::vtpr_of_cr8(c->value));
      if (!(vmcs02.proc2 & vmx::proc2::kVirtualInterruptDelivery) && (c->value & 0xf) < (vmcs02.tpr_threshold & 0xf))
        return l2_exit(ExitReason::kTprBelowThreshold, 0, true);
      return OpResult::success();
    }
    if (vmcs02.proc & vmx::proc::kCr8LoadExiting) return l2_exit(ExitReason::kCrAccess, vmx::cr_access_qual::make(8, vmx::cr_access_qual::kMovToCr), true);
    v.l2_cr8_ = c->value & 0xf;
    return OpResult::success();
  }
  if (op.is<GuestOp::ReadCr8>()) {
    if (vmcs02.proc & vmx::proc::kUseTprShadow)
      return OpResult::success(static_cast<uint64_t>(frame(v, vmcs02.vapic.tag, "virtual-APIC page")[vmx::vapic::kTpr]) >> 4);
    if (vmcs02.proc & vmx::proc::kCr8StoreExiting) return l2_exit(ExitReason::kCrAccess, vmx::cr_access_qual::make(8, vmx::cr_access_qual::kMovFromCr), true);
    return OpResult::success(v.l2_cr8_);
  }
  if (auto* s = op.get_if<GuestOp::SendIpi>()) {
    // x2APIC ICR write: goes through the MSR bitmap like any WRMSR.
    GuestOp icr{GuestOp::Wrmsr{vmx::x2apic::kIcr, vmx::x2apic::icr(s->dest_apic_id, s->vector)}};
    return execute_l2(v, icr);
  }
  if (op.is<GuestOp::Vmcall>()) return l2_exit(ExitReason::kVmcall, 0, true);
  if (op.is<GuestOp::Hlt>()) {
    if (auto vec = take_virtual_interrupt(v)) return OpResult::success(*vec);
    if (vmcs02.proc & vmx::proc::kHltExiting) return l2_exit(ExitReason::kHlt, 0, true);
    Exit e;
    e.kind = Exit::Kind::halt;
    return e;
  }
  if (op.is<GuestOp::Eoi>()) return OpResult::success();
  if (auto done = execute_common(v, op)) return *done;
  // VMX instructions in L2 exit to L1, which emulates them for its guest
  // (SDM 25.1.3: they cause VM exits unconditionally in VMX non-root).
  if (auto reason = vmx_instruction_exit(op)) return l2_exit(*reason, 0, true);
  return OpResult::exception(kVectorUD);
}

// --- interrupts ---------------------------------------------------------------------------------

void CpuModel::process_posted_interrupts(Vcpu& v) {
  const vmx::Vmcs02& vmcs02 = v.nested().vmcs02();
  if (!(vmcs02.pin & vmx::pin::kPostedInterrupts) || !vmcs02.pi_desc.valid() || !vmcs02.vapic.valid()) return;
  std::byte* desc = frame(v, vmcs02.pi_desc.tag, "posted-interrupt descriptor") + vmcs02.pi_desc.offset;
  std::atomic_ref<uint8_t> on(*reinterpret_cast<uint8_t*>(desc + vmx::pi_desc::kControl));
  if (!(on.fetch_and(~uint8_t{1}) & 1)) return;
  std::byte* vapic = frame(v, vmcs02.vapic.tag, "virtual-APIC page");
  for (int w = 0; w < 4; w++) {
    std::atomic_ref<uint64_t> pir(*reinterpret_cast<uint64_t*>(desc + vmx::pi_desc::pir_word(64 * w)));
    uint64_t bits = pir.exchange(0);
    for (int b = 0; b < 64; b++) {
      if (!((bits >> b) & 1)) continue;
      int vec = w * 64 + b;
      std::atomic_ref<uint32_t> irr(*reinterpret_cast<uint32_t*>(vapic + vmx::vapic::word_of(vmx::vapic::kIrr, vec)));
      irr.fetch_or(1u << (vec % 32));
    }
  }
}

std::optional<uint8_t> CpuModel::take_virtual_interrupt(Vcpu& v) {
  const vmx::Vmcs02& vmcs02 = v.nested().vmcs02();
  if (!vmcs02.vapic.valid() || !(vmcs02.proc2 & vmx::proc2::kVirtualInterruptDelivery)) return std::nullopt;
  std::byte* vapic = frame(v, vmcs02.vapic.tag, "virtual-APIC page");
  for (int reg = 7; reg >= 0; reg--) {
    std::atomic_ref<uint32_t> irr(*reinterpret_cast<uint32_t*>(vapic + vmx::vapic::word_of(vmx::vapic::kIrr, 32 * reg)));
    uint32_t bits = irr.load();
    if (!bits) continue;
    int bit = 31 - __builtin_clz(bits);
    irr.fetch_and(~(1u << bit));
    v.counters().add(Counter::posted_interrupts_delivered);
    return static_cast<uint8_t>(reg * 32 + bit);
  }
  return std::nullopt;
}

}  // namespace nestcache::cpu
