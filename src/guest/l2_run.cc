#include "guest/l2_run.h"

#include "guest/enlightened.h"
#include "guest/vmx.h"
#include "guest/wait.h"

namespace nestcache::guest {

namespace ops = cpu::ops;

cpu::GuestFn<uint64_t> ExitInfo::read(uint32_t field) const {
  if (evmcs_ != kInvalidGpa) co_return co_await evmcs_read(evmcs_, field);
  co_return co_await vmread(field);
}

cpu::GuestFn<vmx::ExitReason> ExitInfo::reason() const {
  co_return vmx::basic_exit_reason(static_cast<uint32_t>(co_await read(vmx::field::kExitReason)));
}

cpu::GuestTask enter_l2(bool launch, const L2RunOptions& o) {
  constexpr auto kPageAway = static_cast<uint32_t>(vmx::VmInstructionError::kEntryInvalidControlFields);
  for (;;) {
    cpu::OpResult r = co_await (launch ? ops::vmlaunch() : ops::vmresume());
    if (o.retry_while_page_away && r.outcome == cpu::Outcome::fail_valid && r.vm_instruction_error == kPageAway) {
      if (o.retries) ++*o.retries;
      co_await back_off();
      continue;
    }
    if (!r.ok()) throw VmxError("nested entry failed: " + cpu::to_string(r));
    if (o.entries) ++*o.entries;
    co_return;
  }
}

}  // namespace nestcache::guest
