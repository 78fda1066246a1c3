// Invariant checks. NC_CHECK is always on (an invariant broken means state is
// corrupt, and continuing would hide it); NC_DCHECK only in debug builds.
#pragma once

#include <cstdio>
#include <cstdlib>

#define NC_CHECK(cond)                                                          \
  do {                                                                          \
    if (!(cond)) [[unlikely]] {                                                 \
      std::fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                             \
    }                                                                           \
  } while (0)

#ifdef NDEBUG
#define NC_DCHECK(cond) \
  do {                  \
  } while (0)
#else
#define NC_DCHECK(cond) NC_CHECK(cond)
#endif
