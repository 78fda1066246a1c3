// Sweeps through their public API: parsing PARAM=v1,..., the options each
// value gives, which parameters apply to which test, and a tiny sweep end to
// end with its JSON and CSV.
#include <gtest/gtest.h>

#include "workloads/sweep.h"

namespace nestcache::workloads {
namespace {

TEST(Sweep, ParsesAParameterAndItsValuesInOrder) {
  auto s = parse_sweep("l2-per-l1=1,2, 4,32");
  ASSERT_TRUE(s) << s.error().to_string();
  EXPECT_EQ(s->param, SweepParam::l2_per_l1);
  EXPECT_EQ(s->values, (std::vector<uint64_t>{1, 2, 4, 32}));
  EXPECT_TRUE(parse_sweep("exit-cost-ns=0"));
}

TEST(Sweep, RefusesBadInputWithAMessage) {
  for (const char* bad : {"slots", "bogus=1", "slots=", "slots=1,,2", "slots=8,x", "slots=-1", "slots=8,8"}) {
    auto s = parse_sweep(bad);
    ASSERT_FALSE(s) << bad;
    EXPECT_EQ(s.error().code, EINVAL) << bad;
    EXPECT_FALSE(s.error().message.empty());
  }
  EXPECT_NE(parse_sweep("bogus=1").error().message.find("slots, l2-per-l1, exit-cost-ns, rate, work or caches"),
            std::string::npos);
}

TEST(Sweep, EachValueGivesValidatedOptions) {
  BenchOptions base;
  base.io.l1_vcpus = 2;
  base.io.l2_vcpus = 2;
  auto o = sweep_options(base, SweepParam::l2_per_l1, 4);
  ASSERT_TRUE(o);
  EXPECT_EQ(o->io.l2_vcpus, 8u);
  EXPECT_FALSE(sweep_options(base, SweepParam::l2_per_l1, 0));
  EXPECT_FALSE(sweep_options(base, SweepParam::l2_per_l1, 33));
  EXPECT_EQ(sweep_options(base, SweepParam::exit_cost_ns, 1500)->exit_cost_ns, 1500u);
  EXPECT_FALSE(sweep_options(base, SweepParam::exit_cost_ns, kMaxExitCostNs + 1));
  EXPECT_FALSE(sweep_options(base, SweepParam::slots, 1));
  EXPECT_FALSE(sweep_options(base, SweepParam::slots, uint64_t{1} << 40));
  EXPECT_EQ(sweep_options(base, SweepParam::slots, 32764)->slots, 32764u);
  EXPECT_EQ(sweep_options(base, SweepParam::caches, 512)->extra_caches, 512u);
  EXPECT_FALSE(sweep_options(base, SweepParam::caches, kMaxExtraCaches + 1));
  register_all();
  const BenchInfo* io = find_bench("nested-io");
  ASSERT_TRUE(io);
  EXPECT_FALSE(validate_sweep(*io, base, SweepSpec{SweepParam::rate, {}}));
  EXPECT_FALSE(validate_sweep(*io, base, SweepSpec{SweepParam::rate, {10, 0}}));
  // What the test needs of each point's options too: nested-io's 1000 Hz
  // ticks leave L2 no time at a 300 µs exit cost.
  EXPECT_TRUE(validate_sweep(*io, base, SweepSpec{SweepParam::exit_cost_ns, {0, 1000}}));
  EXPECT_FALSE(validate_sweep(*io, base, SweepSpec{SweepParam::exit_cost_ns, {0, 300000}}));
}

TEST(Sweep, ParametersApplyToTheTestsTheyChange) {
  register_all();
  const BenchInfo* io = find_bench("nested-io");
  const BenchInfo* map = find_bench("map");
  const BenchInfo* sw = find_bench("l2-switch-8");
  ASSERT_TRUE(io && map && sw);
  EXPECT_TRUE(check_sweep_applies(*io, SweepParam::l2_per_l1));
  EXPECT_TRUE(check_sweep_applies(*io, SweepParam::exit_cost_ns));
  EXPECT_FALSE(check_sweep_applies(*io, SweepParam::slots));
  EXPECT_TRUE(check_sweep_applies(*map, SweepParam::slots));
  EXPECT_FALSE(check_sweep_applies(*map, SweepParam::work));
  EXPECT_FALSE(check_sweep_applies(*sw, SweepParam::slots));
  EXPECT_TRUE(check_sweep_applies(*sw, SweepParam::caches));
  EXPECT_TRUE(check_sweep_applies(*map, SweepParam::caches));
}

TEST(Sweep, ATinySweepRunsEveryStrategyAtEveryValue) {
  register_all();
  const BenchInfo* io = find_bench("nested-io");
  ASSERT_NE(io, nullptr);
  BenchOptions base;
  base.strategies = {StrategyKind::cache, StrategyKind::oracle};
  base.iterations = 4;
  base.io.work = 8;
  SweepSpec spec{SweepParam::l2_per_l1, {1, 2}};
  auto points = run_sweep(*io, base, spec);
  ASSERT_TRUE(points) << points.error().to_string();
  ASSERT_EQ(points->size(), 4u);
  std::vector<std::pair<uint64_t, StrategyKind>> order;
  for (const SweepPoint& p : *points) {
    order.emplace_back(p.value, p.row.strategy);
    EXPECT_TRUE(p.row.failures.empty());
    EXPECT_EQ(p.row.iterations, 4u * p.value) << "requests: 4 per L2 vCPU";
  }
  EXPECT_EQ(order, (std::vector<std::pair<uint64_t, StrategyKind>>{{1, StrategyKind::cache},
                                                                   {1, StrategyKind::oracle},
                                                                   {2, StrategyKind::cache},
                                                                   {2, StrategyKind::oracle}}));
  nlohmann::json j = sweep_json(io->name, spec, base, *points);
  EXPECT_EQ(j["parameter"], "l2-per-l1");
  EXPECT_EQ(j["points"].size(), 4u);
  EXPECT_EQ(j["points"][2]["value"], 2);
  EXPECT_EQ(j["points"][2]["strategy"], "cache");
  EXPECT_TRUE(j["points"][0].contains("requests_per_second"));
  std::string csv = sweep_csv(spec, *points);
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 5);
  EXPECT_EQ(csv.rfind("l2-per-l1,strategy,seconds_per_iteration,", 0), 0u);
  EXPECT_NE(csv.find("\n2,oracle,"), std::string::npos);
}

// A point with a time it does not have (here no round trip): null in JSON,
// an empty CSV field; the time it has is kept.
TEST(Sweep, APointsMissingTimeIsNullAndAnEmptyField) {
  SweepSpec spec{SweepParam::exit_cost_ns, {0}};
  BenchRow row;
  row.strategy = StrategyKind::cache;
  row.iterations = 1;
  row.seconds_per_iteration = 5e-5;
  std::vector<SweepPoint> points{{0, row}};
  BenchOptions base;
  base.strategies = {StrategyKind::cache};
  nlohmann::json j = sweep_json("l2-switch-2", spec, base, points);
  EXPECT_EQ(j["points"][0]["seconds_per_iteration"], 5e-5);
  EXPECT_TRUE(j["points"][0]["seconds_per_round_trip"].is_null());
  EXPECT_NE(sweep_csv(spec, points).find("\n0,cache,5e-05,,1,"), std::string::npos) << sweep_csv(spec, points);
}

}  // namespace
}  // namespace nestcache::workloads
