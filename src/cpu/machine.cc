#include "cpu/machine.h"

#include "base/check.h"

namespace nestcache::cpu {

Machine::Machine(vm::Vm& vm, const MachineConfig& config)
    : vm_(vm), config_(config), hw_(HardwareKeys::view(vm.phys())), monitors_(vm.phys().num_frames()) {
  NC_CHECK(config.vcpus >= 1);
  if (config.strategy != vmx::StrategyKind::map)
    contexts_ = std::make_unique<vmx::VmxNestedContexts>(vm, config.strategy == vmx::StrategyKind::oracle ? &hw_ : nullptr);
  for (int i = 0; i < config.vcpus; i++) vcpus_.push_back(std::make_unique<Vcpu>(*this, i));
}

Machine::~Machine() {
  for (auto& v : vcpus_) {
    v->make_request(vm::Request::kStop);
    v->kick();
  }
  for (auto& v : vcpus_)
    if (v->thread_.joinable()) v->thread_.join();
  // VM teardown, in KVM's order: each vCPU's nested state first (it clears
  // its current context), then the contexts and their caches, whose
  // hardware caches are bound to vCPUs that must still exist then.
  for (auto& v : vcpus_) v->nested_.reset();
  if (contexts_) contexts_->destroy();
  vcpus_.clear();
  MutexLock l(l2_mu_);
  l2_programs_.clear();
}

void Machine::set_l1_program(int i, GuestTask task) { vcpus_.at(i)->l1_ = std::move(task); }

void Machine::bind_l2_program(Gpa vmcs12, GuestTask task) {
  MutexLock l(l2_mu_);
  auto p = std::make_unique<L2Program>();
  p->task = std::move(task);
  l2_programs_[vmcs12] = std::move(p);
}

L2Program* Machine::l2_program(Gpa vmcs12) {
  MutexLock l(l2_mu_);
  auto it = l2_programs_.find(vmcs12);
  return it == l2_programs_.end() ? nullptr : it->second.get();
}

void Machine::fail(std::string message) {
  MutexLock l(done_mu_);
  if (failure_.empty()) failure_ = std::move(message);
  done_cv_.notify_all();
}

void Machine::vcpu_finished() {
  MutexLock l(done_mu_);
  running_--;
  done_cv_.notify_all();
}

Status Machine::run(std::chrono::milliseconds timeout) {
  {
    MutexLock l(done_mu_);
    running_ = num_vcpus();
  }
  for (auto& v : vcpus_) {
    NC_CHECK(v->l1_);
    Vcpu* raw = v.get();
    {
      MutexLock l(raw->call_mu_);  // VMM calls go to the thread from now on
      raw->thread_running_ = true;
    }
    try {
      v->thread_ = std::thread([raw] { raw->run_loop(); });
    } catch (const std::system_error& e) {
      // No thread for this vCPU (a thread or memory limit): the run ends
      // here; the vCPUs already started are stopped and joined below.
      {
        MutexLock l(raw->call_mu_);
        raw->thread_running_ = false;
      }
      fail(fmt::format("vCPU {}: cannot start its thread: {} ({})", raw->id(),
                       Error{e.code().value(), ""}.code_name(), e.code().message()));
      MutexLock l(done_mu_);
      running_ -= static_cast<int>(vcpus_.size()) - raw->id();  // this one and the ones never started
      break;
    }
  }
  bool timed_out;
  {
    MutexLock l(done_mu_);
    timed_out = !done_cv_.wait_for(done_mu_, timeout, [&]() NC_NO_THREAD_SAFETY_ANALYSIS {
      return running_ == 0 || !failure_.empty();
    });
  }
  // Whatever happened, stop every vCPU and wait for its thread.
  for (auto& v : vcpus_) {
    v->make_request(vm::Request::kStop);
    v->kick();
  }
  for (auto& v : vcpus_)
    if (v->thread_.joinable()) v->thread_.join();
  MutexLock l(done_mu_);
  if (!failure_.empty()) return errorf(EIO, "{}", failure_);
  if (timed_out) return errorf(ETIMEDOUT, "the guests did not finish within {} ms", timeout.count());
  return ok();
}

void Machine::send_ipi(int from, uint32_t dest, uint8_t vector) {
  if (dest >= vcpus_.size()) return;  // no such APIC: the IPI goes nowhere
  vcpus_[dest]->deliver_interrupt(vector);
}

Status Machine::watch(Gpa gpa, uint64_t bytes) {
  for (Gfn gfn = gpa_to_gfn(gpa); gfn <= gpa_to_gfn(gpa + bytes - 1); gfn++) {
    auto entry = vm_.ept01_fault(gfn, true);
    if (!entry) return errorf(EFAULT, "watch: L1 page {:#x} is not guest memory: {}", gfn_to_gpa(gfn), entry.error().message);
    monitors_.watch(entry->tag.pfn);
  }
  return ok();
}

Status Machine::store_qword(Gpa gpa, uint64_t value) {
  if (gpa % 8) return errorf(EINVAL, "store_qword: {:#x} is not 8-aligned", gpa);
  ModelClock none;  // a host thread without a clock hands over no time
  ModelClock* clock = ModelClock::current() ? ModelClock::current() : &none;
  Status st;
  auto store = [&] {
    st = vm_.write_guest(gpa, &value, sizeof value);
    return static_cast<bool>(st);
  };
  // The frame after the store: a migration between the two moved the value
  // with the page, and the waiters it kicked look again on the new frame.
  auto entry = vm_.ept01_fault(gpa_to_gfn(gpa), true);
  if (!entry) return errorf(EFAULT, "store_qword: {:#x} is not guest memory: {}", gpa, entry.error().message);
  monitors_.access(entry->tag.pfn, page_offset(gpa), *clock, store);
  return st;
}

TimeStamp Machine::work() const {
  TimeStamp sum;
  for (auto& v : vcpus_)
    for (int p = 0; p < kTimeParts; p++) sum.ns[p] += v->clock().work().ns[p];
  return sum;
}

CounterSnapshot Machine::counters() const {
  CounterSnapshot s = CounterSnapshot::of(vm_.counters());
  for (auto& v : vcpus_) s += CounterSnapshot::of(v->counters());
  return s;
}

}  // namespace nestcache::cpu
