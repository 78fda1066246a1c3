// Scenario files: JSON -> Case/Step (see scenario.h, docs/scenarios.md).
//
// The parser is strict: an unknown key, a missing operand, a name nobody
// defined or an outcome it cannot read is an error naming the file, the case
// and the step, so a typo never silently changes what a case checks.
#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "base/counters.h"
#include "vmx/evmcs.h"
#include "vmx/nested_state_format.h"
#include "vmx/vmcs12.h"
#include "workloads/scenario.h"

namespace nestcache::workloads::scenario {

using nlohmann::json;

namespace {

// How a step key is read.
enum class KeyKind { num, field, vcpu, special };

struct KeySpec {
  std::string_view name;
  KeyKind kind;
  bool required;
};

struct VerbSpec {
  std::string_view name;
  Verb verb;
  std::vector<KeySpec> keys;
};

constexpr KeySpec req(std::string_view n, KeyKind k = KeyKind::num) { return {n, k, true}; }
constexpr KeySpec opt(std::string_view n, KeyKind k = KeyKind::num) { return {n, k, false}; }

// Every verb and its keys. "value" is an operand for the writing verbs and
// the expected value for the reading ones (vmread, vmptrst, read, rdmsr,
// vmm_read); see value_is_expectation().
const std::vector<VerbSpec>& verbs() {
  static const std::vector<VerbSpec> v = {
      {"set_memory_region", Verb::set_memory_region, {req("slot"), req("size"), opt("gpa"), opt("flags"), opt("hva")}},
      {"delete_memslot", Verb::delete_memslot, {req("slot")}},
      {"move_memslot", Verb::move_memslot, {req("slot"), req("gpa")}},
      {"set_memslot_flags", Verb::set_memslot_flags, {req("slot"), req("flags")}},
      {"add_memslots", Verb::add_memslots,
       {req("first_slot"), req("count"), req("gpa"), req("size"), req("hva"), opt("stride"), opt("flags")}},
      {"vmm_write", Verb::vmm_write, {opt("gpa"), opt("hva"), opt("size"), opt("value"), opt("bytes", KeyKind::special)}},
      {"vmm_read", Verb::vmm_read, {opt("gpa"), opt("hva"), opt("size")}},
      {"get_nested_state", Verb::get_nested_state,
       {opt("vcpu", KeyKind::vcpu), opt("save_as", KeyKind::special), opt("check", KeyKind::special)}},
      {"set_nested_state", Verb::set_nested_state,
       {opt("vcpu", KeyKind::vcpu), opt("blob", KeyKind::special), opt("state", KeyKind::special),
        opt("patch", KeyKind::special)}},
      {"set_vp_assist_msr", Verb::set_vp_assist_msr, {opt("vcpu", KeyKind::vcpu), req("value")}},
      {"run", Verb::run, {opt("vcpu", KeyKind::vcpu)}},
      {"vmxon", Verb::vmxon, {req("gpa")}},
      {"vmxoff", Verb::vmxoff, {}},
      {"vmclear", Verb::vmclear, {req("gpa")}},
      {"vmptrld", Verb::vmptrld, {req("gpa")}},
      {"vmptrst", Verb::vmptrst, {}},
      {"vmread", Verb::vmread, {req("field", KeyKind::field)}},
      {"vmwrite", Verb::vmwrite, {req("field", KeyKind::field), req("value")}},
      {"vmlaunch", Verb::vmlaunch, {}},
      {"vmresume", Verb::vmresume, {}},
      {"invept", Verb::invept, {req("type"), opt("eptp")}},
      {"invvpid", Verb::invvpid, {req("type"), opt("vpid"), opt("gla")}},
      {"write", Verb::write, {req("gpa"), req("value"), opt("size")}},
      {"read", Verb::read, {req("gpa"), opt("size")}},
      {"wrmsr", Verb::wrmsr, {req("msr"), req("value")}},
      {"rdmsr", Verb::rdmsr, {req("msr")}},
      {"write_vmcs12", Verb::write_vmcs12,
       {opt("base", KeyKind::special), opt("set", KeyKind::special), opt("or", KeyKind::special),
        opt("clear", KeyKind::special)}},
      {"init_region", Verb::init_region, {req("gpa"), opt("revision")}},
      {"enter_vmx", Verb::enter_vmx, {opt("vmxon"), opt("vmcs")}},
      {"init_evmcs", Verb::init_evmcs, {opt("gpa")}},
      {"write_evmcs", Verb::write_evmcs,
       {opt("gpa"), opt("enlightenments"), opt("base", KeyKind::special), opt("set", KeyKind::special),
        opt("or", KeyKind::special), opt("clear", KeyKind::special)}},
      {"evmcs_write", Verb::evmcs_write, {opt("gpa"), req("field", KeyKind::field), req("value")}},
      {"load_evmcs", Verb::load_evmcs, {opt("vp_assist"), opt("gpa")}},
      {"enable_vp_assist", Verb::enable_vp_assist, {opt("gpa")}},
  };
  return v;
}

bool value_is_expectation(Verb v) {
  return v == Verb::vmread || v == Verb::vmptrst || v == Verb::read || v == Verb::rdmsr || v == Verb::vmm_read;
}

bool takes_qualification(Verb v) { return v == Verb::vmlaunch || v == Verb::vmresume || v == Verb::run; }

// Keys every step may have besides its verb's.
const std::set<std::string>& common_keys() {
  static const std::set<std::string> k = {"do", "vcpu", "expect", "counters", "note", "qualification"};
  return k;
}

std::string names_of(const json& obj) {
  std::string out;
  for (auto it = obj.begin(); it != obj.end(); ++it) out += (out.empty() ? "" : ", ") + it.key();
  return out;
}

// The VM every case starts from; a file's "vm" and a case's "vm" override
// it key by key ("pages" name by name).
const json& default_vm_json() {
  static const json v = json::parse(R"({
    "memory": "unmanaged", "strategy": "cache", "vcpus": 1, "evmcs": false,
    "regions": {"ram": "4M"},
    "memslots": [{"slot": 0, "gpa": 0, "region": "ram"}],
    "pages": {"vmxon": "0x10000", "vmcs": "0x11000", "vmcs2": "0x12000", "vmcs3": "0x13000",
              "evmcs": "0x14000", "evmcs2": "0x15000", "vp_assist": "0x16000", "msr_bitmap": "0x17000",
              "vapic": "0x18000", "apic_access": "0x19000", "pi_desc": "0x1a000", "ept": "0x1b000",
              "scratch": "0x1c000", "unbacked": "0x40000000"}
  })");
  return v;
}

void merge_vm(json& into, const json& over) {
  for (auto it = over.begin(); it != over.end(); ++it) {
    if (it.key() == "pages" && into.contains("pages") && it.value().is_object())
      into["pages"].update(it.value());
    else
      into[it.key()] = it.value();
  }
}

class Parser {
 public:
  explicit Parser(std::string path) : path_(std::move(path)) {}

