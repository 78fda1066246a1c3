// L1 running one L2 vCPU: enter it, handle its exit, enter it again — L1
// KVM's vcpu_run for a nested guest, with the exit handler the caller's.
#pragma once

#include "cpu/guest_task.h"
#include "vmx/vmx_defs.h"

namespace nestcache::guest {

// Where L1 reads its L2's exit information: the current VMCS (VMREAD), or,
// for an enlightened L1, its eVMCS page.
class ExitInfo {
 public:
  static ExitInfo from_vmcs() { return ExitInfo(kInvalidGpa); }
  static ExitInfo from_evmcs(Gpa evmcs) { return ExitInfo(evmcs); }
  // The basic exit reason of the last exit.
  cpu::GuestFn<vmx::ExitReason> reason() const;
  // Any field of it (VMREAD, or a load from the eVMCS).
  cpu::GuestFn<uint64_t> read(uint32_t field) const;

 private:
  explicit ExitInfo(Gpa evmcs) : evmcs_(evmcs) {}
  Gpa evmcs_;
};

struct L2RunOptions {
  // The first entry: VMLAUNCH, or VMRESUME (an L2 launched before, e.g. by
  // the L1 a restored vCPU was saved from).
  bool launch = true;
  ExitInfo exits = ExitInfo::from_vmcs();
  // Retry an entry that fails with VMfailValid(7, invalid control fields):
  // L0 fails it so while the VMM has moved a page of the vmcs12 away.
  bool retry_while_page_away = false;
  int* retries = nullptr;  // counts those retries, if given
  int* entries = nullptr;  // counts the entries that reached L2, if given
};

// Enters the current L2 and, after each exit, runs `handle(reason)` — a
// callable returning GuestFn<bool>: true enters L2 again (VMRESUME), false
// ends the loop, with L2 exited. A failed entry throws VmxError. `handle` is
// copied into the coroutine: a lambda capturing by reference is fine (it
// must not capture objects with destructors).
template <class Handle>
cpu::GuestTask run_l2(Handle handle, L2RunOptions o = {});

// --- implementation ----------------------------------------------------------

// One entry (VMLAUNCH or VMRESUME) with o's retry policy; throws VmxError if
// it fails otherwise.
cpu::GuestTask enter_l2(bool launch, const L2RunOptions& o);

template <class Handle>
cpu::GuestTask run_l2(Handle handle, L2RunOptions o) {
  for (bool launch = o.launch;; launch = false) {
    co_await enter_l2(launch, o);
    vmx::ExitReason reason = co_await o.exits.reason();
    bool again = co_await handle(reason);
    if (!again) co_return;
  }
}

}  // namespace nestcache::guest
