// Guest code as C++20 coroutines: GuestTask, GuestFn<T> and the awaitable
// operations in cpu::ops.
//
// One guest thread of execution (an L1 vCPU's code, an L2 vCPU's program) is a
// root GuestTask. Its code co_awaits operations (`co_await ops::read64(gpa)`)
// and subtasks (`co_await setup_ept(...)`, a GuestTask or GuestFn<T>); the
// whole stack suspends as one, and the operation it waits for surfaces at the
// root, where a driver — the CPU model — executes it:
//
//   task.start();
//   while (!task.done()) task.resume_with(cpu.execute(*task.pending()));
//   task.rethrow_if_failed();
//
// A VM exit is an operation the driver does not answer yet: the task stays
// suspended with the same pending() operation until the vCPU re-enters that
// guest, and the CPU model then completes (or re-executes) it. Interrupt
// handlers, where the CPU model runs any, are root tasks of their own.
//
// Threads: a task has no thread affinity. It may be started on one thread and
// resumed on another (an L2 program belongs to its vmcs12 and moves between L1
// vCPU threads) provided the hand-off orders the two (a mutex, a join, a
// release/acquire pair); it must never be driven from two threads at once.
//
// Cost: one heap allocation per coroutine frame; none per operation (the
// operation lives in the awaiting frame, and pending() points at it), and none
// per subtask call beyond the subtask's own frame.
//
// Control transfer: a subtask starts, and returns to its caller, through a
// trampoline — the awaiting frame suspends naming the frame to run next, and
// the loop in start()/resume_with() resumes it — rather than by returning a
// handle from await_suspend. The latter (symmetric transfer) is a tail call
// only where the compiler makes it one: clang always, GCC 12 only from -O2; at
// -O0 a million back-to-back subtask calls overflowed the stack. The
// trampoline costs one return and one call per transfer at every -O level.
//
// Lambdas: a coroutine lambda's captures live in the closure object, not in
// the coroutine frame (only parameters are copied into it), so the closure
// must outlive the task:
//
//   auto wait = [&]() -> GuestTask { ... };  co_await wait();     // fine
//   co_await [&]() -> GuestTask { ... }();                         // fine: the
//       // closure is a temporary of the co_await's full-expression
//   GuestTask t = [&]() -> GuestTask { ... }();  co_await std::move(t);
//       // WRONG: the closure died at the end of the first statement (the
//       // asan preset reports the task's first use of a capture)
//   auto wait = [](Gpa flag, uint64_t n) -> GuestTask { ... };  // fine anywhere:
//       // what it needs arrives as parameters, copied into its frame
//
// A closure whose captures have destructors (`[v]` with v a std::vector, say)
// does not compile as a guest coroutine (detail::PromiseBase): GCC 12 destroys
// such a closure twice when it is called inside a co_await expression — the
// second time after the subtask has returned, as "free(): invalid pointer" or
// a double free — and by-value captures would suggest the task owns them,
// which it does not. Pass such values as parameters instead. The same GCC 12
// bug hits any temporary with a destructor whose member function is called in
// a co_await expression (`co_await Helper{v}.run()`): name the object first.
// The check reads the first argument the promise is built with, so it also
// refuses a free coroutine whose first parameter is such a closure; clang 14
// does not pass a lambda's closure to the promise, so only GCC checks.
#pragma once

#include <concepts>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <optional>
#include <string_view>
#include <type_traits>
#include <utility>

#include "base/check.h"
#include "base/types.h"
#include "cpu/guest_ops.h"

