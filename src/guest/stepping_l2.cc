#include "guest/stepping_l2.h"

#include <fmt/format.h>

#include "guest/enlightened.h"
#include "guest/l2_run.h"
#include "guest/posted_interrupts.h"
#include "guest/vmx.h"
#include "guest/wait.h"
#include "vmx/vmx_defs.h"

namespace nestcache::guest {

namespace ops = cpu::ops;
using cpu::GuestTask;

namespace {

constexpr uint64_t kFirstSeed = 0x5eed;
constexpr uint64_t kTprClasses = 16;  // CR8 holds the TPR's priority class, 0..15

// Step i's value from step i-1's: a hash, so any lost or repeated step shows.
uint64_t mix(uint64_t prev, uint64_t step) {
  uint64_t x = (prev ^ (step * 0x9e3779b97f4a7c15ull)) * 0xbf58476d1ce4e5b9ull;
  return x ^ (x >> 31);
}

// The exit that ends step `i`, after its value and CR8 are in place.
GuestTask step_exit(const SteppingL2Config& c, uint64_t i, const Mailbox& mb) {
  switch (i % 4) {
    case 0:
      co_await mb.call(Call::step);
      break;
    case 1:
      if (c.hlt_and_wrmsr)
        (void)co_await ops::exec(cpu::GuestOp::Hlt{});  // HLT exiting: to L1
      else
        co_await ops::write32(c.apic_access + vmx::vapic::kTpr, static_cast<uint32_t>(i));  // APIC-access exit
      break;
    case 2:
      (void)co_await ops::rdmsr(c.msr_passthrough);  // no exit: L1's bitmap lets it through
      (void)co_await ops::rdmsr(c.msr_intercepted);  // exits to L1
      break;
    case 3: {
      if (c.hlt_and_wrmsr) {
        co_await ops::wrmsr(c.msr_intercepted, i);  // exits to L1
        break;
      }
      co_await mb.call(Call::irq);  // L1 posts one interrupt while L2 is out
      uint64_t got = co_await wait_interrupt(co_await deadline_in(c.interrupt_wait_ns));
      if (got) co_await ops::eoi();
      co_await mb.call(Call::irq_done, got);
      break;
    }
  }
}

}  // namespace

GuestTask stepping_l2(SteppingL2Config c) {
  const Mailbox mb(c.mailbox, kInvalidGpa);
  uint64_t first = (co_await ops::read64(mb.l2_address(Mailbox::kAck))) + 1;
  for (uint64_t i = first; i <= static_cast<uint64_t>(c.steps); i++) {
    if (i == static_cast<uint64_t>(c.park_step)) {
      // The migration point: spin without exits until the VMM says go.
      co_await ops::write64(mb.l2_address(Mailbox::user(kParkedWord)), 1);
      co_await wait_while_eq(mb.l2_address(Mailbox::user(kGoWord)), 0);
    }
    uint64_t prev = i > 1 ? co_await ops::read64(mb.l2_address(Mailbox::data(i - 1))) : kFirstSeed;
    co_await ops::write64(mb.l2_address(Mailbox::data(i)), mix(prev, i));
    co_await ops::write_cr8(i % kTprClasses);
    co_await mb.report_progress(i);
    co_await step_exit(c, i, mb);
  }
  co_await mb.report_progress(c.steps + 1);
  co_await mb.finish();
}

namespace {

// L1's handling of one exit. `mailbox` (the L1 address of L2's mailbox) is
// read at the first exit, so that a restored L1's first operation is its
// VMRESUME.
class SteppingL1 {
 public:
  explicit SteppingL1(const SteppingL1Config& c) : c_(c) {}
  cpu::GuestFn<bool> handle(vmx::ExitReason reason);

 private:
  // What follows an exit: L2 resumes with its step acknowledged, or resumes
  // in the middle of its step, or is done.
  enum class Next { ack, resume, stop };
  cpu::GuestFn<Next> handle_vmcall(const Mailbox& mb, TranscriptEntry& e);
  GuestTask append(const TranscriptEntry& e);