  Result<ScenarioFile> file(const json& root);
  // A complete VM description (every key present: default_vm_json merged).
  Result<VmSpec> vm_spec(const json& merged);

 private:
  // "<path>: case 'x', step 3 (vmptrld): <what>"
  template <class... Args>
  tl::unexpected<Error> fail(fmt::format_string<Args...> f, Args&&... args) const {
    std::string where = path_;
    if (!case_.empty()) where += fmt::format(": case '{}'", case_);
    if (step_) where += fmt::format(", step {}{}", step_, verb_.empty() ? "" : fmt::format(" ({})", verb_));
    return make_error(EINVAL, where + ": " + fmt::format(f, std::forward<Args>(args)...));
  }

  Result<Case> one_case(const json& c, const json& file_vm, const std::string& file_family, size_t n);
  Result<std::vector<cpu::GuestOp>> l2_program(const json& l2);
  Result<Step> step(const json& s);
  Status step_specials(const json& s, Step& st);
  Result<Expect> expectation(const json& s, const Step& st);
  Result<Expr> expr(const json& v, std::string_view key);
  Result<Vmcs12Spec> vmcs12_spec(const json& s);
  Result<StateSpec> state_spec(const json& s);
  Result<std::vector<Patch>> patches(const json& p);
  Result<std::vector<BlobCheck>> checks(const json& c);
  // Where `what` ("flags", "vmcs12.guest_rip", a number) is in a blob.
  Result<HeaderField> blob_location(const std::string& what);

