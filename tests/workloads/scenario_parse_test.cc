// Scenario files: expressions, outcomes, and the parser's errors, each of
// which must name the file, the case, the step and the problem.
#include <gtest/gtest.h>

#include "vmx/vmx_defs.h"
#include "workloads/scenario.h"

namespace nestcache::workloads::scenario {
namespace {

// A one-case file around `steps` (a JSON array), with optional case keys.
std::string one_case(const std::string& steps, const std::string& extra = "") {
  return R"J({"cases": [{"name": "c", "follows": "test")J" + extra + R"J(, "steps": )J" + steps + "}]}";
}

// The parser's message for `text`, which must be refused.
std::string error_of(const std::string& text) {
  auto r = parse_scenario_text(text, "f.json");
  EXPECT_FALSE(r) << "parsed: " << text;
  if (r) return "";
  EXPECT_EQ(r.error().code, EINVAL);
  return r.error().message;
}

// --- expressions ---------------------------------------------------------------------

TEST(ScenarioExpr, NumbersNamesShiftsAndOperators) {
  const std::map<std::string, uint64_t> pages = {{"vmcs", 0x11000}};
  const std::map<std::string, uint64_t> regions = {{"ram", 4096}};
  NameScope scope{&pages, &regions, true};
  auto eval = [&](std::string_view t) { return parse_expr(t, scope).value().eval({{"ram", 0x7000}}); };
  EXPECT_EQ(eval("0x10"), 0x10u);
  EXPECT_EQ(eval("2M"), 2u << 20);
  EXPECT_EQ(eval("vmcs+8"), 0x11008u);
  EXPECT_EQ(eval("1<<50"), uint64_t{1} << 50);
  EXPECT_EQ(eval("-1"), ~uint64_t{0});
  EXPECT_EQ(eval("invalid"), ~uint64_t{0});
  EXPECT_EQ(eval("~0"), ~uint64_t{0});
  EXPECT_EQ(eval("ram + 0x10"), 0x7010u);
  EXPECT_EQ(eval("proc.always_on|proc.use_tpr_shadow"), vmx::proc::kAlwaysOn | vmx::proc::kUseTprShadow);
  EXPECT_EQ(eval("vmcs - page"), 0x10000u);
}

TEST(ScenarioExpr, AnUnknownNameIsRefusedWithTheKnownOnes) {
  const std::map<std::string, uint64_t> pages = {{"vmcs", 0x11000}};
  auto r = parse_expr("vmcz", NameScope{&pages, nullptr, true});
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("unknown name 'vmcz'"), std::string::npos);
  EXPECT_NE(r.error().message.find("pages: vmcs"), std::string::npos);
  EXPECT_FALSE(parse_expr("1 *2", NameScope{}));
  EXPECT_FALSE(parse_expr("1<<64", NameScope{}));
}

TEST(ScenarioOutcome, EveryFormRoundTrips) {
  for (const char* text : {"ok", "EINVAL", "EEXIST", "E2BIG", "VMfailInvalid", "VMfailValid(11)", "#UD", "#GP",
                           "exit(VMCALL)", "entry_failure(INVALID_GUEST_STATE)", "internal_error"}) {
    auto o = parse_outcome(text);
    ASSERT_TRUE(o) << text;
    EXPECT_EQ(o->to_string(), text);
  }
  EXPECT_EQ(parse_outcome("exit(18)")->to_string(), "exit(VMCALL)");
  EXPECT_EQ(parse_outcome("#6")->to_string(), "#UD");
}

TEST(ScenarioOutcome, UnknownOutcomesAreRefused) {
  for (const char* text : {"Ok", "VMfailValid(99)", "VMfailValid(x)", "exit(NOPE)", "#40", "ENOTANERRNO", ""})
    EXPECT_FALSE(parse_outcome(text)) << text;
}

TEST(ScenarioField, NamesEncodingsAndHighHalves) {
  EXPECT_EQ(parse_field("guest_rip").value(), vmx::field::kGuestRip);
  EXPECT_EQ(parse_field("0x681e").value(), vmx::field::kGuestRip);
  EXPECT_EQ(parse_field("msr_bitmap.high").value(), vmx::field::kMsrBitmap | 1);
  EXPECT_EQ(parse_field("0x0800").value(), 0x800u);  // not a field the model has, still an encoding
  EXPECT_FALSE(parse_field("guest_rip.high"));      // natural width: no high half
  EXPECT_FALSE(parse_field("guest_ripp"));
  EXPECT_EQ(field_name(vmx::field::kMsrBitmap | 1), "msr_bitmap.high");
}

// --- a good file ---------------------------------------------------------------------

TEST(ScenarioParse, AGoodFileGivesItsCasesStepsAndOperands) {
  const std::string text = R"J({
    "family": "vmx-instructions",
    "vm": {"pages": {"mine": "0x20000"}},
    "cases": [
      {"name": "a", "follows": "nested.c handle_vmptrld", "vm": {"vcpus": 2, "evmcs": true},
       "l2": ["vmcall", {"op": "rdmsr", "msr": "msr.fs_base"}],
       "steps": [
         {"do": "enter_vmx"},
         {"do": "vmptrld", "gpa": "mine", "vcpu": 1, "expect": "VMfailValid(11)"},
         {"do": "vmread", "field": "guest_rip", "value": 5},
         {"do": "get_nested_state", "save_as": "s", "check": {"flags": 0, "size": 4160}},
         {"do": "set_nested_state", "blob": "s", "patch": [{"at": "vmcs12.tpr_threshold", "value": 3}, {"resize": 63}],
          "expect": "EINVAL"}
       ]},
      {"name": "b", "follows": "kvm_main.c __kvm_set_memory_region", "family": "memslots",
       "vm": {"memslots": []},
       "steps": [{"do": "set_memory_region", "slot": 1, "size": "2M", "hva": "ram", "expect": "ok"}]}
    ]})J";
  auto f = parse_scenario_text(text, "good.json");
  ASSERT_TRUE(f) << f.error().message;
  ASSERT_EQ(f->cases.size(), 2u);
  const Case& a = f->cases[0];
  EXPECT_EQ(a.family, "vmx-instructions");
  EXPECT_EQ(a.vm.vcpus, 2);
  EXPECT_TRUE(a.vm.evmcs);
  EXPECT_EQ(a.vm.pages.at("mine"), 0x20000u);
  EXPECT_EQ(a.vm.pages.at("vmcs"), 0x11000u);  // the defaults stay
  EXPECT_EQ(a.l2.size(), 2u);
  ASSERT_EQ(a.steps.size(), 5u);
  EXPECT_EQ(a.steps[1].vcpu, 1);
  EXPECT_EQ(a.steps[1].operand("gpa").eval(), 0x20000u);
  EXPECT_EQ(a.steps[1].expect.outcome.to_string(), "VMfailValid(11)");
  EXPECT_EQ(a.steps[2].expect.value->eval(), 5u);
  EXPECT_EQ(a.steps[3].expect.checks.size(), 2u);
  EXPECT_EQ(a.steps[4].patches.size(), 2u);
  EXPECT_EQ(f->cases[1].family, "memslots");
  EXPECT_TRUE(f->cases[1].vm.memslots.empty());
}

