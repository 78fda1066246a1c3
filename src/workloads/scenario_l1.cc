// The L1 and L2 programs of a scenario (see scenario_l1.h).
#include "workloads/scenario_l1.h"

#include <stdexcept>

#include "guest/enlightened.h"
#include "guest/program.h"
#include "vmx/vmx_defs.h"

namespace nestcache::workloads::scenario {

using namespace guest::program;

// --- mailbox ----------------------------------------------------------------------------

void L1Mailbox::post(L1Command c) {
  MutexLock l(mu_);
  NC_CHECK(!command_);
  command_ = std::move(c);
  reply_.reset();
}

std::optional<L1Reply> L1Mailbox::wait_reply(std::chrono::milliseconds timeout) {
  MutexLock l(mu_);
  cv_.wait_for(mu_, timeout, [&]() NC_NO_THREAD_SAFETY_ANALYSIS { return reply_.has_value() || abandoned_; });
  std::optional<L1Reply> r = std::move(reply_);
  reply_.reset();
  if (!r) command_.reset();  // a later post must not find the lost one
  return r;
}

std::optional<SeenExit> L1Mailbox::wait_exit(std::chrono::milliseconds timeout) {
  MutexLock l(mu_);
  cv_.wait_for(mu_, timeout, [&]() NC_NO_THREAD_SAFETY_ANALYSIS { return !exits_.empty() || abandoned_; });
  if (exits_.empty()) return std::nullopt;
  SeenExit e = exits_.front();
  exits_.pop_front();
  return e;
}

void L1Mailbox::abandon() {
  MutexLock l(mu_);
  abandoned_ = true;
  cv_.notify_all();
}

std::optional<L1Command> L1Mailbox::take() {
  MutexLock l(mu_);
  std::optional<L1Command> c = std::move(command_);
  command_.reset();
  return c;
}

void L1Mailbox::reply(L1Reply r) {
  MutexLock l(mu_);
  reply_ = std::move(r);
  cv_.notify_all();
}

void L1Mailbox::file_exit(SeenExit e) {
  MutexLock l(mu_);
  exits_.push_back(e);
  cv_.notify_all();
}

// --- L1 ---------------------------------------------------------------------------------

namespace {

// VMREAD of one field; nullopt if the VMREAD itself failed.
GuestFn<std::optional<uint64_t>> read_field(uint32_t field) {
  OpResult r = co_await ops::exec(GuestOp{GuestOp::Vmread{field}});
  co_return r.ok() ? std::optional<uint64_t>(r.value) : std::nullopt;
}

// One instruction, with what L1 reads back after it.
GuestFn<L1Reply> run_op(GuestOp op) {
  L1Reply reply;
  reply.result = co_await ops::exec(op);
  if (reply.result.outcome == cpu::Outcome::fail_valid) {
    reply.error_field = co_await read_field(vmx::field::kVmInstructionError);
  } else if (reply.result.ok() && (op.is<GuestOp::Vmlaunch>() || op.is<GuestOp::Vmresume>())) {
    std::optional<uint64_t> reason = co_await read_field(vmx::field::kExitReason);
    if (reason) reply.exit_reason = static_cast<uint32_t>(*reason);
    reply.qualification = co_await read_field(vmx::field::kExitQualification);
  }
  co_return reply;
}

// VMWRITEs of every field of `image` L1 may write, plus the read-only ones
// the image sets; stops at the first failure.
GuestFn<L1Reply> write_vmcs12(const vmx::Vmcs12& image) {
  for (const vmx::FieldInfo& f : vmx::vmcs12_fields()) {
    const uint64_t value = image.read(f.encoding).value();
    if (f.read_only() && value == 0) continue;
    L1Reply r = co_await run_op(GuestOp{GuestOp::Vmwrite{f.encoding, value}});
    if (!r.result.ok()) {
      r.failed_at = fmt::format("VMWRITE {} = {:#x}", f.name, value);
      co_return r;
    }
  }
  co_return L1Reply{};
}

// VMXON on `vmxon`, then VMCLEAR + VMPTRLD of `vmcs`, each region given the
// revision identifier first.
GuestFn<L1Reply> enter_vmx(Gpa vmxon, Gpa vmcs) {
  co_await ops::exec(GuestOp{GuestOp::Write{vmxon, 4, vmx::kVmcs12Revision}});
  co_await ops::exec(GuestOp{GuestOp::Write{vmcs, 4, vmx::kVmcs12Revision}});
  const GuestOp steps[] = {GuestOp::Vmxon{vmxon}, GuestOp::Vmclear{vmcs}, GuestOp::Vmptrld{vmcs}};
  for (const GuestOp& op : steps) {
    L1Reply r = co_await run_op(op);
    if (!r.result.ok()) {
      r.failed_at = cpu::to_string(op);
      co_return r;
    }
  }
  co_return L1Reply{};
}

GuestFn<L1Reply> execute(const L1Command& c) {
  switch (c.kind) {
    case L1Command::Kind::op: co_return co_await run_op(c.op);
    case L1Command::Kind::write_vmcs12: co_return co_await write_vmcs12(c.image);
    case L1Command::Kind::write_evmcs:
      co_await guest::write_evmcs(c.gpa, c.image, c.enlightenments);
      co_return L1Reply{};
    case L1Command::Kind::evmcs_write:
      co_await guest::evmcs_write(c.gpa, c.field, c.value);
      co_return L1Reply{};
    case L1Command::Kind::load_evmcs:
      co_await guest::load_evmcs(c.gpa2, c.gpa);
      co_return L1Reply{};
    case L1Command::Kind::enter_vmx: co_return co_await enter_vmx(c.gpa, c.gpa2);
    case L1Command::Kind::quit: break;
  }
  co_return L1Reply{};
}

// A reflected exit completed L1's HLT: file what L1 reads about it. Returns
// true when the exit was the runner's wake IPI itself, taken by an L2 with
// external-interrupt exiting (acknowledged on exit): that is a wake-up.
GuestFn<bool> file_seen_exit(L1Mailbox& mb) {
  std::optional<uint64_t> reason = co_await read_field(vmx::field::kExitReason);
  std::optional<uint64_t> qual = co_await read_field(vmx::field::kExitQualification);
  std::optional<uint64_t> info = co_await read_field(vmx::field::kExitInterruptionInfo);
  if (reason == static_cast<uint64_t>(vmx::ExitReason::kExternalInterrupt) && info &&
      (*info & vmx::intr_info::kValid) && (*info & vmx::intr_info::kVectorMask) == kWakeVector)
    co_return true;
  mb.file_exit(SeenExit{static_cast<uint32_t>(reason.value_or(~uint64_t{0})), qual.value_or(0)});
  co_return false;
}

}  // namespace

GuestTask l1_server(L1Mailbox& mb) {
  // Every command comes with one wake IPI, and L1 takes a command only after
  // a halt has consumed an IPI: no wake vector is ever left pending in L1's
  // APIC, where it would exit an L2 that has external-interrupt exiting.
  for (;;) {
    OpResult woke = co_await ops::exec(GuestOp{GuestOp::Hlt{}});
    // A halt ends with the vector that woke it; with none, an L2 exit
    // reflected to L1 completed it (L1 was in guest mode by a restore).
    if (woke.ok() && woke.value == 0) {
      const bool wake = co_await file_seen_exit(mb);
      if (!wake) continue;
    }
    std::optional<L1Command> cmd = mb.take();
    if (!cmd) continue;  // the wake-up of a command the runner gave up on
    if (cmd->kind == L1Command::Kind::quit) co_return;
    L1Reply reply = co_await execute(*cmd);
    mb.reply(std::move(reply));
  }
}

// --- L2 ---------------------------------------------------------------------------------

GuestTask l2_program(std::vector<GuestOp> program, L2Faults& faults) {
  for (;;) {
    for (const GuestOp& op : program) {
      if (faults.abort.load()) throw std::runtime_error("the scenario runner stopped this L2 (a step hung)");
      OpResult r = co_await ops::exec(op);
      if (r.outcome != cpu::Outcome::fault) continue;
      faults.last_vector.store(r.vector);
      faults.count.fetch_add(1);
      co_await ops::exec(GuestOp{GuestOp::Vmcall{kL2FaultVmcall}});
    }
  }
}

}  // namespace nestcache::workloads::scenario