  std::string path_;
  std::string case_;
  size_t step_ = 0;
  std::string verb_;
  NameScope scope_;
  std::map<std::string, uint64_t> pages_;
  std::map<std::string, uint64_t> regions_;
  std::set<std::string> saved_blobs_;
};

Result<Expr> Parser::expr(const json& v, std::string_view key) {
  if (v.is_number_unsigned()) return Expr::of(v.get<uint64_t>());
  if (v.is_number_integer()) return Expr::of(static_cast<uint64_t>(v.get<int64_t>()));
  if (v.is_boolean()) return Expr::of(v.get<bool>() ? 1 : 0);
  if (!v.is_string()) return fail("'{}' must be a number or an expression string, not {}", key, v.type_name());
  auto e = parse_expr(v.get<std::string>(), scope_);
  if (!e) return fail("'{}': {}", key, e.error().message);
  return *e;
}

Result<VmSpec> Parser::vm_spec(const json& vm) {
  static const std::set<std::string> kKeys = {"memory", "strategy", "vcpus", "evmcs", "regions", "memslots", "pages"};
  VmSpec s;
  if (!vm.is_object()) return fail("'vm' must be an object");
  for (auto it = vm.begin(); it != vm.end(); ++it)
    if (!kKeys.count(it.key())) return fail("vm: unknown key '{}' (known: memory, strategy, vcpus, evmcs, regions, memslots, pages)", it.key());
  if (vm.contains("memory")) s.memory = vm["memory"].is_string() ? vm["memory"].get<std::string>() : "";
  if (s.memory != "managed" && s.memory != "unmanaged") return fail("vm.memory must be \"managed\" or \"unmanaged\"");
  if (vm.contains("strategy")) s.strategy = vm["strategy"].is_string() ? vm["strategy"].get<std::string>() : "";
  if (s.strategy != "map" && s.strategy != "cache" && s.strategy != "oracle")
    return fail("vm.strategy must be \"map\", \"cache\" or \"oracle\"");
  if (vm.contains("vcpus")) {
    if (!vm["vcpus"].is_number_unsigned() || vm["vcpus"].get<uint64_t>() < 1 || vm["vcpus"].get<uint64_t>() > 16)
      return fail("vm.vcpus must be a number from 1 to 16");
    s.vcpus = vm["vcpus"].get<int>();
  }
  if (vm.contains("evmcs")) {
    if (!vm["evmcs"].is_boolean()) return fail("vm.evmcs must be true or false");
    s.evmcs = vm["evmcs"].get<bool>();
  }
  scope_ = NameScope{nullptr, nullptr, false};
  if (vm.contains("regions")) {
    if (!vm["regions"].is_object()) return fail("vm.regions must be an object: name -> size");
    s.regions.clear();
    for (auto it = vm["regions"].begin(); it != vm["regions"].end(); ++it) {
      Expr size = NC_TRY(expr(it.value(), "vm.regions." + it.key()));
      uint64_t bytes = size.eval();
      if (bytes == 0 || !page_aligned(bytes) || bytes > (uint64_t{1} << 32))
        return fail("vm.regions.{}: size {:#x} must be a non-zero multiple of 4 KiB up to 4 GiB", it.key(), bytes);
      s.regions[it.key()] = bytes;
    }
  }
  for (auto& [name, size] : s.regions)
    if (constant_value(name) || control_bit(name)) return fail("vm.regions: '{}' is a reserved name", name);
  regions_ = s.regions;
  scope_ = NameScope{nullptr, &regions_, false};
  if (vm.contains("pages")) {
    if (!vm["pages"].is_object()) return fail("vm.pages must be an object: name -> address");
    for (auto it = vm["pages"].begin(); it != vm["pages"].end(); ++it) {
      if (regions_.count(it.key())) return fail("vm.pages: '{}' is also a region name", it.key());
      Expr e = NC_TRY(expr(it.value(), "vm.pages." + it.key()));
      if (e.uses_regions()) return fail("vm.pages.{}: a page is a guest-physical address, not a region", it.key());
      s.pages[it.key()] = e.eval();
    }
  }
  pages_ = s.pages;
  scope_ = NameScope{&pages_, &regions_, true};
  if (vm.contains("memslots")) {
    if (!vm["memslots"].is_array()) return fail("vm.memslots must be an array");
    s.memslots.clear();
    for (const json& m : vm["memslots"]) {
      static const std::set<std::string> kSlotKeys = {"slot", "gpa", "size", "region", "offset", "hva", "flags"};
      if (!m.is_object()) return fail("vm.memslots: each memslot is an object");
      for (auto it = m.begin(); it != m.end(); ++it)
        if (!kSlotKeys.count(it.key())) return fail("vm.memslots: unknown key '{}' (known: slot, gpa, size, region, offset, hva, flags)", it.key());
      VmSpec::Memslot ms;
      ms.slot = static_cast<uint32_t>(NC_TRY(expr(m.value("slot", json(0)), "slot")).eval());
      ms.flags = static_cast<uint32_t>(NC_TRY(expr(m.value("flags", json(0)), "flags")).eval());
      ms.gpa = NC_TRY(expr(m.value("gpa", json(0)), "gpa"));
      if (m.contains("region") == m.contains("hva")) return fail("vm.memslots: give exactly one of 'region' and 'hva'");
      if (m.contains("region")) {
        std::string r = m["region"].is_string() ? m["region"].get<std::string>() : "";
        if (!regions_.count(r)) return fail("vm.memslots: unknown region '{}' (regions: {})", r, names_of(vm.value("regions", json::object())));
        uint64_t off = NC_TRY(expr(m.value("offset", json(0)), "offset")).eval();
        ms.hva = NC_TRY(expr(json(fmt::format("{}+{:#x}", r, off)), "region"));
        ms.size = m.contains("size") ? NC_TRY(expr(m["size"], "size")) : Expr::of(regions_[r] - std::min(off, regions_[r]));
      } else {
        ms.hva = NC_TRY(expr(m["hva"], "hva"));
        if (!m.contains("size")) return fail("vm.memslots: a memslot given by 'hva' needs a 'size'");
        ms.size = NC_TRY(expr(m["size"], "size"));
      }
      s.memslots.push_back(std::move(ms));
    }
  }
  return s;
}

Result<std::vector<cpu::GuestOp>> Parser::l2_program(const json& l2) {
  using cpu::GuestOp;
  if (!l2.is_array() || l2.empty()) return fail("'l2' must be a non-empty array of operations");
  std::vector<GuestOp> ops;
  for (const json& o : l2) {
    const json obj = o.is_string() ? json{{"op", o}} : o;
    if (!obj.is_object() || !obj.contains("op") || !obj["op"].is_string())
      return fail("l2: each operation is a name (\"vmcall\") or an object with \"op\"");
    const std::string op = obj["op"].get<std::string>();
    auto num = [&](const char* k) -> Result<uint64_t> { return NC_TRY(expr(obj.value(k, json(0)), k)).eval(); };
    auto fld = [&]() -> Result<uint32_t> {
      auto f = parse_field(obj.value("field", json("")).is_string() ? obj["field"].get<std::string>() : "");
      if (!f) return fail("l2 {}: {}", op, f.error().message);
      return *f;
    };
    if (op == "vmcall") ops.push_back(GuestOp::Vmcall{});
    else if (op == "hlt") ops.push_back(GuestOp::Hlt{});
    else if (op == "rdmsr") ops.push_back(GuestOp::Rdmsr{static_cast<uint32_t>(NC_TRY(num("msr")))});
    else if (op == "wrmsr") ops.push_back(GuestOp::Wrmsr{static_cast<uint32_t>(NC_TRY(num("msr"))), NC_TRY(num("value"))});
    else if (op == "read") ops.push_back(GuestOp::Read{NC_TRY(num("gpa")), 8});
    else if (op == "write") ops.push_back(GuestOp::Write{NC_TRY(num("gpa")), 8, NC_TRY(num("value"))});
    else if (op == "write_cr8") ops.push_back(GuestOp::WriteCr8{NC_TRY(num("value"))});
    else if (op == "read_cr8") ops.push_back(GuestOp::ReadCr8{});
    else if (op == "vmread") ops.push_back(GuestOp::Vmread{NC_TRY(fld())});
    else if (op == "vmwrite") ops.push_back(GuestOp::Vmwrite{NC_TRY(fld()), NC_TRY(num("value"))});
    else if (op == "vmptrld") ops.push_back(GuestOp::Vmptrld{NC_TRY(num("gpa"))});
    else if (op == "vmclear") ops.push_back(GuestOp::Vmclear{NC_TRY(num("gpa"))});
    else if (op == "vmxon") ops.push_back(GuestOp::Vmxon{NC_TRY(num("gpa"))});
    else if (op == "vmxoff") ops.push_back(GuestOp::Vmxoff{});
    else if (op == "vmptrst") ops.push_back(GuestOp::Vmptrst{});
    else if (op == "vmlaunch") ops.push_back(GuestOp::Vmlaunch{});
    else if (op == "vmresume") ops.push_back(GuestOp::Vmresume{});
    else return fail("l2: unknown operation '{}' (vmcall, hlt, rdmsr, wrmsr, read, write, write_cr8, read_cr8, vmread, "
                     "vmwrite, vmptrld, vmclear, vmxon, vmxoff, vmptrst, vmlaunch, vmresume)", op);
  }
  return ops;
}

Result<Vmcs12Spec> Parser::vmcs12_spec(const json& s) {
  Vmcs12Spec v;
  if (s.contains("base")) {
    v.base = s["base"].is_string() ? s["base"].get<std::string>() : "";
    if (v.base != "minimal" && v.base != "zero") return fail("'base' must be \"minimal\" or \"zero\"");
  }
  for (auto [key, op] : {std::pair{"set", '='}, std::pair{"or", '|'}, std::pair{"clear", '&'}}) {
    if (!s.contains(key)) continue;
    if (!s[key].is_object()) return fail("'{}' must be an object: field -> value", key);
    for (auto it = s[key].begin(); it != s[key].end(); ++it) {
      auto f = parse_field(it.key());
      if (!f) return fail("'{}': {}", key, f.error().message);
      if (!vmx::find_vmcs12_field(*f & ~1u))
        return fail("'{}': field '{}' is not one the model's vmcs12 holds", key, it.key());
      v.edits.push_back({op, *f, NC_TRY(expr(it.value(), it.key()))});
    }
  }
  return v;
}

Result<StateSpec> Parser::state_spec(const json& s) {
  static const std::set<std::string> kKeys = {"vmxon", "vmcs", "guest_mode", "run_pending", "evmcs", "vmcs12"};
  if (!s.is_object()) return fail("'state' must be an object");
  for (auto it = s.begin(); it != s.end(); ++it)
    if (!kKeys.count(it.key())) return fail("state: unknown key '{}' (known: vmxon, vmcs, guest_mode, run_pending, evmcs, vmcs12)", it.key());
  StateSpec st;
  st.vmxon = NC_TRY(expr(s.value("vmxon", json("invalid")), "state.vmxon"));
  st.vmcs = NC_TRY(expr(s.value("vmcs", json("invalid")), "state.vmcs"));
  for (auto [key, member] : {std::pair{"guest_mode", &StateSpec::guest_mode}, std::pair{"run_pending", &StateSpec::run_pending},
                             std::pair{"evmcs", &StateSpec::evmcs}}) {
    if (!s.contains(key)) continue;
    if (!s[key].is_boolean()) return fail("state.{} must be true or false", key);
    st.*member = s[key].get<bool>();
  }
  if (s.contains("vmcs12")) {
    const json& v = s["vmcs12"];
    if (v.is_string()) st.vmcs12 = NC_TRY(vmcs12_spec(json{{"base", v}}));
    else if (v.is_object()) st.vmcs12 = NC_TRY(vmcs12_spec(v));
    else return fail("state.vmcs12 must be \"minimal\", \"zero\" or an object with base/set/or/clear");
  }
  return st;
}

Result<HeaderField> Parser::blob_location(const std::string& what) {
  if (auto h = nested_state_header_field(what)) return *h;
  // The vmcs12 region's header words (vmcs12.h), then its fields.
  if (what == "vmcs12.revision") return HeaderField{vmx::nested_state_offset::kVmcs12, 4};
  if (what == "vmcs12.abort_indicator") return HeaderField{vmx::nested_state_offset::kVmcs12 + 4, 4};
  if (what == "vmcs12.launch_state") return HeaderField{vmx::nested_state_offset::kVmcs12 + 8, 4};
  if (what.rfind("vmcs12.", 0) == 0) {
    auto f = parse_field(what.substr(7));
    const vmx::FieldInfo* info = f ? vmx::find_vmcs12_field(*f) : nullptr;
    if (!info) return fail("'{}': not a vmcs12 field", what);
    return HeaderField{vmx::nested_state_offset::kVmcs12 + info->page_offset, info->size};
  }
  return fail("unknown blob field '{}' (known: {})", what, nested_state_header_field_names());
}

Result<std::vector<Patch>> Parser::patches(const json& p) {
  if (!p.is_array()) return fail("'patch' must be an array");
  std::vector<Patch> out;
  for (const json& e : p) {
    if (!e.is_object()) return fail("patch: each entry is an object");
    Patch pt;
    if (e.contains("resize")) {
      pt.kind = Patch::Kind::resize;
      pt.size = NC_TRY(expr(e["resize"], "resize")).eval();
      if (pt.size > (1u << 20)) return fail("patch: resize to {} bytes is more than 1 MiB", pt.size);
      pt.what = fmt::format("resize {}", pt.size);
      out.push_back(pt);
      continue;
    }
    if (!e.contains("at") || !e.contains("value")) return fail("patch: each entry needs 'at' and 'value' (or 'resize')");
    if (e["at"].is_number_unsigned()) {
      pt.offset = e["at"].get<size_t>();
      pt.size = e.value("size", 1);
      pt.what = fmt::format("offset {}", pt.offset);
    } else if (e["at"].is_string()) {
      pt.what = e["at"].get<std::string>();
      HeaderField h = NC_TRY(blob_location(pt.what));
      pt.offset = h.offset;
      pt.size = e.value("size", h.size);
    } else {
      return fail("patch: 'at' is a byte offset or a field name");
    }
    if (pt.size != 1 && pt.size != 2 && pt.size != 4 && pt.size != 8) return fail("patch '{}': size must be 1, 2, 4 or 8", pt.what);
    pt.value = NC_TRY(expr(e["value"], "value"));
    out.push_back(pt);
  }
  return out;
}

Result<std::vector<BlobCheck>> Parser::checks(const json& c) {
  if (!c.is_object()) return fail("'check' must be an object: field -> value");
  std::vector<BlobCheck> out;
  for (auto it = c.begin(); it != c.end(); ++it) {
    BlobCheck bc;
    bc.what = it.key();
    if (bc.what == "size") {
      bc.offset = ~size_t{0};
    } else {
      HeaderField h = NC_TRY(blob_location(bc.what));
      bc.offset = h.offset;
      bc.size = h.size;
    }
    bc.value = NC_TRY(expr(it.value(), bc.what));
    out.push_back(bc);
  }
  return out;
}

Result<Expect> Parser::expectation(const json& s, const Step& st) {
  Expect e;
  const json ex = s.value("expect", json("ok"));
  if (!ex.is_string()) return fail("'expect' must be a string such as \"ok\", \"EINVAL\" or \"VMfailValid(7)\"");
  auto o = parse_outcome(ex.get<std::string>());
  if (!o) return fail("{}", o.error().message);
  e.outcome = *o;
  if (value_is_expectation(st.verb) && s.contains("value")) e.value = NC_TRY(expr(s["value"], "value"));
  if (s.contains("qualification")) {
    if (!takes_qualification(st.verb)) return fail("'qualification' is checked only for vmlaunch, vmresume and run");
    e.qualification = NC_TRY(expr(s["qualification"], "qualification"));
  }
  if (s.contains("check")) e.checks = NC_TRY(checks(s["check"]));
  if (s.contains("counters")) {
    if (!s["counters"].is_object()) return fail("'counters' must be an object: counter -> delta");
    for (auto it = s["counters"].begin(); it != s["counters"].end(); ++it) {
      if (!counter_from_name(it.key())) return fail("counters: unknown counter '{}'", it.key());
      e.counters[it.key()] = NC_TRY(expr(it.value(), it.key())).eval();
    }
  }
  return e;
}

Status Parser::step_specials(const json& s, Step& st) {
  if (s.contains("bytes")) {
    if (!s["bytes"].is_string() || s["bytes"].get<std::string>().size() % 2)
      return fail("'bytes' must be a string of hex digit pairs");
    const std::string hex = s["bytes"].get<std::string>();
    for (size_t i = 0; i < hex.size(); i += 2) {
      auto b = parse_expr("0x" + hex.substr(i, 2), NameScope{});
      if (!b) return fail("'bytes': '{}' is not a hex byte", hex.substr(i, 2));
      st.bytes.push_back(static_cast<uint8_t>(b->eval()));
    }
  }
  if (st.verb == Verb::write_vmcs12 || st.verb == Verb::write_evmcs) st.vmcs12 = NC_TRY(vmcs12_spec(s));
  if (s.contains("save_as")) {
    if (!s["save_as"].is_string()) return fail("'save_as' must be a name");
    st.save_as = s["save_as"].get<std::string>();
    saved_blobs_.insert(st.save_as);
  }
  if (st.verb == Verb::set_nested_state) {
    if (s.contains("blob") == s.contains("state")) return fail("give exactly one of 'blob' (a saved name) and 'state'");
    if (s.contains("blob")) {
      st.blob = s["blob"].is_string() ? s["blob"].get<std::string>() : "";
      if (!saved_blobs_.count(st.blob))
        return fail("blob '{}' was not saved by an earlier get_nested_state (save_as)", st.blob);
    } else {
      st.state = NC_TRY(state_spec(s["state"]));
    }
    if (s.contains("patch")) st.patches = NC_TRY(patches(s["patch"]));
  }
  return ok();
}

Result<Step> Parser::step(const json& s) {
  if (!s.is_object()) return fail("a step is an object with \"do\"");
  if (!s.contains("do") || !s["do"].is_string()) return fail("missing \"do\" (the step's verb)");
  verb_ = s["do"].get<std::string>();
  const VerbSpec* spec = nullptr;
  for (const VerbSpec& v : verbs())
    if (v.name == verb_) spec = &v;
  if (!spec) {
    std::string known;
    for (const VerbSpec& v : verbs()) known += (known.empty() ? "" : ", ") + std::string(v.name);
    return fail("unknown verb (known: {})", known);
  }
  Step st;
  st.verb = spec->verb;
  st.index = step_;
  st.label = verb_;
  for (auto it = s.begin(); it != s.end(); ++it) {
    bool known = common_keys().count(it.key()) || (it.key() == "value" && value_is_expectation(st.verb)) ||
                 (it.key() == "check" && st.verb == Verb::get_nested_state);
    for (const KeySpec& k : spec->keys) known = known || k.name == it.key();
    if (!known) return fail("unknown key '{}'", it.key());
  }
  for (const KeySpec& k : spec->keys) {
    if (!s.contains(k.name)) {
      if (k.required) return fail("missing '{}'", k.name);
      continue;
    }
    const json& v = s[std::string(k.name)];
    if (k.kind == KeyKind::num) {
      st.operands[std::string(k.name)] = NC_TRY(expr(v, k.name));
      st.label += fmt::format(" {}={}", k.name, v.is_string() ? v.get<std::string>() : v.dump());
    } else if (k.kind == KeyKind::field) {
      auto f = v.is_string() ? parse_field(v.get<std::string>())
                             : (v.is_number_unsigned() ? Result<uint32_t>(v.get<uint32_t>()) : parse_field(v.dump()));
      if (!f) return fail("'{}': {}", k.name, f.error().message);
      st.operands[std::string(k.name)] = Expr::of(*f);
      st.label += fmt::format(" {}={}", k.name, field_name(*f));
    }
  }
  if (s.contains("vcpu")) {
    if (!s["vcpu"].is_number_unsigned()) return fail("'vcpu' must be a vCPU index");
    st.vcpu = s["vcpu"].get<int>();
  }
  NC_TRY(step_specials(s, st));
  if (st.verb == Verb::vmm_write && st.has("value") == !st.bytes.empty()) return fail("give exactly one of 'value' and 'bytes'");
  if ((st.verb == Verb::vmm_write || st.verb == Verb::vmm_read) && st.has("gpa") == st.has("hva"))
    return fail("give exactly one of 'gpa' and 'hva'");
  st.expect = NC_TRY(expectation(s, st));
  return st;
}

Result<Case> Parser::one_case(const json& c, const json& file_vm, const std::string& file_family, size_t n) {
  static const std::set<std::string> kKeys = {"name", "follows", "family", "kvm_differs", "vm", "l2", "steps", "note"};
  case_ = fmt::format("#{}", n);
  step_ = 0;
  if (!c.is_object()) return fail("a case is an object");
  if (!c.contains("name") || !c["name"].is_string() || c["name"].get<std::string>().empty()) return fail("missing 'name'");
  Case out;
  out.name = case_ = c["name"].get<std::string>();
  for (auto it = c.begin(); it != c.end(); ++it)
    if (!kKeys.count(it.key())) return fail("unknown key '{}' (known: name, follows, family, kvm_differs, vm, l2, steps, note)", it.key());
  if (!c.contains("follows") || !c["follows"].is_string() || c["follows"].get<std::string>().empty())
    return fail("missing 'follows': name the upstream function or SDM section the case follows");
  out.follows = c["follows"].get<std::string>();
  out.family = c.value("family", file_family);
  out.kvm_differs = c.value("kvm_differs", "");
  json vm = default_vm_json();
  merge_vm(vm, file_vm);
  if (c.contains("vm")) {
    if (!c["vm"].is_object()) return fail("'vm' must be an object");
    merge_vm(vm, c["vm"]);
  }
  out.vm = NC_TRY(vm_spec(vm));
  out.l2 = c.contains("l2") ? NC_TRY(l2_program(c["l2"])) : std::vector<cpu::GuestOp>{cpu::GuestOp::Vmcall{}};
  if (!c.contains("steps") || !c["steps"].is_array() || c["steps"].empty()) return fail("missing 'steps' (a non-empty array)");
  saved_blobs_.clear();
  for (const json& s : c["steps"]) {
    step_++;
    verb_.clear();
    Step st = NC_TRY(step(s));
    if (st.vcpu >= out.vm.vcpus) return fail("vcpu {} does not exist (the VM has {})", st.vcpu, out.vm.vcpus);
    out.steps.push_back(std::move(st));
  }
  step_ = 0;
  return out;
}

Result<ScenarioFile> Parser::file(const json& root) {
  ScenarioFile f;
  f.path = path_;
  if (!root.is_object()) return fail("the file must hold a JSON object");
  json file_vm = json::object();
  std::string family;
  json cases;
  if (root.contains("cases")) {
    static const std::set<std::string> kKeys = {"family", "vm", "cases", "note"};
    for (auto it = root.begin(); it != root.end(); ++it)
      if (!kKeys.count(it.key())) return fail("unknown top-level key '{}' (known: family, vm, cases, note)", it.key());
    if (!root["cases"].is_array() || root["cases"].empty()) return fail("'cases' must be a non-empty array");
    if (root.contains("vm")) file_vm = root["vm"];
    if (!file_vm.is_object()) return fail("'vm' must be an object");
    family = root.value("family", "");
    cases = root["cases"];
  } else if (root.contains("steps") || root.contains("name")) {
    cases = json::array({root});  // a file holding one case
  } else {
    return fail("the file has no 'cases' and is not one case (with 'name', 'follows' and 'steps')");
  }
  std::set<std::string> names;
  for (size_t i = 0; i < cases.size(); i++) {
    Case c = NC_TRY(one_case(cases[i], file_vm, family, i + 1));
    if (!names.insert(c.name).second) return fail("two cases are named '{}'", c.name);
    f.cases.push_back(std::move(c));
    case_.clear();
  }
  return f;
}

}  // namespace

VmSpec default_vm() { return Parser("(the default VM)").vm_spec(default_vm_json()).value(); }

Result<ScenarioFile> parse_scenario_text(const std::string& text, const std::string& path) {
  json root;
  try {
    root = json::parse(text);
  } catch (const json::parse_error& e) {
    size_t line = 1, col = 1;
    for (size_t i = 0; i + 1 < e.byte && i < text.size(); i++) {
      if (text[i] == '\n') {
        line++;
        col = 1;
      } else {
        col++;
      }
    }
    std::string what = e.what();
    if (auto p = what.find("syntax error"); p != std::string::npos) what = what.substr(p);
    return errorf(EINVAL, "{}: not valid JSON at line {}, column {}: {}", path, line, col, what);
  }
  return Parser(path).file(root);
}

Result<ScenarioFile> parse_scenario_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) return errorf(ENOENT, "{}: cannot open the scenario file", path);
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return errorf(EIO, "{}: read error", path);
  return parse_scenario_text(text.str(), path);
}

}  // namespace nestcache::workloads::scenario