namespace nestcache::cpu {

namespace detail {

// What the driver of one guest thread of execution sees; lives in the root
// task's promise, and every frame of the stack points at it.
struct RootState {
  const GuestOp* pending = nullptr;  // the operation waited for, inside the leaf's frame
  std::coroutine_handle<> leaf;      // the frame suspended at `pending`
  OpResult result;                   // the answer, read by the leaf when it resumes
  std::coroutine_handle<> next;      // trampoline: the frame to run after the one suspending
  bool exception_observed = false;   // failed()/rethrow_if_failed() has looked
};

// The trampoline: resumes `h`, then whatever frame each suspension names in
// root.next, until the stack waits for an operation or the root has ended.
void run_stack(RootState& root, std::coroutine_handle<> h);

// True if `name`, a type as GCC or clang spell it in __PRETTY_FUNCTION__,
// names a lambda's closure type: GCC writes "scope::<lambda(params)>", clang
// "(lambda at file:line:col)". A class nested in a lambda
// ("f()::<lambda()>::Local") is not one: the lambda must end the name.
constexpr bool spells_closure_type(std::string_view name) {
  std::size_t start = name.rfind("<lambda(");
  if (start == std::string_view::npos) start = name.rfind("(lambda at ");
  if (start == std::string_view::npos) return false;
  int depth = 0;
  for (std::size_t i = start; i < name.size(); ++i) {
    char c = name[i];
    if (c == '<' || c == '(') {
      ++depth;
    } else if ((c == '>' || c == ')') && --depth == 0) {
      return i + 1 == name.size();
    }
  }
  return false;
}

// True if T is a lambda's closure type. The language has no trait for it, so
// this reads the compiler's spelling of T: "... [with T = NAME]" (GCC) or
// "... [T = NAME]" (clang).
template <class T>
constexpr bool is_closure_type() {
  std::string_view f = __PRETTY_FUNCTION__;
  std::size_t begin = f.find("T = ");
  if (begin == std::string_view::npos || f.back() != ']') return false;
  begin += 4;
  return spells_closure_type(f.substr(begin, f.size() - 1 - begin));
}

// True for a coroutine lambda whose captures have destructors: the closures a
// guest coroutine may not be (see "Lambdas" at the top of this file).
template <class T>
inline constexpr bool kIsClosureWithDestructors =
    !std::is_trivially_destructible_v<T> && is_closure_type<std::remove_cv_t<T>>();

// State every guest coroutine frame has, whatever it returns.
class PromiseBase {
 public:
  PromiseBase() = default;
  // The frame is built with the coroutine's arguments; for a lambda (any
  // member function) the first is the object it is called on. Only checks it.
  template <class First, class... Rest>
  explicit PromiseBase(First&, Rest&...) noexcept {
    static_assert(!kIsClosureWithDestructors<First>,
                  "a guest coroutine lambda may not capture objects with destructors: GCC 12 "
                  "destroys such a closure twice when it is called in a co_await expression, "
                  "and the task does not own its captures. Pass them as parameters (copied into "
                  "the coroutine frame); see \"Lambdas\" in cpu/guest_task.h");
  }

  // Lazy: nothing runs until start() (root) or co_await (subtask).
  std::suspend_always initial_suspend() noexcept { return {}; }
  void unhandled_exception() noexcept { exception_ = std::current_exception(); }

  RootState* root_ = nullptr;             // null until started or awaited
  std::coroutine_handle<> continuation_;  // the awaiting frame; null at the root
  std::exception_ptr exception_;          // what escaped the coroutine body
};

template <class P>
concept GuestPromise = std::derived_from<P, PromiseBase>;

// At the end of a coroutine, control goes to the frame that awaited it or, at
// the root, back to the driver. The frame stays suspended at its final point
// until its owner (a local of the awaiting frame, or the GuestTask) destroys it.
struct FinalAwaiter {
  bool await_ready() const noexcept { return false; }
  template <GuestPromise P>
  void await_suspend(std::coroutine_handle<P> self) noexcept {
    PromiseBase& p = self.promise();
    if (p.continuation_) p.root_->next = p.continuation_;
  }
  void await_resume() const noexcept {}
};

// Owns one coroutine frame: destroying it destroys the frame, and with it every
// local of the coroutine — including a subtask it is suspended in, whose owner
// is such a local. That is how destroying a root frees the whole stack.
template <class Promise>
class UniqueFrame {
 public:
  UniqueFrame() = default;
  explicit UniqueFrame(std::coroutine_handle<Promise> h) : h_(h) {}
  UniqueFrame(UniqueFrame&& other) noexcept : h_(std::exchange(other.h_, {})) {}
  UniqueFrame& operator=(UniqueFrame&& other) noexcept {
    if (this != &other) {
      reset();
      h_ = std::exchange(other.h_, {});
    }
    return *this;
  }
  ~UniqueFrame() { reset(); }

  void reset() {
    if (h_) std::exchange(h_, {}).destroy();
  }
  std::coroutine_handle<Promise> get() const { return h_; }

 private:
  std::coroutine_handle<Promise> h_;
};

// `co_await subtask`: the subtask joins the awaiting frame's stack (same root)
// and runs at once; the awaiting frame resumes when it returns.
template <class Promise>
class SubtaskAwaiter {
 public:
  explicit SubtaskAwaiter(std::coroutine_handle<Promise> child) : child_(child) {}

