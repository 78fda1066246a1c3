// Shared set-up for vm-layer tests: the guest-memory environment of
// tests/support (a PhysMem, a HostMm and a Vm with one region of guest
// memory mapped by memslot 0 at gpa 0) and a vCPU thread harness.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "base/check.h"
#include "support/vm_env.h"
#include "vm/host_map.h"
#include "vm/pfn_cache.h"
#include "vm/vm.h"

namespace nestcache::vm::testing {

using test_support::VmEnv;

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