TEST(ScenarioParse, AFileMayHoldOneCase) {
  auto f = parse_scenario_text(R"J({"name": "solo", "follows": "x", "steps": [{"do": "vmxoff", "expect": "#UD"}]})J",
                               "solo.json");
  ASSERT_TRUE(f) << f.error().message;
  ASSERT_EQ(f->cases.size(), 1u);
  EXPECT_EQ(f->cases[0].name, "solo");
}

// --- errors name the file, case, step and problem -------------------------------------------

TEST(ScenarioParseErrors, InvalidJsonGivesLineAndColumn) {
  EXPECT_EQ(error_of("{\n  \"cases\": [\n    {,\n"),
            "f.json: not valid JSON at line 3, column 6: syntax error while parsing object key - unexpected ','; "
            "expected string literal");
}

TEST(ScenarioParseErrors, ANumberTooLargeIsInvalidJson) {
  EXPECT_NE(error_of(R"J({"cases": 1e400})J").find("f.json: not valid JSON: [json.exception.out_of_range.406] number overflow"),
            std::string::npos);
}

// JSON that parses but would silently change a case (a repeated key: json
// keeps the last) or is nested deep enough to exhaust the stack when read.
TEST(ScenarioParseErrors, RepeatedKeysAreRefusedWithTheirPosition) {
  EXPECT_EQ(error_of(R"J({"name": "a", "follows": "x",
  "name": "b", "steps": [{"do": "vmxoff", "expect": "#UD"}]})J"),
            "f.json: key 'name' appears twice in one object, again at line 2, column 3");
  EXPECT_EQ(error_of(one_case(R"J([{"do": "vmxon", "gpa": "vmxon", "gpa": "vmcs"}])J")),
            "f.json: key 'gpa' appears twice in one object, again at line 1, column 87");
  // The same key in different objects, and a key-like string value, are fine.
  EXPECT_TRUE(parse_scenario_text(one_case(R"J([{"do": "vmxon", "gpa": "vmxon", "note": "gpa"},
                                               {"do": "vmxoff", "note": "a \" b"}])J"),
                                  "f.json"));
}

