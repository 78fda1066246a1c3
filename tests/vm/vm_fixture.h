// Shared set-up for vm-layer tests: the guest-memory environment of
// tests/support (a PhysMem, a HostMm and a Vm with one region of guest
// memory mapped by memslot 0 at gpa 0) and a vCPU thread harness.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <string>
#include <thread>
#include <tuple>

#include "base/check.h"
#include "support/vm_env.h"
#include "vm/host_map.h"
#include "vm/pfn_cache.h"
#include "vm/vm.h"

namespace nestcache::vm::testing {

using test_support::VmEnv;
using test_support::VmEnvConfig;

// Tests that run for both frame kinds and both pfn-cache read sides, and
// the environment for one of them.
using KindAndSide = std::tuple<host::FrameKind, CacheReadSide>;
inline const auto kKindsAndSides =
    ::testing::Combine(::testing::Values(host::FrameKind::managed, host::FrameKind::unmanaged),
                       ::testing::Values(CacheReadSide::rwlock, CacheReadSide::lockfree));
inline std::string kind_and_side_name(const ::testing::TestParamInfo<KindAndSide>& info) {
  return std::string(host::frame_kind_name(std::get<0>(info.param))) + "_" +
         cache_read_side_name(std::get<1>(info.param));
}
inline VmEnvConfig env_config(const KindAndSide& p, size_t pages = 64, size_t spare = 4096) {
  return {.kind = std::get<0>(p), .pages = pages, .spare = spare, .cache_read_side = std::get<1>(p)};
}

// A vCPU thread for tests: loops entering guest mode and, while "in the
// guest", repeatedly calls `guest` (one operation per call) until kicked;
// then leaves guest mode and records the requests it received.
class HarnessVcpu : public Vcpu {
 public:
  explicit HarnessVcpu(int id) : Vcpu(id) {}
  ~HarnessVcpu() override { stop(); }

  // `prepare` runs before each entry (refresh what the hardware will use);
  // `last_check` runs after guest mode is published and cancels the entry
  // when it returns false (seed patch 3); `guest` is one guest operation.
  template <class Fn, class Prepare = bool (*)(), class LastCheck = bool (*)()>
  void start(Fn guest, Prepare prepare = [] { return true; }, LastCheck last_check = [] { return true; }) {
    thread_ = std::thread([this, guest, prepare, last_check]() mutable {
      while (!stop_.load()) {
        handle_requests();
        if (!prepare()) continue;
        if (!enter_guest_mode()) continue;
        if (!last_check()) {
          exit_guest_mode();
          continue;
        }
        in_guest_episodes.fetch_add(1);
        while (!exit_requested() && !stop_.load()) guest();
        episodes_ended.fetch_add(1);
        exit_guest_mode();
      }
      handle_requests();  // what arrived with the last kick, even when stopping
    });
  }
  void stop() {
    stop_.store(true);
    kick();
    if (thread_.joinable()) thread_.join();
  }
  std::atomic<int> tlb_flushes{0}, outside_requests{0}, in_guest_episodes{0}, episodes_ended{0};

 private:
  void handle_requests() {
    if (check_request(Request::kTlbFlush)) tlb_flushes.fetch_add(1);
    if (check_request(Request::kOutsideGuestMode)) outside_requests.fetch_add(1);
    for (uint32_t r = 0; r < static_cast<uint32_t>(Request::kCount); r++) check_request(static_cast<Request>(r));
  }
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace nestcache::vm::testing
