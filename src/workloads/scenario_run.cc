// Running a scenario case: the session's lifecycle, the L1 steps and the
// judgement of each step (see scenario_session.h).
#include <set>

#include "vmx/entry_checks.h"
#include "vmx/evmcs.h"
#include "host/fault_injection.h"
#include "workloads/nested_env.h"
#include "workloads/scenario_session.h"

namespace nestcache::workloads::scenario {

using cpu::GuestOp;

namespace {

// Longer than any case; only a case whose step hung runs into it, and then
// the L2 abort flag ends it much sooner.
constexpr std::chrono::minutes kMachineTimeout{2};
// How long stop_machine() keeps re-sending the quit's wake-up.
constexpr std::chrono::seconds kQuitPatience{5};

vmx::StrategyKind strategy_of(const std::string& s) {
  if (s == "map") return vmx::StrategyKind::map;
  if (s == "oracle") return vmx::StrategyKind::oracle;
  return vmx::StrategyKind::cache;
}

std::string hex(uint64_t v) { return fmt::format("{:#x}", v); }

}  // namespace

bool is_l1_verb(Verb v) { return v >= Verb::vmxon; }

bool CaseResult::passed() const { return setup_error.empty() && leaked.empty() && mismatches() == 0; }

size_t CaseResult::mismatches() const {
  size_t n = 0;
  for (const StepResult& s : steps) n += s.ok ? 0 : 1;
  return n;
}

// --- lifecycle --------------------------------------------------------------------------

Result<std::unique_ptr<Session>> Session::start(const Case& c, const RunConfig& config) {
  std::unique_ptr<Session> s(new Session(c, config));
  NC_TRY(s->build());
  Session* raw = s.get();
  auto runner = host::start_thread("the machine's runner thread", [raw] {
    Status st = raw->machine_->run(kMachineTimeout);
    {
      // Done before the mailboxes are abandoned: a runner woken by the
      // abandonment must find the reason.
      MutexLock l(raw->done_mu_);
      raw->done_ = true;
      raw->status_ = std::move(st);
    }
    for (auto& mb : raw->mailboxes_) mb->abandon();
  });
  if (!runner) return tl::unexpected(runner.error());
  s->machine_thread_ = std::move(*runner);
  return s;
}

Status Session::build() {
  const VmSpec& v = case_.vm;
  const host::FrameKind kind = v.memory == "managed" ? host::FrameKind::managed : host::FrameKind::unmanaged;
  size_t frames = 1024;
  for (const auto& [name, bytes] : v.regions) frames += bytes / kPageSize;
  phys_ = NC_TRY(host::PhysMem::create({kind == host::FrameKind::managed ? frames : 64,
                                        kind == host::FrameKind::unmanaged ? frames : 64}));
  phys_->set_stale_access_fatal(false);
  mm_ = std::make_unique<host::HostMm>(*phys_);
  vm_ = std::make_unique<vm::Vm>(*mm_, 1);
  for (const auto& [name, bytes] : v.regions) {
    auto hva = mm_->create_region(bytes, kind);
    if (!hva) return errorf(hva.error().code, "region '{}': {}", name, hva.error().message);
    regions_[name] = *hva;
  }
  for (const VmSpec::Memslot& m : v.memslots) {
    vm::MemoryRegion r{m.slot, m.flags, eval(m.gpa), eval(m.size), eval(m.hva)};
    if (auto st = vm_->set_memory_region(r); !st)
      return errorf(EINVAL, "vm.memslots: slot {} is refused: {}", m.slot, st.error().to_string());
  }
  machine_ = std::make_unique<cpu::Machine>(
      *vm_, cpu::MachineConfig{v.vcpus, strategy_of(v.strategy), /*exit_cost_ns=*/0, /*retry_internal_errors=*/false});
  for (int i = 0; i < v.vcpus; i++) {
    if (v.evmcs) machine_->vcpu(i).nested().enable_evmcs();
    mailboxes_.push_back(std::make_unique<L1Mailbox>());
    machine_->set_l1_program(i, l1_server(*mailboxes_.back()));
  }
  bind_l2_programs();
  return ok();
}

// Every address an L2 may be entered at gets an L2 program before the
// machine starts: the named pages, every VMCS or eVMCS operand, and the
// current-VMCS address of every blob built or patched.
void Session::bind_l2_programs() {
  std::set<Gpa> at;
  for (const auto& [name, gpa] : case_.vm.pages) at.insert(gpa);
  for (const Step& s : case_.steps) {
    for (const char* key : {"gpa", "vmcs", "vmxon"})
      if (s.has(key)) at.insert(eval(s.operand(key)));
    if (s.state) at.insert(eval(s.state->vmcs));
    for (const Patch& p : s.patches) at.insert(eval(p.value));
  }
  for (Gpa g : at)
    if (page_aligned(g)) machine_->bind_l2_program(g, l2_program(case_.l2, l2_faults_));
}

void Session::stop_machine() {
  if (!machine_thread_.joinable()) return;
  for (size_t i = 0; i < mailboxes_.size(); i++) {
    L1Command quit;
    quit.kind = L1Command::Kind::quit;
    mailboxes_[i]->take();  // drop an unanswered command, if any
    mailboxes_[i]->post(quit);
  }
  // The wake-up again until the machine ends: a vCPU that a restore put in
  // guest mode may take one as an L2 exit before L1 halts for it.
  const auto give_up = std::chrono::steady_clock::now() + kQuitPatience;
  while (!machine_done() && std::chrono::steady_clock::now() < give_up) {
    for (size_t i = 0; i < mailboxes_.size(); i++)
      machine_->send_ipi(static_cast<int>(i), static_cast<uint32_t>(i), kWakeVector);
    for (int n = 0; n < 40 && !machine_done(); n++) std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  l2_faults_.abort.store(true);
  machine_thread_.join();
}

std::string Session::tear_down() {
  stop_machine();
  machine_.reset();  // vCPUs and their caches go first
  const Leaks left = resources_left(*phys_, *vm_);
  return left.no_resources_left() ? std::string() : left.resources_to_string();
}

Session::~Session() {
  stop_machine();
  machine_.reset();  // before the VM: vCPUs and their caches go first
  vm_.reset();
}

bool Session::machine_done() {
  MutexLock l(done_mu_);
  return done_;
}

Observation Session::stopped_observation() {
  MutexLock l(done_mu_);
  Observation o;
  const std::string why = status_ ? std::string("every L1 program returned") : status_.error().to_string();
  if (!status_ && why.find("KVM internal error") != std::string::npos) {
    o.outcome = {Outcome::Kind::internal_error, 0};
    o.detail = why;
    return o;
  }
  o.outcome = {Outcome::Kind::error, 0};
  o.detail = "the machine has stopped: " + why;
  return o;
}

// --- L1 steps -------------------------------------------------------------------------------

Observation Session::post_and_wait(int vcpu, L1Command cmd) {
  if (machine_done()) return stopped_observation();
  L1Mailbox& mb = *mailboxes_.at(vcpu);
  mb.post(std::move(cmd));
  machine_->send_ipi(vcpu, static_cast<uint32_t>(vcpu), kWakeVector);
  std::optional<L1Reply> r = mb.wait_reply(config_.step_timeout);
  if (!r) {
    if (machine_done()) return stopped_observation();
    l2_faults_.abort.store(true);  // stop an L2 that never exits, and with it the machine
    Observation o;
    o.outcome = {Outcome::Kind::error, 0};
    o.detail = fmt::format("L1 did not answer within {} ms; the case is stopped", config_.step_timeout.count());
    return o;
  }
  Observation o;
  o.detail = r->failed_at;
  const cpu::OpResult& res = r->result;
  switch (res.outcome) {
    case cpu::Outcome::ok: o.outcome = {Outcome::Kind::ok, 0}; break;
    case cpu::Outcome::fail_invalid: o.outcome = {Outcome::Kind::fail_invalid, 0}; break;
    case cpu::Outcome::fail_valid: o.outcome = {Outcome::Kind::fail_valid, res.vm_instruction_error}; break;
    case cpu::Outcome::fault: o.outcome = {Outcome::Kind::fault, res.vector}; break;
  }
  if (res.outcome == cpu::Outcome::fail_valid && r->error_field != uint64_t{res.vm_instruction_error})
    o.problem = fmt::format("the VM-instruction error field reads {}, not {}",
                            r->error_field ? hex(*r->error_field) : "nothing (VMREAD failed)", res.vm_instruction_error);
  if (r->exit_reason) {
    const uint32_t reason = *r->exit_reason;
    o.outcome = {reason & vmx::kExitReasonEntryFailure ? Outcome::Kind::entry_failure : Outcome::Kind::exit,
                 reason & vmx::kExitReasonBasicMask};
    o.qualification = r->qualification;
  } else if (res.ok()) {
    o.value = res.value;
  }
  return o;
}

vmx::Vmcs12 Session::build_vmcs12(const Vmcs12Spec& spec) const {
  vmx::Vmcs12 v = spec.base == "zero" ? vmx::Vmcs12{} : vmx::minimal_vmcs12();
  v.revision_id = vmx::kVmcs12Revision;
  for (const Vmcs12Spec::Edit& e : spec.edits) {
    const uint64_t x = eval(e.value);
    const uint64_t old = v.read(e.field).value_or(0);
    const uint64_t now = e.op == '=' ? x : e.op == '|' ? old | x : old & ~x;
    (void)v.write_any(e.field, now);
  }
  return v;
}

Observation Session::l1_step(const Step& s) {
  L1Command c;
  auto gpa = [&](const char* key, const char* page_name) { return operand(s, key, page(page_name)); };
  switch (s.verb) {
    case Verb::vmxon: c.op = GuestOp::Vmxon{eval(s.operand("gpa"))}; break;
    case Verb::vmxoff: c.op = GuestOp::Vmxoff{}; break;
    case Verb::vmclear: c.op = GuestOp::Vmclear{eval(s.operand("gpa"))}; break;
    case Verb::vmptrld: c.op = GuestOp::Vmptrld{eval(s.operand("gpa"))}; break;
    case Verb::vmptrst: c.op = GuestOp::Vmptrst{}; break;
    case Verb::vmread: c.op = GuestOp::Vmread{static_cast<uint32_t>(eval(s.operand("field")))}; break;
    case Verb::vmwrite:
      c.op = GuestOp::Vmwrite{static_cast<uint32_t>(eval(s.operand("field"))), eval(s.operand("value"))};
      break;
    case Verb::vmlaunch: c.op = GuestOp::Vmlaunch{}; break;
    case Verb::vmresume: c.op = GuestOp::Vmresume{}; break;
    case Verb::invept:
      c.op = GuestOp::Invept{static_cast<vmx::InveptType>(eval(s.operand("type"))), operand(s, "eptp", 0)};
      break;
    case Verb::invvpid:
      c.op = GuestOp::Invvpid{static_cast<vmx::InvvpidType>(eval(s.operand("type"))),
                              static_cast<uint16_t>(operand(s, "vpid", 0)), operand(s, "gla", 0)};
      break;
    case Verb::write:
      c.op = GuestOp::Write{eval(s.operand("gpa")), static_cast<uint8_t>(operand(s, "size", 8)), eval(s.operand("value"))};
      break;
    case Verb::read: c.op = GuestOp::Read{eval(s.operand("gpa")), static_cast<uint8_t>(operand(s, "size", 8))}; break;
    case Verb::wrmsr: c.op = GuestOp::Wrmsr{static_cast<uint32_t>(eval(s.operand("msr"))), eval(s.operand("value"))}; break;
    case Verb::rdmsr: c.op = GuestOp::Rdmsr{static_cast<uint32_t>(eval(s.operand("msr")))}; break;
    case Verb::init_region:
      c.op = GuestOp::Write{eval(s.operand("gpa")), 4, operand(s, "revision", vmx::kVmcs12Revision)};
      break;
    case Verb::init_evmcs: c.op = GuestOp::Write{gpa("gpa", "evmcs"), 4, vmx::kEvmcsRevision}; break;
    case Verb::enable_vp_assist:
      c.op = GuestOp::Wrmsr{vmx::kHvX64MsrVpAssistPage, gpa("gpa", "vp_assist") | vmx::kVpAssistPageEnable};
      break;
    case Verb::write_vmcs12:
      c.kind = L1Command::Kind::write_vmcs12;
      c.image = build_vmcs12(*s.vmcs12);
      break;
    case Verb::write_evmcs:
      c.kind = L1Command::Kind::write_evmcs;
      c.image = build_vmcs12(*s.vmcs12);
      c.gpa = gpa("gpa", "evmcs");
      c.enlightenments = static_cast<uint32_t>(operand(s, "enlightenments", 0));
      break;
    case Verb::evmcs_write:
      c.kind = L1Command::Kind::evmcs_write;
      c.gpa = gpa("gpa", "evmcs");
      c.field = static_cast<uint32_t>(eval(s.operand("field")));
      c.value = eval(s.operand("value"));
      break;
    case Verb::load_evmcs:
      c.kind = L1Command::Kind::load_evmcs;
      c.gpa = gpa("gpa", "evmcs");
      c.gpa2 = gpa("vp_assist", "vp_assist");
      break;
    case Verb::enter_vmx:
      c.kind = L1Command::Kind::enter_vmx;
      c.gpa = gpa("vmxon", "vmxon");
      c.gpa2 = gpa("vmcs", "vmcs");
      break;
    default: break;
  }
  const uint64_t faults_before = l2_faults_.count.load();
  Observation o = post_and_wait(s.vcpu, std::move(c));
  if (l2_faults_.count.load() != faults_before)
    o.detail += fmt::format("{}L2 took exception #{} on one of its operations", o.detail.empty() ? "" : "; ",
                            l2_faults_.last_vector.load());
  return o;
}

// `run`: a vCPU the VMM put into guest mode enters L2 on its own; wait for
// the L2 exit L1 then sees, or for the entry to fail.
Observation Session::run_restored(const Step& s) {
  Observation o;
  std::optional<SeenExit> e = mailboxes_.at(s.vcpu)->wait_exit(config_.step_timeout);
  if (!e) {
    if (machine_done()) return stopped_observation();
    o.outcome = {Outcome::Kind::error, 0};
    o.detail = fmt::format("no L2 exit reached L1 within {} ms (is the vCPU in guest mode?)", config_.step_timeout.count());
    return o;
  }
  o.outcome = {e->exit_reason & vmx::kExitReasonEntryFailure ? Outcome::Kind::entry_failure : Outcome::Kind::exit,
               e->exit_reason & vmx::kExitReasonBasicMask};
  o.qualification = e->qualification;
  return o;
}

StepResult Session::run_step(const Step& s) {
  const CounterSnapshot before = machine_->counters();
  Observation o = is_l1_verb(s.verb) ? l1_step(s) : s.verb == Verb::run ? run_restored(s) : vmm_step(s);
  const CounterSnapshot delta = machine_->counters() - before;
  std::map<std::string, uint64_t> deltas;
  for (const auto& [name, want] : s.expect.counters) deltas[name] = delta[*counter_from_name(name)];
  return judge(s, o, regions_, deltas);
}

// --- judging ---------------------------------------------------------------------------------

namespace {

// Compares one blob check; empty when it holds.
std::string check_blob(const BlobCheck& c, const std::vector<std::byte>& blob, uint64_t want) {
  uint64_t got = 0;
  if (c.offset == ~size_t{0}) {
    got = blob.size();
  } else if (c.offset + c.size <= blob.size()) {
    std::memcpy(&got, blob.data() + c.offset, c.size);
  } else {
    return fmt::format("{}: the blob ({} bytes) does not reach it", c.what, blob.size());
  }
  return got == want ? std::string() : fmt::format("{} is {:#x}, expected {:#x}", c.what, got, want);
}

}  // namespace

StepResult judge(const Step& s, const Observation& o, const std::map<std::string, Hva>& regions,
                 const std::map<std::string, uint64_t>& counter_deltas) {
  StepResult r;
  r.index = s.index;
  r.label = s.label;
  r.detail = o.detail;
  const Expect& e = s.expect;
  r.expected = e.outcome.to_string();
  r.observed = o.outcome.to_string();
  // The outcome is printed beside the expected one; `wrong` collects what
  // else differed.
  std::vector<std::string> wrong;
  const bool outcome_ok = o.outcome == e.outcome;
  if (e.value) {
    const uint64_t want = e.value->eval(regions);
    r.expected += ", value " + hex(want);
    if (o.value) r.observed += ", value " + hex(*o.value);
    if (o.value != want) wrong.push_back("value");
  }
  if (e.qualification) {
    const uint64_t want = e.qualification->eval(regions);
    r.expected += ", qualification " + hex(want);
    if (o.qualification) r.observed += ", qualification " + hex(*o.qualification);
    if (o.qualification != want) wrong.push_back("qualification");
  }
  for (const BlobCheck& c : e.checks) {
    if (o.outcome.kind != Outcome::Kind::ok) break;
    std::string bad = check_blob(c, o.blob, c.value.eval(regions));
    if (!bad.empty()) wrong.push_back(bad);
  }
  for (const auto& [name, want] : e.counters) {
    const uint64_t got = counter_deltas.at(name);
    r.expected += fmt::format(", {} +{}", name, want);
    r.observed += fmt::format(", {} +{}", name, got);
    if (got != want) wrong.push_back(fmt::format("{} went up by {}, expected {}", name, got, want));
  }
  if (!o.problem.empty()) wrong.push_back(o.problem);
  r.ok = outcome_ok && wrong.empty();
  if (!wrong.empty()) {
    std::string why;
    for (const std::string& w : wrong) why += (why.empty() ? "" : "; ") + w;
    r.detail = r.detail.empty() ? why : why + " (" + r.detail + ")";
  }
  return r;
}

CaseResult run_case(const Case& c, const RunConfig& config) {
  CaseResult out;
  out.name = c.name;
  out.follows = c.follows;
  out.family = c.family;
  out.kvm_differs = c.kvm_differs;
  auto session = Session::start(c, config);
  if (!session) {
    out.setup_error = session.error().to_string();
    out.setup_errno = session.error().code;
    return out;
  }
  for (const Step& s : c.steps) out.steps.push_back((*session)->run_step(s));
  out.leaked = (*session)->tear_down();
  return out;
}

}  // namespace nestcache::workloads::scenario
