// Writes the nested-state target's seed corpus (nested_state_seeds()) into
// a directory, one file per seed named after it:
//   nestcache_fuzz_seeds DIR
// With --check, compares DIR with the seeds instead and fails (exit 1) if a
// seed is missing or differs, so the committed corpus follows the format.
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "fuzz/nested_state_target.h"

int main(int argc, char** argv) {
  const bool check = argc == 3 && std::strcmp(argv[1], "--check") == 0;
  if (argc != 2 && !check) {
    std::fprintf(stderr, "usage: %s [--check] DIR\n", argv[0]);
    return 2;
  }
  const std::filesystem::path dir = argv[argc - 1];
  int bad = 0;
  for (const auto& seed : nestcache::fuzz::nested_state_seeds()) {
    const auto path = dir / (seed.name + ".bin");
    if (check) {
      std::ifstream in(path, std::ios::binary);
      std::vector<char> have((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      if (!in.is_open() || have.size() != seed.blob.size() || std::memcmp(have.data(), seed.blob.data(), have.size())) {
        std::fprintf(stderr, "%s: missing or out of date (regenerate with %s %s)\n", path.c_str(), argv[0], dir.c_str());
        bad++;
      }
      continue;
    }
    std::filesystem::create_directories(dir);
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(seed.blob.data()), static_cast<std::streamsize>(seed.blob.size()));
    if (!out) {
      std::fprintf(stderr, "cannot write %s\n", path.c_str());
      return 1;
    }
  }
  return bad ? 1 : 0;
}