TEST(ScenarioParseErrors, DeepNestingIsRefusedNotACrash) {
  constexpr int kDepth = 200000;
  std::string deep = std::string(kDepth, '[') + std::string(kDepth, ']');
  std::string m = error_of(one_case(R"J([{"do": "vmxoff", "note": )J" + deep + "}]"));
  EXPECT_EQ(m.rfind("f.json: JSON nested deeper than 64 levels at line 1, column ", 0), 0u) << m;
  std::string ok_depth = std::string(50, '[') + std::string(50, ']');
  EXPECT_TRUE(parse_scenario_text(one_case(R"J([{"do": "vmxoff", "note": )J" + ok_depth + "}]"), "f.json"));
}

// json::parse ends the text at a NUL byte; what follows one must not pass
// unread (nor be scanned: an unterminated string after it once read past the
// end of the text).
TEST(ScenarioParseErrors, ANulByteIsRefusedWithItsPosition) {
  const std::string text = std::string("{\"cases\": []}\0\0a0\"s\": [\n", 21);
  auto r = parse_scenario_text(text, "f.json");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().message, "f.json: a NUL byte at line 1, column 14: a scenario file is JSON text");
}

// A number outside 64 bits is named as such, not as a non-number or an
// unknown name.
TEST(ScenarioParseErrors, NumbersBeyondSixtyFourBitsSaySo) {
  EXPECT_EQ(error_of(one_case(R"J([{"do": "vmxon", "gpa": 99999999999999999999}])J")),
            "f.json: case 'c', step 1 (vmxon): 'gpa' must be an integer from -2^63 to 2^64-1 or an expression "
            "string, not 1e+20");
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmxon", "gpa": 1.5}])J")).find("not 1.5"), std::string::npos);
  for (const char* big : {"0x1ffffffffffffffff", "18446744073709551616", "20000000000G"}) {
    EXPECT_EQ(error_of(one_case(std::string(R"J([{"do": "vmxon", "gpa": ")J") + big + "\"}]")),
              std::string("f.json: case 'c', step 1 (vmxon): 'gpa': '") + big +
                  "' is not a number: digits of its base, an optional K, M or G, at most 2^64-1");
  }
}

