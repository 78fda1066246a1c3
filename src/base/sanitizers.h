// Which sanitizer this translation unit is built with, for the few places
// that must tell a sanitizer what it cannot see for itself.
#pragma once

// NC_TSAN: built with ThreadSanitizer (GCC defines __SANITIZE_THREAD__,
// Clang answers __has_feature).
#if defined(__SANITIZE_THREAD__)
#define NC_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define NC_TSAN 1
#endif
#endif

// NC_ASAN: built with AddressSanitizer.
#if defined(__SANITIZE_ADDRESS__)
#define NC_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define NC_ASAN 1
#endif
#endif
