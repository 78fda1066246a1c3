// KVM_GET/SET_NESTED_STATE for a running machine: the VMM's calls into a
// vCPU, and the request that finishes a restore on the vCPU thread.
//
// KVM runs the nested-state ioctls on the vCPU with the vCPU out of KVM_RUN,
// so nothing else touches its nested state meanwhile. Here the vCPU thread
// owns that state (vmx::NestedVmx is not thread-safe), so a VMM call is
// handed to the vCPU thread: the caller posts it, raises kVmmCall and kicks;
// the thread leaves guest mode at the next operation boundary, runs the call
// in process_requests (between two entries) and releases the caller. A vCPU
// whose thread is not running is used directly, under the same lock that
// Machine::run takes before it starts the thread.
#include "base/check.h"
#include "cpu/machine.h"

#include <thread>

namespace nestcache::cpu {

void Vcpu::call_on_vcpu(const std::function<void()>& fn) {
  MutexLock l(call_mu_);
  call_cv_.wait(call_mu_, [&]() NC_NO_THREAD_SAFETY_ANALYSIS { return call_ == nullptr; });
  if (!thread_running_) {
    // The thread cannot start while we hold call_mu_ (Machine::run marks it
    // running under this lock first): the vCPU is not running.
    fn();
    return;
  }
  call_ = &fn;
  const uint64_t ticket = calls_done_ + 1;
  // The request bit before the kick, as every request: the thread either
  // sees it before entering the guest or is kicked out.
  make_request(vm::Request::kVmmCall);
  kick();
  call_cv_.wait(call_mu_, [&]() NC_NO_THREAD_SAFETY_ANALYSIS { return calls_done_ >= ticket; });
}

void Vcpu::serve_vmm_call() {
  const std::function<void()>* fn;
  {
    MutexLock l(call_mu_);
    fn = call_;
  }
  if (!fn) return;
  (*fn)();  // without call_mu_: the call may take vm-layer locks and request things
  MutexLock l(call_mu_);
  call_ = nullptr;
  calls_done_++;
  call_cv_.notify_all();
}

void Vcpu::stop_serving_vmm_calls() {
  {
    MutexLock l(call_mu_);
    thread_running_ = false;
  }
  // A call posted before the flag went down is still ours to run.
  serve_vmm_call();
}

void Vcpu::get_nested_state_pages() {
  vmx::NestedVmx& n = nested();
  if (auto st = n.get_nested_state_pages(); !st) {
    // KVM: vmx_get_nested_state_pages fails -> the vCPU exits to the VMM
    // with an internal error; the entry into L2 does not happen.
    make_request(vm::Request::kGetNestedStatePages);  // still to do if the VMM runs the vCPU again
    internal_error(fmt::format("on the first entry after a nested-state restore: {}", st.error().message));
    return;
  }
  tlb02_.clear();
  if (!n.guest_mode()) return;
  // The L2 program of the restored vmcs12 runs from here; it rebuilds what
  // it needs from guest memory (a coroutine's stack is not in the blob, as a
  // real L2's registers are restored by the VMM, not by nested state).
  l2_ = m_.l2_program(n.nested_vmptr());  // the vmcs12's, or the restored eVMCS's (run_guest starts it)
}

Result<std::vector<std::byte>> Machine::get_nested_state(int i) {
  if (i < 0 || i >= num_vcpus()) return errorf(EINVAL, "nested state: no vCPU {} (the VM has {})", i, num_vcpus());
  Vcpu& v = *vcpus_[i];
  std::vector<std::byte> blob;
  v.call_on_vcpu([&] { blob = vmx::encode(v.nested().get_nested_state()); });
  return blob;
}

Status Machine::set_nested_state(int i, std::span<const std::byte> blob) {
  if (i < 0 || i >= num_vcpus()) return errorf(EINVAL, "nested state: no vCPU {} (the VM has {})", i, num_vcpus());
  Vcpu& v = *vcpus_[i];
  Status st;
  v.call_on_vcpu([&] {
    st = v.nested().set_nested_state(blob);
    if (!st) return;
    // The CPU's view of the old state goes with it: L2 translations, and the
    // L2 program (the next kGetNestedStatePages binds the restored one).
    v.tlb02_.clear();
    v.l2_ = nullptr;
    v.reflected_since_entry_ = false;
  });
  return st;
}

Result<uint64_t> Machine::get_vp_assist_msr(int i) {
  if (i < 0 || i >= num_vcpus()) return errorf(EINVAL, "VP-assist MSR: no vCPU {} (the VM has {})", i, num_vcpus());
  Vcpu& v = *vcpus_[i];
  if (!v.nested().evmcs_enabled())
    return errorf(EINVAL, "VP-assist MSR: vCPU {} has not enabled the enlightened VMCS", i);
  uint64_t value = 0;
  v.call_on_vcpu([&] { value = v.nested().vp_assist_msr(); });
  return value;
}

Status Machine::set_vp_assist_msr(int i, uint64_t value) {
  if (i < 0 || i >= num_vcpus()) return errorf(EINVAL, "VP-assist MSR: no vCPU {} (the VM has {})", i, num_vcpus());
  Vcpu& v = *vcpus_[i];
  bool done = false;
  v.call_on_vcpu([&] { done = v.nested().set_vp_assist_msr(value); });
  if (!done)
    return errorf(EINVAL,
                  "VP-assist MSR: vCPU {} refuses {:#x} (no enlightened VMCS, reserved bits, or a page in no memslot)",
                  i, value);
  return ok();
}

}  // namespace nestcache::cpu