// A page or region name no expression could use, or one that would shadow
// a constant or control bit, is refused where it is defined.
TEST(ScenarioParseErrors, PageAndRegionNamesMustBeUsableAndNotReserved) {
  auto vm = [](const std::string& v) { return one_case(R"J([{"do": "vmxoff", "expect": "#UD"}])J", R"J(, "vm": )J" + v); };
  EXPECT_EQ(error_of(vm(R"J({"pages": {"invalid": "0x5000"}})J")),
            "f.json: case 'c': vm.pages: 'invalid': it is a reserved name (a constant or a control bit)");
  EXPECT_NE(error_of(vm(R"J({"pages": {"proc.use_tpr_shadow": 0}})J")).find("reserved name"), std::string::npos);
  for (const char* name : {"4096", "vmcs+8", "a b", "", "\\u00e9v"}) {
    std::string m = error_of(vm(std::string(R"J({"pages": {")J") + name + R"J(": "0x5000"}})J"));
    EXPECT_NE(m.find("vm.pages: '"), std::string::npos) << m;
    EXPECT_NE(m.find("expressions cannot use it"), std::string::npos) << m;
  }
  EXPECT_NE(error_of(vm(R"J({"regions": {"ram": "4M", "r b": "4K"}})J")).find("vm.regions: 'r b': expressions cannot use it"),
            std::string::npos);
  EXPECT_TRUE(parse_scenario_text(vm(R"J({"pages": {"_my.page2": "0x5000"}})J"), "f.json"));
}

// A case name is printed on a report line and matched by --case: control
// characters are refused (shown escaped); any other Unicode is fine.
TEST(ScenarioParseErrors, CaseNamesHoldNoControlCharacters) {
  auto named = [](const std::string& n) {
    return R"J({"name": ")J" + n + R"J(", "follows": "x", "steps": [{"do": "vmxoff", "expect": "#UD"}]})J";
  };
  EXPECT_EQ(error_of(named("a\\nb")), "f.json: case '#1': 'name' \"a\\nb\" holds a control character");
  EXPECT_NE(error_of(named("a\\u0000b")).find("holds a control character"), std::string::npos);
  EXPECT_NE(error_of(named("a\\u001b[31mred")).find("holds a control character"), std::string::npos);
  // The texts printed beside the name too: a newline in 'follows' printed a
  // line of its own, which could read as another case's PASS.
  EXPECT_EQ(error_of(R"J({"name": "c", "follows": "x)\n  PASS fake  (y", "steps": [{"do": "vmxoff"}]})J"),
            "f.json: case 'c': 'follows' \"x)\\n  PASS fake  (y\" holds a control character");
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmxoff"}])J", R"J(, "kvm_differs": "a\tb")J")).find("'kvm_differs' "),
            std::string::npos);
  EXPECT_NE(error_of(R"J({"family": "a\u001b[2J", "cases": [{"name": "c", "follows": "x", "steps": [{"do": "vmxoff"}]}]})J")
                .find("case 'c': 'family' "),
            std::string::npos);
  auto f = parse_scenario_text(named("\\u00e9t\\u00e9 \\ud83d\\ude00"), "f.json");
  ASSERT_TRUE(f) << f.error().message;
  EXPECT_EQ(f->cases[0].name, "\xc3\xa9t\xc3\xa9 \xf0\x9f\x98\x80");
}

TEST(ScenarioParseErrors, AnUnknownVerbListsTheKnownOnes) {
  std::string m = error_of(one_case(R"J([{"do": "enter_vmx"}, {"do": "vmptrlf"}])J"));
  EXPECT_EQ(m.rfind("f.json: case 'c', step 2 (vmptrlf): unknown verb (known: set_memory_region, ", 0), 0u) << m;
}

TEST(ScenarioParseErrors, UnknownKeysAreRefusedEverywhere) {
  EXPECT_EQ(error_of(one_case(R"J([{"do": "vmxon", "gpa": "vmxon", "expcet": "ok"}])J")),
            "f.json: case 'c', step 1 (vmxon): unknown key 'expcet'");
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmxoff"}])J", R"J(, "vm": {"vcpu": 2})J")).find("vm: unknown key 'vcpu'"),
            std::string::npos);
  EXPECT_NE(error_of(R"J({"cases": [{"name": "c", "follows": "x", "steps": [{"do": "vmxoff"}], "stesp": 1}]})J")
                .find("case 'c': unknown key 'stesp'"),
            std::string::npos);
  EXPECT_NE(error_of(R"J({"kases": []})J").find("f.json: the file has no 'cases'"), std::string::npos);
}

