// NestedVmx's life cycle, its nested contexts and the nested exit; the VMX
// instructions are in vmx_instructions.cc, the nested entry in
// nested_entry.cc, the enlightened VMCS in nested_evmcs.cc and nested state
// in nested_state.cc.
#include "vmx/nested.h"

#include "base/check.h"
#include "vmx/vmx_nested_contexts.h"

namespace nestcache::vmx {

NestedVmx::NestedVmx(vm::Vm& vm, vm::Vcpu& vcpu, StrategyKind strategy, const host::HardwareView* hw,
                     CounterSet& counters, VmxNestedContexts* contexts)
    : vm_(vm),
      vcpu_(vcpu),
      counters_(counters),
      pages_(make_page_set(strategy, vm, vcpu, counters, hw)),
      contexts_(strategy == StrategyKind::map ? nullptr : contexts) {}

NestedVmx::~NestedVmx() { release_nested(); }

void NestedVmx::release_nested() {
  release_evmcs();  // its context is cleared like the vmcs12's below
  // The cached vmcs12 is dropped, not written back: L1's region keeps what
  // the last VMCLEAR or VMPTRLD flushed (VMXOFF does not flush, SDM 31.3),
  // and a nested-state restore never writes guest memory, which the VMM
  // may have restored already.
  // Patch 9 (v4): free_nested clears the current context; its caches stay
  // mapped in the table for whichever vCPU loads it next.
  // Only what this vCPU holds: a context another vCPU took over is that
  // vCPU's (release_context).
  release_context(current_);
  // A context kept from an earlier vmcs12 (a load found every context
  // attached) is this vCPU's too: detach it as well.
  if (ctx_) release_context(ctx_->key());
  current_ = kInvalidGpa;
  guest_mode_ = false;
  pages_->release();
}

// --- nested contexts ----------------------------------------------------------------

void NestedVmx::load_context(Gpa vmptr) {
  if (!contexts_) return;
  // Found, new or recycled: the context's caches serve this vmcs12 from now
  // on. nullptr (every context attached): keep the current set, which the
  // next entry re-activates at this vmcs12's addresses.
  int taken_from = NestedContext::kDetached;
  if (VmxNestedContext* ctx = contexts_->load(vcpu_, vmptr, &taken_from)) {
    ctx_ = ctx;
    pages_->use_bundle(&ctx->bundle);
  }
  if (taken_from != NestedContext::kDetached) stop_context_user(taken_from);
}

void NestedVmx::stop_context_user(int id) {
  for (vm::Vcpu* v : vm_.vcpus()) {
    if (v->id() != id || v == &vcpu_) continue;
    vm::Vcpu::make_request_and_wait(std::span<vm::Vcpu* const>(&v, 1), vm::Request::kRefreshGuestPages);
  }
}

bool NestedVmx::context_lost() const { return ctx_ && ctx_->vcpu_id() != vcpu_.id(); }

void NestedVmx::clear_context(Gpa vmptr) {
  if (!contexts_ || vmptr == kInvalidGpa) return;
  const int holder = contexts_->clear(vcpu_, vmptr);
  if (holder != NestedContext::kDetached && holder != vcpu_.id()) stop_context_user(holder);
  // A detached context belongs to the table (another vCPU may recycle it at
  // any moment), so stop using its caches. The seed keeps the stale pointers
  // until the next load; going back to the vCPU's own set costs nothing
  // until that set is used.
  if (ctx_ && ctx_->key() == vmptr) use_own_pages();
}

void NestedVmx::release_context(Gpa vmptr) {
  if (!contexts_ || vmptr == kInvalidGpa) return;
  contexts_->release(vcpu_, vmptr);
  if (ctx_ && ctx_->key() == vmptr) use_own_pages();
}

void NestedVmx::use_own_pages() {
  ctx_ = nullptr;
  pages_->use_bundle(nullptr);
}

// --- nested exit ----------------------------------------------------------------------------

ExitTarget NestedVmx::route_exit(const ExitInfo& exit, uint32_t msr) const {
  const Vmcs12& v = vmcs12_;
  switch (basic_exit_reason(exit.exit_reason)) {
    case ExitReason::kMsrRead:
    case ExitReason::kMsrWrite: {
      if (!(v.primary_proc_controls & proc::kUseMsrBitmaps)) return ExitTarget::l1;
      bool write = basic_exit_reason(exit.exit_reason) == ExitReason::kMsrWrite;
      int64_t byte_offset = msr_bitmap::byte_of(msr, write);
      if (byte_offset < 0) return ExitTarget::l1;
      // As KVM: L1's bitmap is read with a guest-memory read, not a map.
      uint8_t byte = 0;
      if (!vm_.read_guest((v.msr_bitmap & kPageMask) + static_cast<uint64_t>(byte_offset), &byte, 1)) return ExitTarget::l1;
      return (byte >> msr_bitmap::bit_of(msr)) & 1 ? ExitTarget::l1 : ExitTarget::l0;
    }
    case ExitReason::kHlt:
      return (v.primary_proc_controls & proc::kHltExiting) ? ExitTarget::l1 : ExitTarget::l0;
    case ExitReason::kExternalInterrupt:
      return (v.pin_based_controls & pin::kExternalInterruptExiting) ? ExitTarget::l1 : ExitTarget::l0;
    case ExitReason::kVmcall:
    case ExitReason::kEptViolation:
    case ExitReason::kEptMisconfig:
    case ExitReason::kApicAccess:
    case ExitReason::kCrAccess:
    case ExitReason::kTprBelowThreshold:
      return ExitTarget::l1;
    // VMX instructions of L2 are L1's to emulate (KVM's
    // nested_vmx_l1_wants_exit; VMREAD/VMWRITE too, without VMCS shadowing).
    case ExitReason::kVmclear:
    case ExitReason::kVmlaunch:
    case ExitReason::kVmptrld:
    case ExitReason::kVmptrst:
    case ExitReason::kVmread:
    case ExitReason::kVmresume:
    case ExitReason::kVmwrite:
    case ExitReason::kVmxoff:
    case ExitReason::kVmxon:
    case ExitReason::kInvept:
    case ExitReason::kInvvpid:
      return ExitTarget::l1;
    default:
      return ExitTarget::l0;
  }
}

void NestedVmx::reflect_exit(const ExitInfo& exit) {
  NC_CHECK(guest_mode_);
  vmcs12_.set_exit_info(exit);
  if (evmcs_in_use()) sync_vmcs12_to_evmcs();
  // Put vmcs12 pages: map unmaps them all (not the eVMCS, kept while in
  // use); the caches stay mapped.
  pages_->put();
  guest_mode_ = false;
  counters_.add(Counter::reflected_exits);
}

Status NestedVmx::access_page(L1Page p, Gpa gpa, const std::function<void(const PageView&)>& fn) {
  // A context another vCPU took is not this vCPU's to refresh: a refresh
  // would make the cache valid again, with the request to rewrite vmcs02
  // going to this vCPU and not to the one whose vmcs02 holds the old pfn.
  // So this vCPU goes back to its own caches (and vmcs02) first.
  if (context_lost()) {
    use_own_pages();
    NC_TRY(refresh_guest_pages());
  }
  return pages_->access(p, gpa, fn);
}

}  // namespace nestcache::vmx
