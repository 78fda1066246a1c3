#include "guest/mailbox.h"

namespace nestcache::guest {

namespace ops = cpu::ops;
using cpu::GuestFn;
using cpu::GuestTask;

GuestTask Mailbox::call(Call c, uint64_t arg) const {
  co_await ops::write64(l2_address(kArg), arg);
  co_await ops::write64(l2_address(kCall), static_cast<uint64_t>(c));
  co_await ops::vmcall(static_cast<uint64_t>(c));
}

GuestTask Mailbox::finish(uint64_t result) const {
  co_await ops::write64(l2_address(kArg), result);
  co_await ops::write64(l2_address(kCall), static_cast<uint64_t>(Call::done));
  co_await vmcall_forever(Call::done);
}

GuestTask Mailbox::report_progress(uint64_t value) const { co_await ops::write64(l2_address(kProgress), value); }

GuestFn<Call> Mailbox::read_call() const { co_return static_cast<Call>(co_await ops::read64(l1_address(kCall))); }

GuestFn<uint64_t> Mailbox::read_arg() const { co_return co_await ops::read64(l1_address(kArg)); }

GuestFn<uint64_t> Mailbox::read_progress() const { co_return co_await ops::read64(l1_address(kProgress)); }

GuestTask Mailbox::acknowledge(uint64_t value) const { co_await ops::write64(l1_address(kAck), value); }

GuestTask vmcall_forever(Call c) {
  for (;;) co_await ops::vmcall(static_cast<uint64_t>(c));
}

}  // namespace nestcache::guest
