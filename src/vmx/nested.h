// NestedVmx: one vCPU's nested-VMX state and the emulation L0 runs for L1
// (DESIGN.md §4): the VMX instructions, nested VM entry (checks -> get vmcs12
// pages -> build vmcs02 -> last check) and nested VM exit (reflect -> put
// pages). A nested entry reads top to bottom in enter().
//
// The cpu layer calls in here from the vCPU's own thread: on L1 exits for
// VMX instructions, before each hardware entry into L2 (last_check), on the
// refresh-guest-pages request, and on every L2 exit. Nothing here is
// thread-safe; everything runs on the vCPU thread that owns the state.
#pragma once

#include <array>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "vm/vcpu.h"
#include "vm/vm.h"
#include "vmx/entry_checks.h"
#include "vmx/evmcs.h"
#include "vmx/nested_state_format.h"
#include "vmx/op_result.h"
#include "vmx/page_strategy.h"
#include "vmx/vmcs12.h"

namespace nestcache::vmx {

// The VMCS the (simulated) hardware runs L2 with: what L0 built from vmcs12.
struct Vmcs02 {
  uint32_t pin = 0, proc = 0, proc2 = 0;
  bool use_msr_bitmap = false;
  std::array<uint8_t, kPageSize> msr_bitmap{};  // L0's own merged page
  HwPage apic_access;     // valid iff APIC-access virtualization is on
  HwPage vapic;           // valid iff the TPR shadow is on
  bool vapic_bad_address = false;  // KVM's INVALID_GPA fallback: entry fails
  HwPage pi_desc;         // valid iff posted interrupts are on
  uint16_t pi_notification_vector = 0;
  uint32_t tpr_threshold = 0;
  Gpa eptp12 = 0;         // root of L1's EPT12 tables (L1 gpa)
  uint16_t vpid = 0;
  uint64_t generation = 0;  // bumped whenever L0 rewrites the pfns
};

// The outcome of VMLAUNCH/VMRESUME.
struct EntryResult {
  enum class Kind {
    entered,         // vmcs02 built, vCPU in guest mode: run L2
    failed,          // VMfail / #UD: `result` says which; L1 continues
    exit_to_l1,      // entry failed like a VM exit (exit reason 33...): L1 continues
    internal_error,  // L0 could not build vmcs02 (no APIC-access page): to the VMM
  };
  Kind kind = Kind::entered;
  // What L1's VMLAUNCH/VMRESUME ends with; `result.why` explains a failure,
  // an exit_to_l1 or an internal error.
  OpResult result;
  int error = 0;  // an internal error's errno (ENOMEM when a page could not be mapped)

  static EntryResult entered() { return {Kind::entered, OpResult::success()}; }
  static EntryResult failed(OpResult r) { return {Kind::failed, std::move(r)}; }
  static EntryResult exit_to_l1(std::string why) { return {Kind::exit_to_l1, {.why = std::move(why)}}; }
  static EntryResult internal_error(const Error& e) { return {Kind::internal_error, {.why = e.to_string()}, e.code}; }
};

// Where an L2 exit goes.
enum class ExitTarget { l0, l1 };

class VmxNestedContexts;
class VmxNestedContext;

class NestedVmx {
 public:
  // `contexts`: the VM's nested-context table (cache and oracle), or nullptr
  // (map, or a vCPU without one): the vCPU then keeps one cache set for every
  // vmcs12. It must outlive this object.
  NestedVmx(vm::Vm& vm, vm::Vcpu& vcpu, StrategyKind strategy, const host::HardwareView* hw, CounterSet& counters,
            VmxNestedContexts* contexts = nullptr);
  ~NestedVmx();

  // --- VMX instructions (SDM Vol. 3C ch. 30; vmx_instructions.cc) ------------
  OpResult vmxon(Gpa region);
  OpResult vmxoff();
  OpResult vmclear(Gpa vmcs);
  OpResult vmptrld(Gpa vmcs);
  OpResult vmptrst();
  OpResult vmread(uint32_t field);
  OpResult vmwrite(uint32_t field, uint64_t value);
  OpResult invept(uint64_t type, uint64_t eptp);
  // `gla` is the linear address of an individual-address invalidation.
  OpResult invvpid(uint64_t type, uint16_t vpid, uint64_t gla = 0);