TEST(ScenarioParseErrors, MissingOperandsAndBadNames) {
  EXPECT_EQ(error_of(one_case(R"J([{"do": "vmptrld"}])J")), "f.json: case 'c', step 1 (vmptrld): missing 'gpa'");
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmread", "field": "guest_ripp"}])J"))
                .find("f.json: case 'c', step 1 (vmread): 'field': unknown VMCS field 'guest_ripp'"),
            std::string::npos);
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmptrld", "gpa": "vmcz"}])J")).find("step 1 (vmptrld): 'gpa': unknown name 'vmcz'"),
            std::string::npos);
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmxon", "gpa": {"a": 1}}])J")).find("'gpa' must be a number or an expression"),
            std::string::npos);
}

TEST(ScenarioParseErrors, BadOutcomesAndMisplacedExpectations) {
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmxoff", "expect": "VMfailValid(99)"}])J"))
                .find("step 1 (vmxoff): outcome 'VMfailValid(99)': VMfailValid takes an error number 1..28"),
            std::string::npos);
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmxoff", "qualification": 4}])J"))
                .find("'qualification' is checked only for vmlaunch, vmresume and run"),
            std::string::npos);
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmxoff", "counters": {"no_such": 1}}])J")).find("unknown counter 'no_such'"),
            std::string::npos);
}

// Counters only go up: an expected delta below zero (two's complement once
// evaluated) would make a case that can never pass.
TEST(ScenarioParseErrors, NegativeCounterDeltasAreRefused) {
  EXPECT_EQ(error_of(one_case(R"J([{"do": "vmxoff", "counters": {"l0_exits": -1}}])J")),
            "f.json: case 'c', step 1 (vmxoff): counters: 'l0_exits' is how much the counter goes up during the "
            "step: a count of zero or more, not -1");
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmxoff", "counters": {"l0_exits": "0 - 2"}}])J")).find("not 0 - 2"),
            std::string::npos);
  auto f = parse_scenario_text(one_case(R"J([{"do": "vmxoff", "counters": {"l0_exits": 0, "l1_exits": "1 + 1"}}])J"),
                               "f.json");
  ASSERT_TRUE(f) << f.error().message;
  EXPECT_EQ(f->cases[0].steps[0].expect.counters.at("l1_exits"), 2u);
}

TEST(ScenarioParseErrors, NestedStateBlobsMustBeSavedFirst) {
  EXPECT_EQ(error_of(one_case(R"J([{"do": "set_nested_state", "blob": "s"}])J")),
            "f.json: case 'c', step 1 (set_nested_state): blob 's' was not saved by an earlier get_nested_state "
            "(save_as)");
  EXPECT_NE(error_of(one_case(R"J([{"do": "set_nested_state"}])J")).find("give exactly one of 'blob' (a saved name) and 'state'"),
            std::string::npos);
  EXPECT_NE(error_of(one_case(R"J([{"do": "get_nested_state", "save_as": "s"},
                                  {"do": "set_nested_state", "blob": "s", "patch": [{"at": "flagz", "value": 1}]}])J"))
                .find("step 2 (set_nested_state): unknown blob field 'flagz'"),
            std::string::npos);
}

TEST(ScenarioParseErrors, CaseLevelProblems) {
  EXPECT_NE(error_of(R"J({"cases": [{"name": "c", "steps": [{"do": "vmxoff"}]}]})J")
                .find("case 'c': missing 'follows'"),
            std::string::npos);
  EXPECT_NE(error_of(R"J({"cases": [{"name": "c", "follows": "x", "steps": [{"do": "vmxoff"}]},
                                   {"name": "c", "follows": "x", "steps": [{"do": "vmxoff"}]}]})J")
                .find("two cases are named 'c'"),
            std::string::npos);
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmxoff", "vcpu": 3}])J")).find("vcpu 3 does not exist (the VM has 1)"),
            std::string::npos);
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmxoff"}])J", R"J(, "vm": {"memslots": [{"slot": 0, "region": "rom"}]})J"))
                .find("unknown region 'rom'"),
            std::string::npos);
  EXPECT_NE(error_of(one_case(R"J([])J")).find("missing 'steps'"), std::string::npos);
}

