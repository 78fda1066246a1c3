// Scenario files: JSON -> Case/Step (see scenario.h, docs/scenarios.md).
//
// The parser is strict: an unknown key, a missing operand, a name nobody
// defined or an outcome it cannot read is an error naming the file, the case
// and the step, so a typo never silently changes what a case checks.
#include <algorithm>
#include <fstream>
#include <set>

#include "base/counters.h"
#include "workloads/scenario_parser.h"

namespace nestcache::workloads::scenario {

using detail::json;
using detail::Parser;

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

}  // namespace

namespace detail {

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
      // A delta of counters that only go up: a negative number (two's
      // complement once evaluated) names a count no step reaches, so the
      // case could never pass.
      const uint64_t delta = NC_TRY(expr(it.value(), it.key())).eval();
      if (delta > uint64_t{INT64_MAX})
        return fail("counters: '{}' is how much the counter goes up during the step: a count of zero or more, not {}",
                    it.key(), it.value().is_string() ? it.value().get<std::string>() : it.value().dump());
      e.counters[it.key()] = delta;
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

Result<uint64_t> Parser::number(const Expr& e, std::string_view key, std::string_view where) {
  if (e.uses_regions())
    return fail("{}'{}' {} names a region: its value is a number, not a host address", where, key, e.text);
  return e.eval();
}

Result<uint32_t> Parser::u32_field(const Expr& e, std::string_view key, std::string_view where) {
  const uint64_t v = NC_TRY(number(e, key, where));
  if (v > UINT32_MAX) return fail("{}'{}' {} does not fit KVM's 32-bit field (at most 0xffffffff)", where, key, e.text);
  return static_cast<uint32_t>(v);
}

// Operands the runner passes on at a fixed width: KVM's memslot slot and
// flags, a region's revision identifier and the eVMCS enlightenments are 32
// bits (a wider value would be cut short without a word: slot 0x100000000
// is slot 0), and an access moves 1, 2, 4 or 8 bytes (no instruction moves
// another width). A region's address is no such value.
Status Parser::operand_widths(const Step& st) {
  auto constant = [&](const char* key) { return number(st.operand(key), key); };
  for (const char* key : {"slot", "first_slot", "flags", "revision", "enlightenments"})
    if (st.has(key)) NC_TRY(u32_field(st.operand(key), key));
  if (st.verb == Verb::add_memslots && st.has("first_slot") && st.has("count")) {
    const uint64_t first = NC_TRY(constant("first_slot")), count = NC_TRY(constant("count"));
    if (count > 0 && count - 1 > UINT32_MAX - first)
      return fail("'count' {} slots from 'first_slot' {} go past slot 0xffffffff, KVM's 32-bit slot field", count,
                  first);
  }
  // The model's INVEPT / INVVPID operations hold a 32-bit type and a 16-bit
  // VPID: a wider value would reach L0 cut short (type 0x100000001 as 1, a
  // valid type), so a case cannot ask what KVM does with the upper bits.
  if (st.verb == Verb::invept || st.verb == Verb::invvpid) {
    for (auto [key, bits] : {std::pair{"type", 32}, std::pair{"vpid", 16}}) {
      if (!st.has(key)) continue;
      if (NC_TRY(constant(key)) >> bits)
        return fail("'{}' {} is wider than the {} bits the model's {} operand holds", key, st.operand(key).text, bits,
                    st.verb == Verb::invept ? "INVEPT" : "INVVPID");
    }
  }
  const bool access = st.verb == Verb::read || st.verb == Verb::write || st.verb == Verb::vmm_read ||
                      st.verb == Verb::vmm_write;
  if (access && st.has("size")) {
    const uint64_t size = NC_TRY(constant("size"));
    if (!is_access_width(size))
      return fail("'size' {} is not 1, 2, 4 or 8 bytes", size);
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
                             : (v.is_number_unsigned() && v.get<uint64_t>() <= UINT32_MAX ? Result<uint32_t>(v.get<uint32_t>())
                                                                                         : parse_field(v.dump()));
      if (!f) return fail("'{}': {}", k.name, f.error().message);
      st.operands[std::string(k.name)] = Expr::of(*f);
      st.label += fmt::format(" {}={}", k.name, field_name(*f));
    }
  }
  if (s.contains("vcpu")) {
    if (!s["vcpu"].is_number_unsigned() || s["vcpu"].get<uint64_t>() > kMaxVcpus)
      return fail("'vcpu' must be a vCPU index");
    st.vcpu = s["vcpu"].get<int>();
  }
  NC_TRY(step_specials(s, st));
  NC_TRY(operand_widths(st));
  if (st.verb == Verb::vmm_write && st.has("value") == !st.bytes.empty()) return fail("give exactly one of 'value' and 'bytes'");
  if (st.verb == Verb::vmm_write && !st.bytes.empty() && st.has("size"))
    return fail("'size' goes with 'value'; 'bytes' writes as many bytes as it holds");
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
  // The name is printed as it is on a line of the report and matched by
  // --case: a control character (a newline, NUL, an escape) would garble both
  // (a newline could print a line that looks like another case's PASS).
  auto has_control = [](const std::string& t) {
    return std::any_of(t.begin(), t.end(), [](char ch) { return static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f; });
  };
  if (has_control(c["name"].get_ref<const std::string&>()))
    return fail("'name' {} holds a control character", c["name"].dump());
  Case out;
  out.name = case_ = c["name"].get<std::string>();
  for (auto it = c.begin(); it != c.end(); ++it)
    if (!kKeys.count(it.key())) return fail("unknown key '{}' (known: name, follows, family, kvm_differs, vm, l2, steps, note)", it.key());
  if (!c.contains("follows") || !c["follows"].is_string() || c["follows"].get<std::string>().empty())
    return fail("missing 'follows': name the upstream function or SDM section the case follows");
  out.follows = c["follows"].get<std::string>();
  for (const char* key : {"family", "kvm_differs"})
    if (c.contains(key) && !c[key].is_string()) return fail("'{}' must be a string", key);
  out.family = c.value("family", file_family);
  out.kvm_differs = c.value("kvm_differs", "");
  // Printed beside the name on the report's lines (family in the summary).
  for (auto [key, text] : {std::pair{"follows", &out.follows}, std::pair{"family", &out.family},
                           std::pair{"kvm_differs", &out.kvm_differs}})
    if (has_control(*text)) return fail("'{}' {} holds a control character", key, json(*text).dump());
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
    if (root.contains("family") && !root["family"].is_string()) return fail("'family' must be a string");
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

}  // namespace detail

