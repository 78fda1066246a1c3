// VMX nested contexts: the vendor half of the context table (see
// vmx_nested_contexts.h and, for the table's rules, nested_context_table.h).
#include "vmx/vmx_nested_contexts.h"

#include "base/check.h"

namespace nestcache::vmx {

namespace {
std::atomic<uint64_t> live_contexts{0};
}  // namespace

VmxNestedContext::VmxNestedContext(vm::Vm& vm, vm::Vcpu* vcpu, const host::HardwareView* hw)
    : bundle(vm, vcpu, hw) {
  live_contexts.fetch_add(1, std::memory_order_relaxed);
}

VmxNestedContext::~VmxNestedContext() {
  for (auto& c : bundle.caches) c->deactivate();
  live_contexts.fetch_sub(1, std::memory_order_relaxed);
}

uint64_t VmxNestedContext::live_count() { return live_contexts.load(std::memory_order_relaxed); }

VmxNestedContexts::VmxNestedContexts(vm::Vm& vm, const host::HardwareView* hw)
    : vm_(vm), hw_(hw), table_(*this, vm.counters(), [&vm] { return static_cast<int>(vm.online_vcpus()); }) {}

VmxNestedContexts::~VmxNestedContexts() { table_.destroy(); }

VmxNestedContext* VmxNestedContexts::load(vm::Vcpu& vcpu, Gpa vmptr, int* taken_from) {
  // Every context this table holds was made by alloc() below.
  return static_cast<VmxNestedContext*>(table_.load(vcpu.id(), vmptr, taken_from));
}

int VmxNestedContexts::clear(vm::Vcpu& vcpu, Gpa vmptr) {
  return vmptr != kInvalidGpa ? table_.clear(vcpu.id(), vmptr) : NestedContext::kDetached;
}

void VmxNestedContexts::release(vm::Vcpu& vcpu, Gpa vmptr) {
  if (vmptr != kInvalidGpa) table_.release(vcpu.id(), vmptr);
}

std::unique_ptr<NestedContext> VmxNestedContexts::alloc(int vcpu_id) {
  vm::Vcpu* owner = nullptr;
  for (vm::Vcpu* v : vm_.vcpus())
    if (v->id() == vcpu_id) owner = v;
  if (!owner) return nullptr;  // a vCPU being torn down: no context, keep what it has
  return std::make_unique<VmxNestedContext>(vm_, owner, hw_);
}

// Patch 9: nothing to do. A recycled context keeps its caches mapped at the
// old L2's addresses; the next lock sees the gpa differ and re-activates,
// and re-binds the hardware caches to the loading vCPU.
void VmxNestedContexts::reset(NestedContext&) {}

}  // namespace nestcache::vmx
