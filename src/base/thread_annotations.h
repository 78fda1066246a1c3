// Clang thread-safety attributes, spelled once for the whole project.
//
// Every field a lock protects says so with NC_GUARDED_BY, every function that
// needs a lock held says so with NC_REQUIRES, so `clang++ -Wthread-safety`
// (the `thread-safety` preset, run in CI) checks the locking documentation
// against the code. GCC ignores the attributes.
#pragma once

#if defined(__clang__)
#define NC_TSA(x) __attribute__((x))
#else
#define NC_TSA(x)
#endif

#define NC_CAPABILITY(x) NC_TSA(capability(x))
#define NC_SCOPED_CAPABILITY NC_TSA(scoped_lockable)
#define NC_GUARDED_BY(x) NC_TSA(guarded_by(x))
#define NC_PT_GUARDED_BY(x) NC_TSA(pt_guarded_by(x))
#define NC_ACQUIRED_AFTER(...) NC_TSA(acquired_after(__VA_ARGS__))
#define NC_ACQUIRED_BEFORE(...) NC_TSA(acquired_before(__VA_ARGS__))
#define NC_REQUIRES(...) NC_TSA(requires_capability(__VA_ARGS__))
#define NC_REQUIRES_SHARED(...) NC_TSA(requires_shared_capability(__VA_ARGS__))
#define NC_ACQUIRE(...) NC_TSA(acquire_capability(__VA_ARGS__))
#define NC_ACQUIRE_SHARED(...) NC_TSA(acquire_shared_capability(__VA_ARGS__))
#define NC_RELEASE(...) NC_TSA(release_capability(__VA_ARGS__))
#define NC_RELEASE_SHARED(...) NC_TSA(release_shared_capability(__VA_ARGS__))
#define NC_RELEASE_GENERIC(...) NC_TSA(release_generic_capability(__VA_ARGS__))
#define NC_TRY_ACQUIRE(...) NC_TSA(try_acquire_capability(__VA_ARGS__))
#define NC_EXCLUDES(...) NC_TSA(locks_excluded(__VA_ARGS__))
#define NC_ASSERT_CAPABILITY(x) NC_TSA(assert_capability(x))
#define NC_ASSERT_SHARED_CAPABILITY(x) NC_TSA(assert_shared_capability(x))
#define NC_RETURN_CAPABILITY(x) NC_TSA(lock_returned(x))
#define NC_NO_THREAD_SAFETY_ANALYSIS NC_TSA(no_thread_safety_analysis)