  bool await_ready() const noexcept { return false; }
  template <GuestPromise P>
  void await_suspend(std::coroutine_handle<P> parent) noexcept {
    Promise& child = child_.promise();
    child.root_ = parent.promise().root_;
    child.continuation_ = parent;
    child.root_->next = child_;  // the trampoline starts it once the parent is suspended
  }
  // The subtask's value, or its exception rethrown in the awaiting frame.
  decltype(auto) await_resume() { return child_.promise().take_result(); }

 private:
  std::coroutine_handle<Promise> child_;
};

// `co_await` of one operation: publishes it at the root, suspends the stack,
// and on resumption turns the driver's OpResult into what the caller asked
// for: R = OpResult (everything, never throws), void, or an unsigned integer
// (the value, truncated to R). For the last two a non-ok outcome throws
// GuestFault in the guest.
template <class R>
class [[nodiscard]] OpAwaiter {
  static_assert(std::is_void_v<R> || std::is_same_v<R, OpResult> || std::is_unsigned_v<R>);

 public:
  explicit OpAwaiter(const GuestOp& op) : op_(op) {}

  bool await_ready() const noexcept { return false; }
  template <GuestPromise P>
  void await_suspend(std::coroutine_handle<P> self) noexcept {
    root_ = self.promise().root_;
    root_->pending = &op_;
    root_->leaf = self;
    // No root_->next: the trampoline stops, and start() or resume_with()
    // returns to the driver with this operation pending.
  }
  R await_resume() const {
    const OpResult& result = root_->result;
    if constexpr (std::is_same_v<R, OpResult>) {
      return result;
    } else {
      if (!result.ok()) throw GuestFault(op_, result);
      if constexpr (!std::is_void_v<R>) return static_cast<R>(result.value);
    }
  }

 private:
  GuestOp op_;
  RootState* root_ = nullptr;
};

}  // namespace detail

// A guest coroutine returning a T: an L1 helper such as
//   GuestFn<uint64_t> read_exit_reason();
// Only a subtask: it runs when `co_await`ed (as an rvalue, once) from a
// GuestTask or another GuestFn, and the co_await yields its co_return value or
// rethrows what escaped it. Move-only; destroying it destroys its frame.
template <class T>
class [[nodiscard]] GuestFn {
  static_assert(!std::is_void_v<T> && !std::is_reference_v<T>,
                "GuestFn<T> returns a value; use GuestTask for none");

 public:
  class promise_type : public detail::PromiseBase {
   public:
    using PromiseBase::PromiseBase;
    GuestFn get_return_object() noexcept {
      return GuestFn(std::coroutine_handle<promise_type>::from_promise(*this));
    }
    detail::FinalAwaiter final_suspend() noexcept { return {}; }
    template <class U = T>
      requires std::constructible_from<T, U&&>
    void return_value(U&& value) {
      value_.emplace(std::forward<U>(value));
    }
    T take_result() {
      if (exception_) std::rethrow_exception(exception_);
      return std::move(*value_);
    }

   private:
    std::optional<T> value_;
  };

  GuestFn(GuestFn&&) noexcept = default;
  GuestFn& operator=(GuestFn&&) noexcept = default;

  // Runs this subtask on the awaiting coroutine's stack. Requires a subtask
  // not awaited before.
  detail::SubtaskAwaiter<promise_type> operator co_await() && {
    NC_CHECK(frame_.get() && frame_.get().promise().root_ == nullptr);
    return detail::SubtaskAwaiter<promise_type>(frame_.get());
  }

 private:
  explicit GuestFn(std::coroutine_handle<promise_type> h) : frame_(h) {}
  detail::UniqueFrame<promise_type> frame_;
};

// A guest coroutine returning nothing: a root (one guest thread of execution,
// driven by the CPU model through start/pending/resume_with) or, when
// `co_await`ed from another guest coroutine, a subtask like GuestFn.
// Move-only; destroying it destroys its frame and every subtask frame the
// stack is suspended in (their locals' destructors run).
class [[nodiscard]] GuestTask {
 public:
  class promise_type : public detail::PromiseBase {
   public:
    using PromiseBase::PromiseBase;
    GuestTask get_return_object() noexcept {
      return GuestTask(std::coroutine_handle<promise_type>::from_promise(*this));
    }
    detail::FinalAwaiter final_suspend() noexcept { return {}; }
    void return_void() noexcept {}
    void take_result() {
      if (exception_) std::rethrow_exception(exception_);
    }

   private:
    friend class GuestTask;
    detail::RootState root_state_;  // used only when this frame is a root
  };