// A key of the wrong JSON type is refused with the key named, never thrown
// out of the parser as a JSON library exception.
TEST(ScenarioParseErrors, WrongTypesAreRefusedNotThrown) {
  EXPECT_NE(error_of(R"J({"family": 5, "cases": [{"name": "c", "follows": "x", "steps": [{"do": "vmxoff"}]}]})J")
                .find("'family' must be a string"),
            std::string::npos);
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmxoff"}])J", R"J(, "family": [])J")).find("case 'c': 'family' must be a string"),
            std::string::npos);
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmxoff"}])J", R"J(, "kvm_differs": 1)J")).find("'kvm_differs' must be a string"),
            std::string::npos);
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmlaunch"}])J", R"J(, "l2": [{"op": "vmread"}])J"))
                .find("l2 vmread: "),
            std::string::npos);
  EXPECT_NE(error_of(one_case(R"J([{"do": "get_nested_state", "save_as": "s"},
                                  {"do": "set_nested_state", "blob": "s", "patch": [{"at": 0, "value": 1, "size": "8"}]}])J"))
                .find("step 2 (set_nested_state): patch 'offset 0': size must be 1, 2, 4 or 8"),
            std::string::npos);
  // vCPU indexes and field encodings are range-checked before they narrow.
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmxoff", "vcpu": 4294967296}])J")).find("'vcpu' must be a vCPU index"),
            std::string::npos);
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmread", "field": 4294984704}])J")).find("step 1 (vmread): 'field': "),
            std::string::npos);
}

// Operands the runner passes on at a fixed width are refused when wider,
// not cut short: slot 0x100000000 deleted slot 0, a read of size 0 divided by
// zero, and a write of size 257 stored one byte.
TEST(ScenarioParseErrors, FixedWidthOperandsAreRefusedNotCutShort) {
  EXPECT_EQ(error_of(one_case(R"J([{"do": "delete_memslot", "slot": "0x100000000"}])J")),
            "f.json: case 'c', step 1 (delete_memslot): 'slot' 0x100000000 does not fit KVM's 32-bit field (at most "
            "0xffffffff)");
  EXPECT_NE(error_of(one_case(R"J([{"do": "set_memslot_flags", "slot": 0, "flags": 4294967296}])J"))
                .find("'flags' 0x100000000 does not fit KVM's 32-bit field"),
            std::string::npos);
  EXPECT_NE(error_of(one_case(R"J([{"do": "add_memslots", "first_slot": "0xfffffff0", "count": 32, "gpa": 0,
                                    "size": "page", "hva": "ram"}])J"))
                .find("'count' 32 slots from 'first_slot' 4294967280 go past slot 0xffffffff"),
            std::string::npos);
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmxoff"}])J", R"J(, "vm": {"memslots": [{"slot": -1, "region": "ram"}]})J"))
                .find("vm.memslots: 'slot' 0xffffffffffffffff does not fit KVM's 32-bit field"),
            std::string::npos);
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmxoff"}])J", R"J(, "vm": {"memslots": [{"slot": "ram", "region": "ram"}]})J"))
                .find("vm.memslots: 'slot' ram names a region: its value is a number"),
            std::string::npos);
  for (const char* size : {"0", "3", "16", "256", "257"}) {
    EXPECT_EQ(error_of(one_case(fmt::format(R"J([{{"do": "read", "gpa": "scratch", "size": {}}}])J", size))),
              fmt::format("f.json: case 'c', step 1 (read): 'size' {} is not 1, 2, 4 or 8 bytes", size));
    EXPECT_NE(error_of(one_case(fmt::format(R"J([{{"do": "write", "gpa": 0, "value": 1, "size": {}}}])J", size)))
                  .find("'size' "),
              std::string::npos);
  }
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmm_read", "gpa": 0, "size": "ram"}])J")).find("'size' ram names a region"),
            std::string::npos);
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmm_write", "gpa": 0, "bytes": "aabb", "size": 8}])J"))
                .find("'size' goes with 'value'"),
            std::string::npos);
  EXPECT_NE(error_of(one_case(R"J([{"do": "init_region", "gpa": "vmcs", "revision": "1<<32"}])J"))
                .find("'revision' 1<<32 does not fit KVM's 32-bit field"),
            std::string::npos);
  EXPECT_EQ(error_of(one_case(R"J([{"do": "invvpid", "type": 1, "vpid": "0x10000"}])J")),
            "f.json: case 'c', step 1 (invvpid): 'vpid' 0x10000 is wider than the 16 bits the model's INVVPID operand "
            "holds");
  EXPECT_NE(error_of(one_case(R"J([{"do": "invept", "type": "0x100000001", "eptp": 0}])J"))
                .find("'type' 0x100000001 is wider than the 32 bits the model's INVEPT operand holds"),
            std::string::npos);
  EXPECT_TRUE(parse_scenario_text(one_case(R"J([{"do": "read", "gpa": 0, "size": 2},
                                               {"do": "delete_memslot", "slot": "0xffffffff", "expect": "EINVAL"}])J"),
                                  "f.json"));
}

