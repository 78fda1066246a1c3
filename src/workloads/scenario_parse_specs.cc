// The scenario-file parser, second half: the VM description, the L2
// program, and the vmcs12, nested-state and blob specs (see scenario_parser.h).
#include <algorithm>
#include <cctype>
#include <set>

#include <fmt/ranges.h>

#include "vmx/nested_state_format.h"
#include "vmx/vmcs12.h"
#include "workloads/scenario_parser.h"

namespace nestcache::workloads::scenario::detail {

std::string names_of(const json& obj) {
  std::string out;
  for (auto it = obj.begin(); it != obj.end(); ++it) out += (out.empty() ? "" : ", ") + it.key();
  return out;
}

namespace {

// The most memory the regions of one VM may have together: 16 Mi frames.
constexpr uint64_t kMaxRegionBytes = uint64_t{64} << 30;

// Why `name` cannot name a page or region, or "" if it can. Expressions
// read a name as a letter or '_' followed by letters, digits, '_' and '.';
// anything else could never be used. A constant or control bit would be
// shadowed (a page named "invalid" would change what "invalid" means in
// every step).
std::string bad_name(const std::string& name) {
  auto name_char = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.'; };
  if (name.empty() || !(std::isalpha(static_cast<unsigned char>(name[0])) || name[0] == '_') ||
      !std::all_of(name.begin(), name.end(), name_char))
    return "expressions cannot use it: a name is a letter or '_', then letters, digits, '_' or '.'";
  if (constant_value(name) || control_bit(name)) return "it is a reserved name (a constant or a control bit)";
  return "";
}

}  // namespace

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

Result<Expr> Parser::expr(const json& v, std::string_view key) {
  if (v.is_number_unsigned()) return Expr::of(v.get<uint64_t>());
  if (v.is_number_integer()) return Expr::of(static_cast<uint64_t>(v.get<int64_t>()));
  if (v.is_boolean()) return Expr::of(v.get<bool>() ? 1 : 0);
  // json reads an integer beyond 64 bits, like a fraction, as a double.
  if (v.is_number_float())
    return fail("'{}' must be an integer from -2^63 to 2^64-1 or an expression string, not {}", key, v.dump());
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
    if (!vm["vcpus"].is_number_unsigned() || vm["vcpus"].get<uint64_t>() < 1 || vm["vcpus"].get<uint64_t>() > kMaxVcpus)
      return fail("vm.vcpus must be a number from 1 to {}", kMaxVcpus);
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
    // Every frame of every region has its bookkeeping in the model (tens of
    // bytes each): a file naming thousands of 4 GiB regions would use up the
    // host's memory before the first step.
    uint64_t total = 0;
    for (const auto& [name, bytes] : s.regions) total += bytes;
    if (total > kMaxRegionBytes)
      return fail("vm.regions: {} GiB in all, more than the {} GiB a scenario VM may have", total >> 30,
                  kMaxRegionBytes >> 30);
  }
  for (auto& [name, size] : s.regions)
    if (std::string why = bad_name(name); !why.empty()) return fail("vm.regions: '{}': {}", name, why);
  regions_ = s.regions;
  scope_ = NameScope{nullptr, &regions_, false};
  if (vm.contains("pages")) {
    if (!vm["pages"].is_object()) return fail("vm.pages must be an object: name -> address");
    for (auto it = vm["pages"].begin(); it != vm["pages"].end(); ++it) {
      if (regions_.count(it.key())) return fail("vm.pages: '{}' is also a region name", it.key());
      if (std::string why = bad_name(it.key()); !why.empty()) return fail("vm.pages: '{}': {}", it.key(), why);
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
      for (auto [key, member] :
           {std::pair{"slot", &VmSpec::Memslot::slot}, std::pair{"flags", &VmSpec::Memslot::flags}})
        ms.*member = NC_TRY(u32_field(NC_TRY(expr(m.value(key, json(0)), key)), key, "vm.memslots: "));
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

namespace {

// An L2 operation's operands, as the scenario file gives them.
struct L2Operands {
  uint64_t msr = 0, value = 0, gpa = 0;
  uint32_t field = 0;
};

// The L2 operations a scenario can name: each one's operands (all required,
// no other key) and how it is built from them.
struct L2OpSpec {
  std::string_view name;
  std::vector<std::string_view> operands;
  cpu::GuestOp (*build)(const L2Operands&);
};

const std::vector<L2OpSpec>& l2_ops() {
  using cpu::GuestOp;
  using A = const L2Operands&;
  static const std::vector<L2OpSpec> kOps = {
      {"vmcall", {}, [](A) -> GuestOp { return GuestOp::Vmcall{}; }},
      {"hlt", {}, [](A) -> GuestOp { return GuestOp::Hlt{}; }},
      // RDMSR and WRMSR take the MSR from ECX: wider values lose their upper
      // bits on the processor too.
      {"rdmsr", {"msr"}, [](A a) -> GuestOp { return GuestOp::Rdmsr{static_cast<uint32_t>(a.msr)}; }},
      {"wrmsr", {"msr", "value"}, [](A a) -> GuestOp { return GuestOp::Wrmsr{static_cast<uint32_t>(a.msr), a.value}; }},
      {"read", {"gpa"}, [](A a) -> GuestOp { return GuestOp::Read{a.gpa, 8}; }},
      {"write", {"gpa", "value"}, [](A a) -> GuestOp { return GuestOp::Write{a.gpa, 8, a.value}; }},
      {"write_cr8", {"value"}, [](A a) -> GuestOp { return GuestOp::WriteCr8{a.value}; }},
      {"read_cr8", {}, [](A) -> GuestOp { return GuestOp::ReadCr8{}; }},
      {"vmread", {"field"}, [](A a) -> GuestOp { return GuestOp::Vmread{a.field}; }},
      {"vmwrite", {"field", "value"}, [](A a) -> GuestOp { return GuestOp::Vmwrite{a.field, a.value}; }},
      {"vmptrld", {"gpa"}, [](A a) -> GuestOp { return GuestOp::Vmptrld{a.gpa}; }},
      {"vmclear", {"gpa"}, [](A a) -> GuestOp { return GuestOp::Vmclear{a.gpa}; }},
      {"vmxon", {"gpa"}, [](A a) -> GuestOp { return GuestOp::Vmxon{a.gpa}; }},
      {"vmxoff", {}, [](A) -> GuestOp { return GuestOp::Vmxoff{}; }},
      {"vmptrst", {}, [](A) -> GuestOp { return GuestOp::Vmptrst{}; }},
      {"vmlaunch", {}, [](A) -> GuestOp { return GuestOp::Vmlaunch{}; }},
      {"vmresume", {}, [](A) -> GuestOp { return GuestOp::Vmresume{}; }},
  };
  return kOps;
}

}  // namespace

Result<std::vector<cpu::GuestOp>> Parser::l2_program(const json& l2) {
  if (!l2.is_array() || l2.empty()) return fail("'l2' must be a non-empty array of operations");
  std::vector<cpu::GuestOp> ops;
  for (const json& o : l2) {
    const json obj = o.is_string() ? json{{"op", o}} : o;
    if (!obj.is_object() || !obj.contains("op") || !obj["op"].is_string())
      return fail("l2: each operation is a name (\"vmcall\") or an object with \"op\"");
    const std::string op = obj["op"].get<std::string>();
    const auto spec = std::find_if(l2_ops().begin(), l2_ops().end(), [&](const L2OpSpec& s) { return s.name == op; });
    if (spec == l2_ops().end()) {
      std::vector<std::string_view> names;
      for (const L2OpSpec& s : l2_ops()) names.push_back(s.name);
      return fail("l2: unknown operation '{}' ({})", op, fmt::join(names, ", "));
    }
    // Any key but the operation's operands is refused, as in a step (a typo
    // never silently becomes gpa 0).
    const std::vector<std::string_view>& operands = spec->operands;
    for (auto it = obj.begin(); it != obj.end(); ++it)
      if (it.key() != "op" && std::find(operands.begin(), operands.end(), it.key()) == operands.end())
        return fail("l2 {}: unknown key '{}' ({})", op, it.key(),
                    operands.empty() ? std::string("it takes no operand")
                                     : fmt::format("it takes {}", fmt::join(operands, ", ")));
    L2Operands a;
    for (std::string_view k : operands) {
      const std::string key(k);
      if (!obj.contains(key)) return fail("l2 {}: missing '{}'", op, key);
      if (k == "field") {
        const json& name = obj[key];
        auto f = parse_field(name.is_string() ? name.get<std::string>() : "");
        if (!f) return fail("l2 {}: {}", op, f.error().message);
        a.field = *f;
        continue;
      }
      const uint64_t v = NC_TRY(expr(obj[key], k)).eval();
      (k == "msr" ? a.msr : k == "value" ? a.value : a.gpa) = v;
    }
    ops.push_back(spec->build(a));
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
      pt.size = 1;
      pt.what = fmt::format("offset {}", pt.offset);
    } else if (e["at"].is_string()) {
      pt.what = e["at"].get<std::string>();
      HeaderField h = NC_TRY(blob_location(pt.what));
      pt.offset = h.offset;
      pt.size = h.size;
    } else {
      return fail("patch: 'at' is a byte offset or a field name");
    }
    if (e.contains("size")) {
      if (!e["size"].is_number_unsigned()) return fail("patch '{}': size must be 1, 2, 4 or 8", pt.what);
      pt.size = e["size"].get<uint64_t>();
    }
    if (!is_access_width(pt.size)) return fail("patch '{}': size must be 1, 2, 4 or 8", pt.what);
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

}  // namespace nestcache::workloads::scenario::detail
