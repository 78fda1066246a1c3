// libFuzzer target: the scenario-file parser behind `nestcache run`
// (workloads/scenario.h), on any text. It must accept or refuse every input
// with a message, never crash; an accepted file has at least one case, each
// with a name, as the format requires.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "workloads/scenario.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace nestcache::workloads::scenario;
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto file = parse_scenario_text(text, "fuzz.json");
  if (!file) {
    if (file.error().message.empty()) std::abort();
    return 0;
  }
  if (file->cases.empty()) std::abort();
  for (const Case& c : file->cases)
    if (c.name.empty()) std::abort();
  return 0;
}