  const SteppingL1Config& c_;
  Gpa mailbox_ = 0;
};

cpu::GuestFn<SteppingL1::Next> SteppingL1::handle_vmcall(const Mailbox& mb, TranscriptEntry& e) {
  Call call = co_await mb.read_call();
  if (call == Call::done) co_return Next::stop;
  if (call == Call::irq) {
    // One interrupt to ourselves: L0 completes it in software at the next
    // entry. The step goes on: L2 still has to receive it. A descriptor
    // with no memslot must reach L0, whose completion then fails, rather
    // than keep L1 waiting for it.
    auto vec = static_cast<uint8_t>(kFirstPostedVector + e.step % 32);
    co_await post_interrupt(c_.pi_desc, vec, 0, kNotificationVector, IfUnbacked::proceed);
    e.info = vec;
    co_return Next::resume;
  }
  if (call == Call::irq_done) e.info = co_await mb.read_arg();
  co_return Next::ack;
}

cpu::GuestFn<bool> SteppingL1::handle(vmx::ExitReason reason) {
  if (!mailbox_) mailbox_ = co_await ops::read64(c_.mailbox_word);
  const Mailbox mb(c_.mailbox_l2, mailbox_);
  TranscriptEntry e;
  e.reason = static_cast<uint64_t>(reason);
  e.step = co_await mb.read_progress();
  uint64_t steps = co_await ops::read64(c_.steps_word);
  if (e.step >= 1 && e.step <= steps) e.value = co_await ops::read64(mb.l1_address(Mailbox::data(e.step)));
  e.vtpr = static_cast<uint8_t>(co_await ops::read32(c_.virtual_apic + vmx::vapic::kTpr));
  Next next = Next::ack;
  switch (reason) {
    case vmx::ExitReason::kApicAccess: e.info = co_await vmread(vmx::field::kExitQualification); break;
    case vmx::ExitReason::kMsrRead:
    case vmx::ExitReason::kMsrWrite: e.info = c_.msr_intercepted; break;
    case vmx::ExitReason::kHlt: break;
    case vmx::ExitReason::kVmcall: next = co_await handle_vmcall(mb, e); break;
    default: throw VmxError(fmt::format("unexpected L2 exit: {}", vmx::exit_reason_name(reason)));
  }
  co_await append(e);
  if (next == Next::stop) co_return false;
  if (next == Next::ack) co_await mb.acknowledge(e.step);
  co_return true;
}

GuestTask SteppingL1::append(const TranscriptEntry& e) {
  uint64_t n = co_await ops::read64(c_.count_word);
  if (n >= c_.max_entries) throw VmxError("transcript full");
  const Gpa at = c_.transcript + n * kTranscriptEntryBytes;
  co_await ops::write64(at + 0, e.step);
  co_await ops::write64(at + 8, e.reason);
  co_await ops::write64(at + 16, e.info);
  co_await ops::write64(at + 24, e.value);
  co_await ops::write64(at + 32, e.vtpr);
  co_await ops::write64(c_.count_word, n + 1);
  // An enlightened L1 changes a field of a clean-field group between
  // entries (the group's clean bit goes down): the next entry must copy
  // it, and after a restore the first one must copy every group.
  if (c_.evmcs != kInvalidGpa) co_await evmcs_write(c_.evmcs, vmx::field::kTscOffset, e.step * 0x1000 + n);
}

}  // namespace

GuestTask stepping_l1(SteppingL1Config c, bool launch) {
  SteppingL1 l1(c);
  auto handle = [&l1](vmx::ExitReason reason) -> cpu::GuestFn<bool> { co_return co_await l1.handle(reason); };
  L2RunOptions o{.launch = launch};
  if (c.evmcs != kInvalidGpa) o.exits = ExitInfo::from_evmcs(c.evmcs);
  co_await run_l2(handle, o);
}

}  // namespace nestcache::guest