  // --- nested entry (nested_entry.cc) -----------------------------------------
  // VMLAUNCH (launch) / VMRESUME: instruction checks, entry consistency
  // checks, get vmcs12 pages through the strategy, build vmcs02, switch to
  // guest mode with run pending.
  EntryResult enter(bool launch);
  // Step 4, on every hardware entry: called with the vCPU already in guest
  // mode (vm::Vcpu::enter_guest_mode() succeeded). In guest mode, runs the
  // last check (seed patch 3): if a page the hardware uses was invalidated
  // after vmcs02 was built, raises kRefreshGuestPages, counts entry_cancels
  // and returns false — the caller leaves guest mode and comes round, and the
  // request rewrites vmcs02. Otherwise ends run pending (L2 is on the
  // hardware) and returns true. Out of guest mode (L1 runs) it returns true.
  bool check_before_hardware_entry();
  // The last check alone: in guest mode, a vCPU-bound cache is active but
  // invalid.
  bool last_check_fails() const;
  // kRefreshGuestPages: re-gets the hardware pages and rewrites vmcs02.
  // Returns the KVM internal error if the APIC-access page is gone for good.
  Status refresh_guest_pages();

  // --- nested exit -------------------------------------------------------------
  // Whether an L2 exit is L1's to handle (vmcs12 controls, L1's MSR bitmap).
  ExitTarget route_exit(const ExitInfo& exit, uint32_t msr = 0) const;
  // Reflects an exit to L1: exit information into vmcs12, put vmcs12 pages,
  // leave guest mode. L1 resumes after its VMLAUNCH/VMRESUME.
  void reflect_exit(const ExitInfo& exit);

  // --- nested state (KVM_GET/SET_NESTED_STATE; nested_state.cc) ---------------
  // As KVM's ioctls, these run only while the vCPU is not running: on its own
  // thread between two entries, or while its thread is stopped.
  // cpu::Machine::get_nested_state / set_nested_state arrange that.
  //
  // The state as a blob image: VMXON and current-vmcs12 addresses, guest
  // mode, run pending, and L0's cached vmcs12 (not the copy in L1 memory).
  // With an eVMCS in use: the eVMCS flag and address, and outside guest
  // mode a full copy of the page into the cached vmcs12 (clean fields 0,
  // under the strategy's eVMCS lock: seed patch 7); in guest mode the cached
  // vmcs12 L2 runs on. Not const: the lock may map or refresh the page.
  NestedStateImage get_nested_state();
  // Decodes and validates `blob` completely -- size (E2BIG above
  // kNestedStateMaxSize), format and state rules (decode), memslots
  // (check_nested_state_addresses), eVMCS support -- and only then replaces
  // this vCPU's nested state. On error nothing has changed. In guest mode the
  // vmcs12 pages are not resolved here: kGetNestedStatePages is requested and
  // get_nested_state_pages() resolves them before the next entry. A blob
  // with the eVMCS flag needs enable_evmcs() on this vCPU; its eVMCS becomes
  // the one in use (its nested context loaded) but is mapped only by that
  // request, in or out of guest mode.
  Status set_nested_state(std::span<const std::byte> blob);
  // The kGetNestedStatePages request (KVM's vmx_get_nested_state_pages):
  // first a restored eVMCS (get_evmcs_page), then, in guest mode, the vmcs12
  // pages through the strategy with KVM's fallbacks, and vmcs02. An error is
  // the KVM internal error the entry then fails with (an eVMCS that cannot
  // be used; no APIC-access page; a virtual-APIC page that leaves vmcs02
  // with an invalid address). On error the restored state stays as it was,
  // so the request can be retried.
  Status get_nested_state_pages();
  // nested_run_pending: L1's VMLAUNCH/VMRESUME was emulated (enter()
  // succeeded) but L2 has not run yet: set by enter(), cleared by
  // check_before_hardware_entry().
  bool run_pending() const { return guest_mode_ && run_pending_; }
  // Test hook for nested-state tests that stand in for the cpu layer.
  void set_run_pending(bool pending) { run_pending_ = pending; }

  // --- L0 software access to L1 pages (posted-interrupt completion etc.) -------
  Status access_page(L1Page p, Gpa gpa, const std::function<void(const PageView&)>& fn);

  bool vmx_on() const { return vmxon_; }
  bool guest_mode() const { return guest_mode_; }
  Gpa current_vmptr() const { return current_; }
  const Vmcs12& vmcs12() const { return vmcs12_; }
  const Vmcs02& vmcs02() const { return vmcs02_; }
  StrategyKind strategy() const { return pages_->kind(); }
  PageSet& pages() { return *pages_; }
  // The nested context whose caches serve the current vmcs12, or nullptr
  // (no table, or every context was attached when it was loaded).
  const VmxNestedContext* context() const { return ctx_; }

