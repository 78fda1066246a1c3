#include "guest/io_l2.h"

#include "guest/posted_interrupts.h"
#include "vmx/vmx_defs.h"

namespace nestcache::guest {

namespace ops = cpu::ops;
using cpu::GuestFn;
using cpu::GuestOp;
using cpu::GuestTask;

namespace {

constexpr uint64_t kLineBytes = 64;

// HLT until it returns an interrupt's vector (a HLT that exited to L1 and
// was resumed returns 0).
GuestFn<uint64_t> take_interrupt() {
  for (;;) {
    uint64_t vector = (co_await ops::exec(GuestOp::Hlt{})).value;
    if (vector) co_return vector;
  }
}

}  // namespace

GuestTask io_l2(IoL2Config c) {
  using namespace io_ring;
  const uint64_t lines = c.work_pages * (kPageSize / kLineBytes);
  uint64_t line = 0, received = 0, bad = 0;
  for (uint64_t k = 0; k < c.requests; k++) {
    uint64_t sum = 0;
    for (uint32_t op = 0; op < c.work; op += 2) {
      Gpa a = c.work_area + (line++ % lines) * kLineBytes;
      uint64_t x = co_await ops::read64(a);
      sum += x;
      if (op + 1 < c.work) co_await ops::write64(a, x + k + 1);
    }
    const uint64_t payload = sum ^ (k << 32);
    co_await ops::write64(c.ring + kPayload, payload);
    co_await ops::write64(c.ring + kRequest, k + 1);
    co_await ops::write64(c.doorbell, c.queue);
    if (c.msr_every && k % c.msr_every == c.msr_every - 1) co_await ops::wrmsr(vmx::msr::kIa32TscDeadline, k + 1);
    uint64_t vector = co_await take_interrupt();
    if (vector == c.vector) received++;
    co_await ops::read_cr8();
    co_await ops::eoi();
    uint64_t completed = co_await ops::read64(c.ring + kCompletion);
    uint64_t status = co_await ops::read64(c.ring + kStatus);
    if (vector != c.vector || completed != k + 1 || status != io_status(payload)) bad++;
    co_await ops::write64(c.ring + kReceived, received);
    co_await ops::write64(c.ring + kBad, bad);
    co_await ops::write64(c.ring + kServed, k + 1);
    co_await ops::hlt();  // idle until the next request
  }
  for (;;) co_await ops::vmcall(0);
}

GuestFn<uint64_t> io_complete(Gpa ring, Gpa pi_desc, uint8_t vector, uint32_t apic_id) {
  using namespace io_ring;
  uint64_t seq = co_await ops::read64(ring + kRequest);
  uint64_t payload = co_await ops::read64(ring + kPayload);
  co_await ops::write64(ring + kStatus, io_status(payload));
  co_await ops::write64(ring + kCompletion, seq);
  co_await post_interrupt(pi_desc, vector, apic_id, kNotificationVector, IfUnbacked::proceed);
  co_return seq;
}

}  // namespace nestcache::guest
