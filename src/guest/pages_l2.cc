#include "guest/pages_l2.h"

#include "guest/wait.h"
#include "vmx/vmx_defs.h"

namespace nestcache::guest {

namespace ops = cpu::ops;
using cpu::GuestTask;

namespace {
constexpr int kPatternSlots = 32;
constexpr uint64_t kFinalDrainWaits = 100;
}  // namespace

uint64_t pages_pattern(int round) { return 0x5157000000000000ull | (uint64_t(round) << 8) | 0xa5; }
Gpa pages_pattern_slot(int round) { return Mailbox::data(round % kPatternSlots); }

GuestTask pages_l2(PagesL2Config c) {
  const Mailbox mb(c.mailbox, kInvalidGpa);
  uint64_t got = 0, sum = 0;
  auto receive = [&](uint64_t until_count, uint64_t wait_ns) -> GuestTask {
    uint64_t deadline = co_await deadline_in(wait_ns);
    while (got < until_count) {
      uint64_t vec = co_await wait_interrupt(deadline);
      if (!vec) break;
      got++;
      sum += vec;
      co_await mb.report_progress(got);
      co_await ops::eoi();
    }
  };
  const uint64_t per_round = c.interrupts_per_round;
  uint64_t changes = 0;
  for (int r = 0; r < c.rounds; r++) {
    if (c.churn) {
      co_await wait_until_host([&] { return c.churn->load() != changes; });
      changes = c.churn->load();
    }
    co_await ops::write64(mb.l2_address(pages_pattern_slot(r)), pages_pattern(r));
    co_await mb.call(Call::memory);
    for (uint64_t t = 1; t <= 15; t += 7) {
      co_await ops::write_cr8(t);
      co_await mb.call(Call::tpr, t);
    }
    co_await ops::write32(c.apic_access + vmx::vapic::kTpr, static_cast<uint32_t>(r));  // APIC-access exit
    co_await ops::rdmsr(c.intercepted_msr);
    co_await mb.call(Call::irq);
    co_await receive(per_round * (r + 1), c.wait_ns * per_round);
    co_await mb.call(Call::irq_done);
  }
  // The final drain: generous, since a loaded or sanitizer build can take a
  // while to deliver the last notifications; it only costs time when
  // interrupts are really lost.
  co_await receive(per_round * c.rounds, kFinalDrainWaits * c.wait_ns);
  co_await mb.finish(sum);
}

}  // namespace nestcache::guest
