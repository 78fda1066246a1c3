// A selftest's own options on the command line (cli::TestOptions): the
// declarations of workloads::OptionSpec become CLI11 options whose values,
// given or defaulted, land in RunOptions::extra, and whose ranges and choices
// refuse bad values before the test runs.
#include <gtest/gtest.h>

#include <algorithm>

#include <CLI/CLI.hpp>

#include "cli/commands.h"

namespace nestcache::cli {
namespace {

using workloads::OptionSpec;

struct ParsedOptions {
  CLI::App app;
  TestOptions opts;
  ParsedOptions() {
    const OptionSpec specs[] = {workloads::int_option("--delay-ms", "delay", "10", 0, 100),
                                workloads::value_option("--mode", "mode"),
                                workloads::choice_option("--page", "page", "", {"vapic", "pi"}),
                                workloads::flag_option("--fast", "flag")};
    opts.add(app, specs);
  }
  std::map<std::string, std::string> parse(std::vector<std::string> args) {
    std::reverse(args.begin(), args.end());  // CLI11 takes them back to front
    app.parse(args);
    return opts.values();
  }
};

TEST(TestOptions, DeclaredOptionsLandInExtraWithDefaults) {
  ParsedOptions p;
  auto v = p.parse({"--delay-ms", "25", "--fast"});
  EXPECT_EQ(v, (std::map<std::string, std::string>{{"delay-ms", "25"}, {"fast", "true"}}));
}

TEST(TestOptions, AnOptionNotGivenTakesItsDefaultOrIsLeftOut) {
  ParsedOptions p;
  auto v = p.parse({});
  EXPECT_EQ(v, (std::map<std::string, std::string>{{"delay-ms", "10"}}));
}

TEST(TestOptions, ValidatorsOnDeclaredOptionsRefuseBadValues) {
  ParsedOptions p;
  EXPECT_THROW(p.parse({"--delay-ms", "1000"}), CLI::ValidationError);
  ParsedOptions q;
  EXPECT_THROW(q.parse({"--page", "apic"}), CLI::ValidationError);
  ParsedOptions r;
  EXPECT_EQ(r.parse({"--page", "pi"})["page"], "pi");
}

TEST(TestOptions, AWholeNumberIsReadInDecimalDigits) {
  ParsedOptions p;
  EXPECT_EQ(p.parse({"--delay-ms", "010"})["delay-ms"], "10");  // not octal 8
  ParsedOptions q;
  EXPECT_THROW(q.parse({"--delay-ms", "0x10"}), CLI::ValidationError);
}

// in_range on a typed option: the value bound is the decimal one, and every
// other spelling of a whole number is refused with the digits to write, as
// --sweep refuses it ("016" was octal 14 and "0x10" 16 for bench --slots).
uint32_t parse_uint(const std::string& text) {
  CLI::App app;
  uint32_t v = 0;
  app.add_option("--n", v)->transform(in_range(2u, 100u));
  app.parse(std::vector<std::string>{text, "--n"});
  return v;
}

TEST(InRange, LeadingZerosAreDecimal) { EXPECT_EQ(parse_uint("016"), 16u); }

TEST(InRange, OtherSpellingsOfAWholeNumberAreRefused) {
  for (const char* text : {"0x10", "0X10", "+16", " 16", "1e1"}) {
    try {
      parse_uint(text);
      ADD_FAILURE() << "accepted '" << text << "'";
    } catch (const CLI::ValidationError& e) {
      EXPECT_NE(std::string(e.what()).find("write a whole number in digits"), std::string::npos) << e.what();
    }
  }
}

TEST(InRange, OutOfRangeIsSaidInDecimal) {
  EXPECT_THROW(parse_uint("0101"), CLI::ValidationError);  // 101, not octal 65
  EXPECT_THROW(parse_uint("-3"), CLI::ValidationError);
}

// A fraction is decimal too: CLI11 took --seconds 0x10 as 16 s and
// 0x1p-3 as 0.125 s while --slots 0x10 is refused.
double parse_double(const std::string& text) {
  CLI::App app;
  double v = 0;
  app.add_option("--x", v)->transform(in_range(0.001, 100.0));
  app.parse(std::vector<std::string>{text, "--x"});
  return v;
}

TEST(InRange, AFractionIsReadInDecimal) {
  EXPECT_EQ(parse_double("1e-2"), 0.01);
  EXPECT_EQ(parse_double("016"), 16.0);
  for (const char* text : {"0x10", "0x1p-3", "+1", " 1"}) {
    try {
      parse_double(text);
      ADD_FAILURE() << "accepted '" << text << "'";
    } catch (const CLI::ValidationError& e) {
      EXPECT_NE(std::string(e.what()).find("write the number in decimal"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(parse_double("nan"), CLI::ValidationError);
  EXPECT_THROW(parse_double("inf"), CLI::ValidationError);
  // Decimal, but beyond a double: out of range, not "not a number".
  for (const char* text : {"1e400", "1e-400"}) {
    try {
      parse_double(text);
      ADD_FAILURE() << "accepted '" << text << "'";
    } catch (const CLI::ValidationError& e) {
      EXPECT_NE(std::string(e.what()).find(std::string(text) + " is out of range"), std::string::npos) << e.what();
    }
  }
}

TEST(TestOptions, EveryRegisteredSelftestsOptionsBuildACommandLine) {
  workloads::register_all();
  for (const workloads::SelftestInfo& t : workloads::selftests()) {
    CLI::App app;
    TestOptions opts;
    opts.add(app, t.options);
    app.parse(std::vector<std::string>{});
    EXPECT_EQ(opts.values(), workloads::default_extra(t)) << t.name;
  }
}

}  // namespace
}  // namespace nestcache::cli