// Regions have a size each and in all: a file naming hundreds of 4 GiB
// regions used up the host's memory in frame bookkeeping before any step.
TEST(ScenarioParseErrors, RegionsHaveABoundInAll) {
  std::string regions;
  for (int i = 0; i < 17; i++) regions += fmt::format("{}\"r{}\": \"4G\"", i ? ", " : "", i);
  EXPECT_EQ(error_of(one_case(R"J([{"do": "vmxoff"}])J", R"J(, "vm": {"memslots": [], "regions": {)J" + regions + "}}")),
            "f.json: case 'c': vm.regions: 68 GiB in all, more than the 64 GiB a scenario VM may have");
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmxoff"}])J", R"J(, "vm": {"regions": {"ram": "8G"}})J"))
                .find("must be a non-zero multiple of 4 KiB up to 4 GiB"),
            std::string::npos);
}

// An L2 operation takes its operands and no other key, as a step does: a
// typo or a missing operand was read as 0.
TEST(ScenarioParseErrors, L2OperationsTakeTheirOperandsOnly) {
  EXPECT_EQ(error_of(one_case(R"J([{"do": "vmxoff"}])J", R"J(, "l2": [{"op": "vmcall", "bogus": 1}])J")),
            "f.json: case 'c': l2 vmcall: unknown key 'bogus' (it takes no operand)");
  EXPECT_EQ(error_of(one_case(R"J([{"do": "vmxoff"}])J", R"J(, "l2": [{"op": "read", "gpa": 0, "size": 4}])J")),
            "f.json: case 'c': l2 read: unknown key 'size' (it takes gpa)");
  EXPECT_EQ(error_of(one_case(R"J([{"do": "vmxoff"}])J", R"J(, "l2": [{"op": "wrmsr", "msr": 16}])J")),
            "f.json: case 'c': l2 wrmsr: missing 'value'");
  EXPECT_NE(error_of(one_case(R"J([{"do": "vmxoff"}])J", R"J(, "l2": [{"op": "bogus", "x": 1}])J"))
                .find("l2: unknown operation 'bogus'"),
            std::string::npos);
}

// A repeated key is found however it is written: json decodes escapes
// before it keeps the last value.
TEST(ScenarioParseErrors, RepeatedKeysAreFoundThroughEscapes) {
  EXPECT_EQ(error_of(R"J({"name": "a", "follows": "x", "na\u006de": "b", "steps": [{"do": "vmxoff"}]})J"),
            "f.json: key 'name' appears twice in one object, again at line 1, column 31");
}

TEST(ScenarioParseErrors, AMissingFileIsEnoent) {
  auto r = parse_scenario_file("/nonexistent/dir/x.json");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, ENOENT);
  EXPECT_EQ(r.error().message, "/nonexistent/dir/x.json: cannot open the scenario file");
}

// A path naming an endless stream is refused once it outgrows any scenario
// file, not read until memory runs out.
TEST(ScenarioParseErrors, AnEndlessFileIsRefusedNotReadToTheEnd) {
  auto r = parse_scenario_file("/dev/zero");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, EINVAL);
  EXPECT_EQ(r.error().message, "/dev/zero: more than 16 MiB: not a scenario file");
}

}  // namespace
}  // namespace nestcache::workloads::scenario