VmSpec default_vm() { return Parser("(the default VM)").vm_spec(detail::default_vm_json()).value(); }

namespace {

// Nesting deeper than any scenario needs (a file's deepest value is about
// eight levels down). Reading a json value recurses once per level, so a
// deeper file could exhaust the stack.
constexpr size_t kMaxJsonDepth = 64;

// A scenario file is a few KiB (the largest conformance file under 100 KiB).
constexpr size_t kMaxScenarioFileBytes = size_t{16} << 20;

// "line L, column C" of byte `offset` of `text` (both from 1).
std::string position(const std::string& text, size_t offset) {
  size_t line = 1, col = 1;
  for (size_t i = 0; i < offset && i < text.size(); i++) {
    if (text[i] == '\n') {
      line++;
      col = 1;
    } else {
      col++;
    }
  }
  return fmt::format("line {}, column {}", line, col);
}

// What json::parse accepts but a scenario file may not hold: nesting deeper
// than kMaxJsonDepth, and an object with the same key twice (json keeps the
// last one without a word, which would silently change a case). `text` is
// what json::parse accepted, with no NUL byte (refused before: the parser
// would stop there); the scan still stops at the end of the text whatever it
// holds. Keys are compared decoded, as json keeps them.
Status check_json_shape(const std::string& text, const std::string& path) {
  struct Level {
    bool object;
    std::set<std::string> keys;
  };
  const size_t n = text.size();
  std::vector<Level> levels;
  for (size_t i = 0; i < n; i++) {
    const char c = text[i];
    if (c == '{' || c == '[') {
      if (levels.size() == kMaxJsonDepth)
        return errorf(EINVAL, "{}: JSON nested deeper than {} levels at {}", path, kMaxJsonDepth, position(text, i));
      levels.push_back({c == '{', {}});
    } else if ((c == '}' || c == ']') && !levels.empty()) {
      levels.pop_back();
    } else if (c == '"') {
      size_t end = i + 1;
      while (end < n && text[end] != '"') end += text[end] == '\\' ? 2 : 1;
      if (end >= n) break;  // unterminated: not what the parser accepted
      const size_t next = text.find_first_not_of(" \t\r\n", end + 1);
      if (!levels.empty() && levels.back().object && next < n && text[next] == ':') {
        std::string key = text.substr(i + 1, end - i - 1);
        // Compared as the parser reads it: "na\u006de" is "name" again.
        if (key.find('\\') != std::string::npos) key = json::parse(text.substr(i, end - i + 1)).get<std::string>();
        if (!levels.back().keys.insert(key).second)
          return errorf(EINVAL, "{}: key '{}' appears twice in one object, again at {}", path, key, position(text, i));
      }
      i = end;
    }
  }
  return ok();
}

}  // namespace

Result<ScenarioFile> parse_scenario_text(const std::string& text, const std::string& path) {
  // json::parse ends the text at a NUL byte and ignores what follows it,
  // which would let anything after one pass unread.
  if (size_t nul = text.find('\0'); nul != std::string::npos)
    return errorf(EINVAL, "{}: a NUL byte at {}: a scenario file is JSON text", path, position(text, nul));
  json root;
  try {
    root = json::parse(text);
  } catch (const json::parse_error& e) {
    std::string what = e.what();
    if (auto p = what.find("syntax error"); p != std::string::npos) what = what.substr(p);
    return errorf(EINVAL, "{}: not valid JSON at {}: {}", path, position(text, e.byte == 0 ? 0 : e.byte - 1), what);
  } catch (const json::out_of_range& e) {
    // A number too large for a double ("1e400").
    return errorf(EINVAL, "{}: not valid JSON: {}", path, e.what());
  }
  NC_TRY(check_json_shape(text, path));
  return Parser(path).file(root);
}

Result<ScenarioFile> parse_scenario_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return errorf(ENOENT, "{}: cannot open the scenario file", path);
  // Read in chunks up to a bound, so that a path naming an endless stream
  // (/dev/zero, a pipe that never ends) is refused rather than read until
  // memory runs out.
  std::string text;
  char chunk[65536];
  while (in.read(chunk, sizeof chunk) || in.gcount() > 0) {
    text.append(chunk, static_cast<size_t>(in.gcount()));
    if (text.size() > kMaxScenarioFileBytes)
      return errorf(EINVAL, "{}: more than {} MiB: not a scenario file", path, kMaxScenarioFileBytes >> 20);
  }
  if (in.bad()) return errorf(EIO, "{}: read error", path);
  return parse_scenario_text(text, path);
}

}  // namespace nestcache::workloads::scenario
