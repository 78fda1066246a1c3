#include "guest/apic_timer.h"

#include "cpu/local_apic.h"
#include "vmx/vmx_defs.h"

namespace nestcache::guest {

namespace ops = cpu::ops;

namespace {
constexpr uint32_t kDivideBy1 = 0xb;  // divide-configuration bits 3, 1:0 = 1, 11
}  // namespace

cpu::GuestTask start_timer(uint32_t period_ns, uint8_t vector) {
  co_await ops::wrmsr(vmx::x2apic::kTimerDivide, kDivideBy1);
  co_await ops::wrmsr(vmx::x2apic::kLvtTimer, cpu::ApicTimer::kPeriodic | vector);
  co_await ops::wrmsr(vmx::x2apic::kTimerInitialCount, period_ns);
}

cpu::GuestTask stop_timer() { co_await ops::wrmsr(vmx::x2apic::kTimerInitialCount, 0); }

}  // namespace nestcache::guest