  // --- Hyper-V enlightened VMCS (seed patches 6, 7, 9; nested_evmcs.cc) --------
  // KVM_CAP_HYPERV_ENLIGHTENED_VMCS on this vCPU (the VMM enables it before
  // the vCPU runs). Without it the VP-assist MSR faults and VMLAUNCH/VMRESUME
  // never look for an eVMCS.
  void enable_evmcs() { evmcs_enabled_ = true; }
  bool evmcs_enabled() const { return evmcs_enabled_; }
  // WRMSR HV_X64_MSR_VP_ASSIST_PAGE. Returns false (#GP for L1) without the
  // capability, with reserved bits 11:1 set, or when the enabled page is in
  // no memslot (KVM's kvm_hv_set_msr). Bit 0 clear disables the page.
  bool set_vp_assist_msr(uint64_t value);
  uint64_t vp_assist_msr() const { return vp_assist_msr_; }
  // The eVMCS in use (KVM's hv_evmcs_vmptr): set by the enlightened VMPTRLD
  // of an entry, kInvalidGpa once released. While set, L0 copies from and to
  // it on every entry and exit, and VMPTRLD/VMWRITE fail.
  Gpa evmcs_gpa() const { return evmcs_gpa_; }
  bool evmcs_in_use() const { return evmcs_gpa_ != kInvalidGpa; }
  // A restored eVMCS not mapped yet: kGetNestedStatePages maps it.
  bool evmcs_map_pending() const { return evmcs_map_pending_; }
  // Patch 6's snapshot of the last enlightened entry (zero once released).
  const EvmcsSnapshot& evmcs_snapshot() const { return evmcs_snap_; }
  // The address naming the current L2: the eVMCS in use, else the current
  // vmcs12 (KVM's nested_vmptr()). kInvalidGpa when neither.
  Gpa nested_vmptr() const { return evmcs_in_use() ? evmcs_gpa_ : current_; }
  // Test hook, on the vCPU thread: runs in each enlightened VMPTRLD right
  // after the snapshot and the copy into vmcs12, with the eVMCS lock
  // released. A test rewrites the page there (from another thread) to show
  // the rest of the entry uses only the snapshot.
  void set_evmcs_snapshot_hook(std::function<void()> hook) { evmcs_snapshot_hook_ = std::move(hook); }

 private:
  OpResult fail_valid(VmInstructionError e, std::string message);
  OpResult fail(const VmxFail& f);
  Status load_vmcs12(Gpa gpa);
  Status flush_vmcs12();
  // nested_get_vmcs12_pages: the pages and KVM's fallbacks. Returns an
  // error only for the internal-error cases: no APIC-access page, or a host
  // resource (window, frame) L0 could not get for any page.
  Status get_vmcs12_pages();
  // L1's MSR bitmap into o: KVM's fallback (no bitmap) when L1's address has
  // no backing; an error when L0 could not map it for want of a resource.
  Status merge_msr_bitmap(Vmcs02& o);
  // What the entry checks need to know of this vCPU: its eVMCS capability
  // (KVM filters controls whenever it is enabled) and L1 memory (the VMCS a
  // link pointer names). `run_pending` as for EntryCheckEnv.
  EntryCheckEnv entry_check_env(bool run_pending = true) const;
  // The late control check (nested_vmx_check_controls_late): TPR threshold
  // against VTPR, read from the virtual-APIC page vmcs02 now holds.
  VmxStatus check_vtpr();
  // KVM's free_nested: leaves nested operation without writing the cached
  // vmcs12 back to L1 memory (only VMCLEAR and the VMPTRLD of another VMCS
  // do that), releases the eVMCS and the contexts it holds, and puts the pages.
  void release_nested();
  // Nested contexts (vmx_nested_contexts.h): VMPTRLD of a new address loads,
  // VMCLEAR clears; VMXOFF, teardown and another eVMCS release.
  void load_context(Gpa vmptr);
  void clear_context(Gpa vmptr);
  // A context this vCPU held was taken from it (a handover) or detached by
  // another vCPU's VMCLEAR, both L1's doing: another vCPU may now rebind its
  // caches, and invalidations then wait for that vCPU only. So the vCPU that
  // did it makes vCPU `id` leave guest mode (kRefreshGuestPages) and waits,
  // before it can use the caches; the vCPU that lost it no longer enters
  // with their pfns (context_lost(): the last check cancels, and the next
  // vmcs02 build goes back to the vCPU's own caches).
  void stop_context_user(int id);
  bool context_lost() const;
  // This vCPU stops using `vmptr` without L1 clearing it (VMXOFF, teardown,
  // another eVMCS): as clear_context, but a context another vCPU took stays
  // that vCPU's.
  void release_context(Gpa vmptr);
  // Back to the vCPU's own cache set (no context).
  void use_own_pages();
  // Nested state (nested_state.cc). Whether this vCPU can restore a blob
  // with the eVMCS flag: EINVAL unless enable_evmcs() was called.
  Status check_evmcs_nested_state(const NestedStateImage& s) const;
  bool gpa_backed(Gpa gpa, uint64_t len) const;

