// libFuzzer target: a nested-state blob (the KVM_SET_NESTED_STATE analogue)
// decoded and validated on its own, then set on live vCPUs under each page
// strategy, with and without the enlightened VMCS (nested_state_target.h
// says what each run checks).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "fuzz/nested_state_target.h"
#include "vmx/nested_state_format.h"

namespace {

using namespace nestcache;

struct Vcpus {
  fuzz::LiveVcpu cache_unmanaged{workloads::StrategyKind::cache, workloads::MemoryKind::unmanaged, false};
  fuzz::LiveVcpu map_managed_evmcs{workloads::StrategyKind::map, workloads::MemoryKind::managed, true};
  fuzz::LiveVcpu oracle_unmanaged_evmcs{workloads::StrategyKind::oracle, workloads::MemoryKind::unmanaged, true};
};

Vcpus& vcpus() {
  // Built once and never destroyed: libFuzzer exits without unwinding.
  static Vcpus* v = new Vcpus();
  return *v;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const std::byte> blob(reinterpret_cast<const std::byte*>(data), size);
  // The format alone, with and without the eVMCS filter: a refusal always
  // says why, and an accepted blob encodes back to a blob that decodes to
  // the same state.
  for (bool evmcs : {false, true}) {
    vmx::EntryCheckEnv env;
    env.evmcs_enabled = evmcs;
    auto image = vmx::decode(blob, env);
    if (!image) {
      if (image.error().message.empty()) std::abort();
      continue;
    }
    if (auto again = vmx::decode(vmx::encode(*image), env); !again || !(*again == *image)) std::abort();
  }
  Vcpus& v = vcpus();
  v.cache_unmanaged.run_one(blob);
  v.map_managed_evmcs.run_one(blob);
  v.oracle_unmanaged_evmcs.run_one(blob);
  return 0;
}
