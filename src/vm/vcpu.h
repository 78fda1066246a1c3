// vm::Vcpu: what KVM's generic code knows of a vCPU — its id, its pending
// requests and whether it is in guest mode (DESIGN.md §3 "vCPU requests").
//
// The protocol is KVM's. The vCPU thread publishes "in guest" and only then
// looks at its requests; a requester sets the request bit and only then looks
// at the mode. With sequentially consistent atomics one of them always sees
// the other: either the vCPU finds the request before entering, or the
// requester finds it in guest mode and kicks it out. A kick of an in-guest
// vCPU makes the CPU model exit at its next operation boundary.
//
// make_request_and_wait() is KVM_REQUEST_WAIT: it returns once every targeted
// vCPU that was in guest mode has left it (the analogue of the IPI ack), so
// afterwards no vCPU can still be using what the request invalidates.
//
// Modelled time (base/model_time.h): a requester or kicker whose thread has a
// clock hands its time to the vCPU (carry_time), and the vCPU thread merges
// it when it notices the event (merge_carried_time): a vCPU woken by another
// starts at the waker's clock.
//
// The cpu layer derives its vCPU from this class and implements wake() to
// unblock a halted vCPU thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <span>

#include "base/counters.h"
#include "base/model_time.h"
#include "base/mutex.h"

namespace nestcache::vm {

enum class Request : uint32_t {
  kTlbFlush = 0,           // flush the vCPU's translation cache (EPT01 zapped)
  kOutsideGuestMode = 1,   // no work: only forces the vCPU out of guest mode
  kRefreshGuestPages = 2,  // refresh vCPU-bound caches, rewrite vmcs02 pfns
  kEvent = 3,              // an interrupt or event is pending
  kStop = 4,               // leave the run loop
  kGetNestedStatePages = 5,// resolve vmcs12 pages after nested-state restore
  kTlbFlushGuest = 6,      // flush L2 translations (INVEPT / L1 request)
  kVmmCall = 7,            // a VMM call (get/set nested state) waits to run on the vCPU thread
  kCount
};

enum class VcpuMode : uint8_t { outside = 0, in_guest = 1, exiting = 2 };

class Vcpu {
 public:
  explicit Vcpu(int id) : id_(id) {}
  virtual ~Vcpu() = default;
  Vcpu(const Vcpu&) = delete;
  Vcpu& operator=(const Vcpu&) = delete;

  int id() const { return id_; }

  // --- requester side (any thread) ----------------------------------------
  void make_request(Request r) {
    carry_current_time();
    requests_.fetch_or(bit(r), std::memory_order_seq_cst);
    counters_.add(Counter::requests);
  }
  // Forces the vCPU out of guest mode if it is in it, and wakes it if halted.
  void kick();
  // Sets `r` on every vCPU in `vcpus`, kicks them, and waits until each one
  // that was in guest mode has left it, counting guest_mode_waits on each
  // such vCPU before waiting. The vCPU whose thread makes the call
  // (VMM code run from its guest program, as tests do) is not waited for: it
  // runs this very code and leaves guest mode at its next operation boundary,
  // before it can use what the request invalidates.
  static void make_request_and_wait(std::span<Vcpu* const> vcpus, Request r);

  // The vCPU whose thread this is (set by the cpu layer for its run loop), or
  // nullptr on any other thread.
  static Vcpu* on_this_thread();
  class ThreadBinding {
   public:
    explicit ThreadBinding(Vcpu& v);
    ~ThreadBinding();
    ThreadBinding(const ThreadBinding&) = delete;
    ThreadBinding& operator=(const ThreadBinding&) = delete;
  };

  // --- vCPU thread side ---------------------------------------------------
  bool has_requests() const { return requests_.load(std::memory_order_seq_cst) != 0; }
  bool test_request(Request r) const { return requests_.load() & bit(r); }
  // Clears `r` and says whether it was set.
  bool check_request(Request r) { return requests_.fetch_and(~bit(r), std::memory_order_seq_cst) & bit(r); }
  // Publishes in-guest mode, then checks for requests. Returns false (and
  // goes back outside) if a request or kick is pending: the entry is
  // cancelled and the run loop must come round.
  bool enter_guest_mode();
  // Leaves guest mode and releases requesters waiting for this vCPU.
  void exit_guest_mode();
  // True when a kick asked the vCPU in guest mode to exit (checked by the CPU
  // model at every operation boundary).
  bool exit_requested() const { return mode() == VcpuMode::exiting; }
  VcpuMode mode() const { return static_cast<VcpuMode>(state_.load(std::memory_order_seq_cst) & kModeMask); }

  // requests, kicks.
  CounterSet& counters() { return counters_; }

  // --- modelled time ------------------------------------------------------
  // Any thread: an event for this vCPU happened at `t` (the later of all
  // such times is kept until the vCPU thread merges it).
  void carry_time(const TimeStamp& t) NC_EXCLUDES(carried_mu_);
  // carry_time() of the calling thread's clock, if it has one.
  void carry_current_time() NC_EXCLUDES(carried_mu_);
  // vCPU thread: merges every time carried since the last call into `clock`.
  void merge_carried_time(ModelClock& clock) NC_EXCLUDES(carried_mu_);

 protected:
  // Unblocks the vCPU thread if it is halted or idle; the cpu layer's job.
  virtual void wake() {}

 private:
  static uint32_t bit(Request r) { return 1u << static_cast<uint32_t>(r); }
  // state_ = epoch << 2 | mode. The epoch counts guest-mode exits, so a
  // waiter can tell "left guest mode since I looked" from "never left".
  static constexpr uint64_t kModeMask = 3;
  void wait_for_exit(uint64_t seen);

  const int id_;
  std::atomic<uint32_t> requests_{0};
  std::atomic<uint64_t> state_{0};
  CounterSet counters_;
  Mutex carried_mu_{LockRank::kLeaf};
  TimeStamp carried_ NC_GUARDED_BY(carried_mu_);
  std::atomic<bool> has_carried_{false};  // carried_ holds a time not merged yet
};

}  // namespace nestcache::vm
