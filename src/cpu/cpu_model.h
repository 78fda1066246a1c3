// CpuModel: executes one guest operation against the current VMCS, as the
// processor would, and says whether it completed or caused a VM exit.
//
// Memory: L1 addresses go through EPT01 (Vm's map, cached in the vCPU's
// TLB); L2 addresses through EPT12 — 4-level tables in L1 memory, read
// through the hardware view — then EPT01. Every access to a frame checks
// the frame tag it was translated with; a mismatch is a stale access.
// vmcs02 decides the rest: MSR-bitmap interception, the TPR shadow written
// into the virtual-APIC pfn, APIC-access detection by pfn, posted-interrupt
// processing from the descriptor's pfn. MWAIT parks the vCPU thread on a
// monitored line (MonitorTable); guest accesses to watched lines hand clocks
// over.
#pragma once

#include <variant>

#include "cpu/machine.h"

namespace nestcache::cpu {

class CpuModel {
 public:
  using Outcome = std::variant<OpResult, Vcpu::Exit>;
  static Outcome execute_l1(Vcpu& v, const GuestOp& op);
  static Outcome execute_l2(Vcpu& v, const GuestOp& op);
  // What `op`, completed without an exit, costs in modelled time.
  static uint64_t cost(const GuestCosts& costs, const GuestOp& op);
  // Posted-interrupt processing by the "hardware" (vmcs02's descriptor pfn).
  static void process_posted_interrupts(Vcpu& v);
  // Delivers the highest pending virtual interrupt to L2, if any.
  static std::optional<uint8_t> take_virtual_interrupt(Vcpu& v);

 private:
  struct Xlate {
    enum class Kind { ok, ept01_miss, ept12_violation, ept12_misconfig } kind = Kind::ok;
    host::FrameTag tag;
    Gfn gfn = 0;  // ept01_miss: the L1 gfn to fill
    bool write = false;  // ept01_miss: for a store
  };
  // `write`: the access stores; an EPT01 entry of a read-only memslot does
  // not allow it, and the access exits to L0 (which makes it an MMIO exit).
  static Xlate translate_l1(Vcpu& v, Gfn gfn, bool write = false);
  static Xlate translate_l2(Vcpu& v, Gpa l2_gpa, bool write);
  static Vcpu::Exit ept01_miss_exit(const Xlate& x);
  static Outcome access(Vcpu& v, const GuestOp& op, const host::FrameTag& tag, Gpa gpa);
  // An L2 load, store, RMW or MWAIT: EPT12 then EPT01, the APIC-access page.
  static Outcome execute_l2_memory(Vcpu& v, const GuestOp& op);
  // MONITOR + MWAIT on the word at `gpa`, already translated to `tag`.
  static Outcome mwait(Vcpu& v, const GuestOp::Mwait& op, const host::FrameTag& tag);
  // A sleep with nothing monitored (Mwait on kInvalidGpa), and TPAUSE.
  static Outcome sleep(Vcpu& v, uint64_t timeout_ns);
  static Outcome tpause(Vcpu& v, uint64_t deadline_ns);
  // The operations L1 and L2 execute alike without an exit (Now, Pause,
  // Yield, Tpause, an unmonitored Mwait); nullopt for the others.
  static std::optional<Outcome> execute_common(Vcpu& v, const GuestOp& op);
  static std::byte* frame(Vcpu& v, const host::FrameTag& tag, const char* what);
};

}  // namespace nestcache::cpu
