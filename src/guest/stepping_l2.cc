#include "guest/stepping_l2.h"

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

}  // namespace nestcache::guest
