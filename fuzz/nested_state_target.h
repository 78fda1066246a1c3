// The nested-state fuzz target's world, shared by the libFuzzer entry point
// (nested_state_fuzzer.cc) and the seed-corpus generator: a live vCPU of a
// small VM per configuration, the L1 layout the blobs name, and the good
// blobs the seeds start from.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "workloads/nested_env.h"

namespace nestcache::fuzz {

// L1's layout: one memslot of kL1Bytes at gpa 0 holds every page a blob may
// name; kUnbacked is in no memslot.
inline constexpr size_t kL1Bytes = 2 << 20;
inline constexpr Gpa kVmxon = 0x10000, kVmcs = 0x11000, kApicAccess = 0x20000, kVapic = 0x21000,
                     kPiDesc = 0x22040, kMsrBitmap = 0x23000, kEvmcs = 0x30000, kVpAssist = 0x31000,
                     kEptRoot = 0x40000;
inline constexpr Gpa kUnbacked = 0x40000000;

// A named seed blob.
struct Seed {
  std::string name;
  std::vector<std::byte> blob;
};

// The good blobs (VMX off, VMX on without and with a current VMCS, guest
// mode with every page, run pending, the eVMCS forms) and every malformed
// variant of the guest-mode ones (vmx::malformed_nested_states).
std::vector<Seed> nested_state_seeds();

// One live vCPU: vCPU 0 of a one-vCPU machine whose thread is not running,
// so Machine::set_nested_state works on it directly, as KVM's ioctl does on
// a vCPU outside KVM_RUN.
class LiveVcpu {
 public:
  // `evmcs`: the vCPU has the enlightened VMCS enabled and its VP-assist
  // page names kEvmcs, which holds an eVMCS. Aborts if the VM cannot be
  // built (the fuzzer cannot run without it).
  LiveVcpu(workloads::StrategyKind strategy, workloads::MemoryKind memory, bool evmcs);
  ~LiveVcpu();

  // Restores the baseline state (a guest-mode blob with its pages resolved),
  // then sets `blob` and checks what a restore promises: a refused blob
  // leaves the state as it was; an accepted one yields a state whose own
  // blob is accepted again and reads back the same, and whose pages the
  // next entry's request either resolves or refuses cleanly. Aborts on a
  // broken promise (a finding).
  void run_one(std::span<const std::byte> blob);

 private:
  std::vector<std::byte> get() const;
  // Sets baseline_ and lets the next entry's request resolve its pages.
  void restore_baseline();
  std::unique_ptr<workloads::NestedEnv> env_;
  std::vector<std::byte> baseline_;
  // What get() reads right after restore_baseline().
  std::vector<std::byte> baseline_state_;
  std::string name_;
};

}  // namespace nestcache::fuzz