  // eVMCS (nested_evmcs.cc). KVM's EVMPTRLD_* outcomes.
  // error: #UD (the eVMCS address has no backing); host_error: L0 could
  // not map it for want of a resource (evmcs_host_error_ says which), an
  // internal error rather than a #UD that would hide the cause.
  enum class Evmptrld { disabled, succeeded, vmfail, error, host_error };
  // nested_vmx_handle_enlightened_vmptrld, on every VMLAUNCH/VMRESUME: find
  // the eVMCS in the VP-assist page, switch contexts on a new address, lock
  // the page, check its revision, take the snapshot and copy the dirty
  // groups into vmcs12. `why` explains vmfail and error.
  Evmptrld handle_enlightened_vmptrld(bool launch, std::string& why);
  // The eVMCS address the VP-assist page names, if enlightened entry is on.
  std::optional<Gpa> vp_assist_evmptr() const;
  // nested_release_evmcs: forget the eVMCS, drop map's HostMap, clear its
  // context.
  void release_evmcs();
  // KVM's nested_get_evmcs_page, the enlightened VMPTRLD with copy=false:
  // maps the eVMCS a restore installed (evmcs_map_pending_) through the
  // strategy, checks that the VP-assist page names it and that its revision
  // is right, marks every group dirty (in the page too) and writes the
  // restored vmcs12 back into it. Nothing is copied into vmcs12: the blob's
  // is the newest. On error nothing changes (the request may be retried).
  Status get_evmcs_page();
  // vmx_get_enlightened_to_vmcs12 (patch 7): the cached vmcs12 with every
  // carried field copied from the page (clean fields 0), for
  // get_nested_state outside guest mode. The cached vmcs12 as it is if the
  // page cannot be mapped (counted in evmcs_map_failures).
  Vmcs12 evmcs_full_copy();
  // copy_vmcs12_to_enlightened: exit information and L2's state back into
  // the page (nested exit, VMfailValid). Counts a failure to reach it.
  void sync_vmcs12_to_evmcs();
  // After a successful enlightened entry: every group clean in the page.
  void mark_evmcs_clean();

  vm::Vm& vm_;
  vm::Vcpu& vcpu_;
  CounterSet& counters_;
  std::unique_ptr<PageSet> pages_;
  VmxNestedContexts* contexts_;
  VmxNestedContext* ctx_ = nullptr;  // attached to this vCPU while set
  bool vmxon_ = false;
  Gpa vmxon_ptr_ = kInvalidGpa;
  Gpa current_ = kInvalidGpa;
  Vmcs12 vmcs12_;
  bool guest_mode_ = false;
  bool run_pending_ = false;  // nested state: see run_pending()
  Vmcs02 vmcs02_;

  // eVMCS state (KVM: hv_vcpu's VP-assist page, nested.hv_evmcs_vmptr and
  // patch 6's cached fields).
  bool evmcs_enabled_ = false;
  uint64_t vp_assist_msr_ = 0;
  Gpa evmcs_gpa_ = kInvalidGpa;
  // KVM's EVMPTR_MAP_PENDING: evmcs_gpa_ was installed by set_nested_state
  // and has not been mapped on this vCPU; kGetNestedStatePages maps it.
  bool evmcs_map_pending_ = false;
  EvmcsSnapshot evmcs_snap_;
  Error evmcs_host_error_;  // why the last Evmptrld::host_error
  bool force_msr_bitmap_recalc_ = true;
  std::function<void()> evmcs_snapshot_hook_;
};

}  // namespace nestcache::vmx