  // An empty task (no coroutine), to be assigned one later.
  GuestTask() = default;
  GuestTask(GuestTask&&) noexcept = default;
  // Destroys the task held before (as the destructor does), then takes `other`'s.
  GuestTask& operator=(GuestTask&& other) noexcept;
  // Destroys the stack, whatever state it is in. A root that failed and was
  // never asked (failed() / rethrow_if_failed()) reports its exception on
  // stderr rather than dropping it silently.
  ~GuestTask();

  // True if this holds a coroutine (not default-constructed or moved from).
  explicit operator bool() const { return static_cast<bool>(frame_.get()); }

  // --- Driver API (root tasks). Every call requires a non-empty task. ---

  // Runs the guest code from its beginning until its first operation or its
  // end. Requires: not started, and not awaited as a subtask. Never throws.
  void start();
  // True once start() has run the task (or it was awaited as a subtask).
  bool started() const;
  // True once the guest code has returned or thrown.
  bool done() const;
  // The operation the stack waits for: valid until the next resume_with(),
  // or the task's destruction. Null before start() and once done().
  const GuestOp* pending() const;
  // Completes the pending operation with `result` and runs the guest code
  // until its next operation or its end. Requires pending() != null, and an
  // outcome the operation can have: VMfail only for VMX instructions, a fault
  // vector below 32. Never throws: what the guest throws ends the task.
  void resume_with(const OpResult& result);
  // True if the task ended with an exception.
  bool failed() const;
  // Rethrows the exception the guest code ended with, if any (every call).
  void rethrow_if_failed() const;

  // --- Subtask use ---

  // Runs this task as a subtask of the awaiting coroutine. Requires a task
  // neither started nor awaited before.
  detail::SubtaskAwaiter<promise_type> operator co_await() && {
    NC_CHECK(frame_.get() && frame_.get().promise().root_ == nullptr);
    return detail::SubtaskAwaiter<promise_type>(frame_.get());
  }

 private:
  explicit GuestTask(std::coroutine_handle<promise_type> h) : frame_(h) {}
  promise_type& promise() const;
  detail::RootState& root() const;
  // Reports an exception nobody asked about, then destroys the frame.
  void destroy() noexcept;

