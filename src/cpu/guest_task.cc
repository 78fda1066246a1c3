// GuestOp/OpResult formatting and GuestTask's driver side (cpu/guest_task.h).
#include "cpu/guest_task.h"

#include <cstdio>
#include <string>

#include <fmt/format.h>

namespace nestcache::cpu {
namespace {

template <class... Fs>
struct Overloaded : Fs... {
  using Fs::operator()...;
};
template <class... Fs>
Overloaded(Fs...) -> Overloaded<Fs...>;

template <class T, class... Ts>
constexpr bool kIsOneOf = (std::is_same_v<T, Ts> || ...);

std::string describe(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    return ex.what();
  } catch (...) {
    return "an exception not derived from std::exception";
  }
}

}  // namespace

bool GuestOp::is_vmx_instruction() const {
  return visit([]<class T>(const T&) {
    return kIsOneOf<T, Vmxon, Vmxoff, Vmclear, Vmptrld, Vmptrst, Vmread, Vmwrite, Vmlaunch,
                    Vmresume, Invept, Invvpid>;
  });
}

std::string to_string(const GuestOp& op) {
  using G = GuestOp;
  return op.visit(Overloaded{
      [](const G::Read& o) {
        return fmt::format("read(gpa={:#x}, size={})", o.gpa, unsigned{o.size});
      },
      [](const G::Write& o) {
        return fmt::format("write(gpa={:#x}, size={}, value={:#x})", o.gpa, unsigned{o.size},
                           o.value);
      },
      [](const G::CmpXchg& o) {
        return fmt::format("cmpxchg(gpa={:#x}, expected={:#x}, desired={:#x})", o.gpa, o.expected,
                           o.desired);
      },
      [](const G::Rdmsr& o) { return fmt::format("rdmsr(msr={:#x})", o.msr); },
      [](const G::Wrmsr& o) {
        return fmt::format("wrmsr(msr={:#x}, value={:#x})", o.msr, o.value);
      },
      [](const G::WriteCr8& o) { return fmt::format("write_cr8(value={:#x})", o.value); },
      [](const G::Vmcall& o) {
        return fmt::format("vmcall(nr={:#x}, args={:#x}, {:#x}, {:#x})", o.nr, o.args[0], o.args[1],
                           o.args[2]);
      },
      [](const G::Mwait& o) {
        return fmt::format("mwait(gpa={:#x}, expected={:#x}, timeout_ns={})", o.gpa, o.expected, o.timeout_ns);
      },
      [](const G::Tpause& o) { return fmt::format("tpause(deadline_ns={})", o.deadline_ns); },
      [](const G::SendIpi& o) {
        return fmt::format("send_ipi(dest={}, vector={:#x})", o.dest_apic_id, unsigned{o.vector});
      },
      [](const G::Vmxon& o) { return fmt::format("vmxon(gpa={:#x})", o.gpa); },
      [](const G::Vmclear& o) { return fmt::format("vmclear(gpa={:#x})", o.gpa); },
      [](const G::Vmptrld& o) { return fmt::format("vmptrld(gpa={:#x})", o.gpa); },
      [](const G::Vmread& o) { return fmt::format("vmread(field={:#x})", o.field); },
      [](const G::Vmwrite& o) {
        return fmt::format("vmwrite(field={:#x}, value={:#x})", o.field, o.value);
      },
      [](const G::Invept& o) {
        return fmt::format("invept(type={}, eptp={:#x})", static_cast<uint32_t>(o.type), o.eptp);
      },
      [](const G::Invvpid& o) {
        return fmt::format("invvpid(type={}, vpid={}, gla={:#x})", static_cast<uint32_t>(o.type),
                           o.vpid, o.gla);
      },
      // The operations without operands.
      [](const auto& o) { return fmt::format("{}()", o.kName); },
  });
}

GuestFault::GuestFault(const GuestOp& op, const OpResult& result)
    : op_(op),
      result_(result),
      message_(fmt::format("{} raised {}", to_string(op), to_string(result))) {}

namespace detail {

void run_stack(RootState& root, std::coroutine_handle<> h) {
  // Each resume() returns when that frame suspends: at an operation (no next,
  // stop), at a subtask call (next = the subtask) or at its end (next = its
  // caller, none at the root). Only this loop's frame stays on the stack.
  while (h) {
    h.resume();
    h = std::exchange(root.next, {});
  }
}

}  // namespace detail

GuestTask::~GuestTask() { destroy(); }

GuestTask& GuestTask::operator=(GuestTask&& other) noexcept {
  if (this != &other) {
    destroy();
    frame_ = std::move(other.frame_);
  }
  return *this;
}

void GuestTask::destroy() noexcept {
  if (!frame_.get()) return;
  promise_type& p = frame_.get().promise();
  if (p.root_ == &p.root_state_ && p.exception_ && !p.root_state_.exception_observed) {
    std::fprintf(stderr,
                 "nestcache: guest task destroyed with an exception nobody asked about: %s\n",
                 describe(p.exception_).c_str());
  }
  // Destroying the root frame destroys its locals, among them the owner of the
  // subtask it is suspended in, and so on down to the leaf.
  frame_.reset();
}

GuestTask::promise_type& GuestTask::promise() const {
  NC_CHECK(frame_.get());
  return frame_.get().promise();
}

detail::RootState& GuestTask::root() const {
  promise_type& p = promise();
  NC_CHECK(p.root_ == &p.root_state_);  // started, and as a root rather than a subtask
  return p.root_state_;
}

void GuestTask::start() {
  promise_type& p = promise();
  NC_CHECK(p.root_ == nullptr);  // neither started nor awaited as a subtask
  p.root_ = &p.root_state_;
  detail::run_stack(p.root_state_, frame_.get());
}

bool GuestTask::started() const { return promise().root_ != nullptr; }

bool GuestTask::done() const {
  NC_CHECK(frame_.get());
  return frame_.get().done();
}

const GuestOp* GuestTask::pending() const {
  if (promise().root_ == nullptr) return nullptr;
  return root().pending;
}

void GuestTask::resume_with(const OpResult& result) {
  detail::RootState& rs = root();
  NC_CHECK(rs.pending != nullptr);  // started, not done, and not inside resume_with
  switch (result.outcome) {
    case Outcome::ok:
      break;
    case Outcome::fail_invalid:
    case Outcome::fail_valid:
      NC_CHECK(rs.pending->is_vmx_instruction());
      break;
    case Outcome::fault:
      NC_CHECK(result.vector < 32);
      break;
  }
  rs.result = result;
  // Clear pending before resuming: the operation lives in the leaf's frame and
  // is gone once the leaf moves on.
  rs.pending = nullptr;
  detail::run_stack(rs, std::exchange(rs.leaf, {}));
}

bool GuestTask::failed() const {
  if (!done()) return false;
  promise_type& p = promise();
  p.root_state_.exception_observed = true;
  return static_cast<bool>(p.exception_);
}

void GuestTask::rethrow_if_failed() const {
  if (failed()) std::rethrow_exception(promise().exception_);
}

}  // namespace nestcache::cpu