  detail::UniqueFrame<promise_type> frame_;
};

// The operations guest code awaits. Each returns an awaitable that must be
// `co_await`ed inside a GuestTask or GuestFn (it does not compile elsewhere).
// Unless noted, a non-ok outcome (a fault) throws GuestFault in the guest; the
// VMX instructions and exec() return the whole OpResult instead.
// Call them qualified (`co_await ops::pause()`): after a using-directive,
// pause() would be ambiguous with POSIX ::pause().
namespace ops {

template <class R>
using Awaitable = detail::OpAwaiter<R>;

// Any operation; yields the CPU model's full answer and never throws.
inline Awaitable<OpResult> exec(const GuestOp& op) { return Awaitable<OpResult>(op); }

// Guest memory: loads return the value read, stores nothing.
inline Awaitable<uint8_t> read8(Gpa gpa) { return Awaitable<uint8_t>(GuestOp::Read{gpa, 1}); }
inline Awaitable<uint16_t> read16(Gpa gpa) { return Awaitable<uint16_t>(GuestOp::Read{gpa, 2}); }
inline Awaitable<uint32_t> read32(Gpa gpa) { return Awaitable<uint32_t>(GuestOp::Read{gpa, 4}); }
inline Awaitable<uint64_t> read64(Gpa gpa) { return Awaitable<uint64_t>(GuestOp::Read{gpa, 8}); }
inline Awaitable<void> write8(Gpa gpa, uint8_t value) {
  return Awaitable<void>(GuestOp::Write{gpa, 1, value});
}
inline Awaitable<void> write16(Gpa gpa, uint16_t value) {
  return Awaitable<void>(GuestOp::Write{gpa, 2, value});
}
inline Awaitable<void> write32(Gpa gpa, uint32_t value) {
  return Awaitable<void>(GuestOp::Write{gpa, 4, value});
}
inline Awaitable<void> write64(Gpa gpa, uint64_t value) {
  return Awaitable<void>(GuestOp::Write{gpa, 8, value});
}
// LOCK CMPXCHG on the qword at `gpa`; returns the old value (== expected iff
// the exchange happened).
inline Awaitable<uint64_t> cmpxchg64(Gpa gpa, uint64_t expected, uint64_t desired) {
  return Awaitable<uint64_t>(GuestOp::CmpXchg{gpa, expected, desired});
}

// MSRs and CR8. rdmsr returns the MSR; read_cr8 the TPR class.
inline Awaitable<uint64_t> rdmsr(uint32_t msr) { return Awaitable<uint64_t>(GuestOp::Rdmsr{msr}); }
inline Awaitable<void> wrmsr(uint32_t msr, uint64_t value) {
  return Awaitable<void>(GuestOp::Wrmsr{msr, value});
}
inline Awaitable<void> write_cr8(uint64_t value) {
  return Awaitable<void>(GuestOp::WriteCr8{value});
}
inline Awaitable<uint64_t> read_cr8() { return Awaitable<uint64_t>(GuestOp::ReadCr8{}); }

// VMCALL; returns RAX as the handler left it.
inline Awaitable<uint64_t> vmcall(uint64_t nr, uint64_t a0 = 0, uint64_t a1 = 0,
                                  uint64_t a2 = 0) {
  return Awaitable<uint64_t>(GuestOp::Vmcall{nr, {a0, a1, a2}});
}

// Execution control and the local APIC.
inline Awaitable<void> hlt() { return Awaitable<void>(GuestOp::Hlt{}); }
inline Awaitable<void> pause() { return Awaitable<void>(GuestOp::Pause{}); }
// MONITOR + MWAIT on the qword at `gpa` while it holds `expected` (see
// GuestOp::Mwait); returns the qword when the vCPU wakes, which may still be
// `expected` (an interrupt, a kick, the timeout): callers loop.
inline Awaitable<uint64_t> mwait(Gpa gpa, uint64_t expected, uint64_t timeout_ns = 0) {
  return Awaitable<uint64_t>(GuestOp::Mwait{gpa, expected, timeout_ns});
}
// TPAUSE until now() reads `deadline_ns`, or an event comes first.
inline Awaitable<void> tpause(uint64_t deadline_ns) { return Awaitable<void>(GuestOp::Tpause{deadline_ns}); }
inline Awaitable<void> yield() { return Awaitable<void>(GuestOp::Yield{}); }
// Returns a monotonic clock in nanoseconds.
inline Awaitable<uint64_t> now() { return Awaitable<uint64_t>(GuestOp::Now{}); }
inline Awaitable<void> send_ipi(uint32_t dest_apic_id, uint8_t vector) {
  return Awaitable<void>(GuestOp::SendIpi{dest_apic_id, vector});
}
inline Awaitable<void> eoi() { return Awaitable<void>(GuestOp::Eoi{}); }

// VMX instructions (L1). Each returns the OpResult: check ok(), else
// outcome/vm_instruction_error. vmptrst and vmread put their result in value.
// vmlaunch/vmresume return only when the entry failed or, after a successful
// entry, when L2 has exited back to L1.
inline Awaitable<OpResult> vmxon(Gpa gpa) { return Awaitable<OpResult>(GuestOp::Vmxon{gpa}); }
inline Awaitable<OpResult> vmxoff() { return Awaitable<OpResult>(GuestOp::Vmxoff{}); }
inline Awaitable<OpResult> vmclear(Gpa gpa) { return Awaitable<OpResult>(GuestOp::Vmclear{gpa}); }
inline Awaitable<OpResult> vmptrld(Gpa gpa) { return Awaitable<OpResult>(GuestOp::Vmptrld{gpa}); }
inline Awaitable<OpResult> vmptrst() { return Awaitable<OpResult>(GuestOp::Vmptrst{}); }
inline Awaitable<OpResult> vmread(uint32_t field) {
  return Awaitable<OpResult>(GuestOp::Vmread{field});
}
inline Awaitable<OpResult> vmwrite(uint32_t field, uint64_t value) {
  return Awaitable<OpResult>(GuestOp::Vmwrite{field, value});
}
inline Awaitable<OpResult> vmlaunch() { return Awaitable<OpResult>(GuestOp::Vmlaunch{}); }
inline Awaitable<OpResult> vmresume() { return Awaitable<OpResult>(GuestOp::Vmresume{}); }
inline Awaitable<OpResult> invept(vmx::InveptType type, uint64_t eptp) {
  return Awaitable<OpResult>(GuestOp::Invept{type, eptp});
}
inline Awaitable<OpResult> invvpid(vmx::InvvpidType type, uint16_t vpid, uint64_t gla = 0) {
  return Awaitable<OpResult>(GuestOp::Invvpid{type, vpid, gla});
}

}  // namespace ops

}  // namespace nestcache::cpu
