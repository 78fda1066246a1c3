// Address vocabulary shared by every layer.
//
//   gpa  guest-physical address (as the guest sees it)      Gpa
//   gfn  guest frame number, gpa >> 12                       Gfn
//   hva  host-virtual address in the VMM process             Hva
//   pfn  host frame number, an index into PhysMem's memfd    Pfn
#pragma once

#include <cstddef>
#include <cstdint>

namespace nestcache {

using Gpa = uint64_t;
using Gfn = uint64_t;
using Hva = uintptr_t;
using Pfn = uint64_t;

inline constexpr size_t kPageShift = 12;
inline constexpr size_t kPageSize = size_t{1} << kPageShift;
inline constexpr uint64_t kPageMask = ~uint64_t{kPageSize - 1};
inline constexpr Pfn kInvalidPfn = ~Pfn{0};
inline constexpr Gpa kInvalidGpa = ~Gpa{0};
// Guest-physical address width of the modelled CPU (MAXPHYADDR).
inline constexpr unsigned kMaxPhysAddrBits = 46;

constexpr Gfn gpa_to_gfn(Gpa gpa) { return gpa >> kPageShift; }
constexpr Gpa gfn_to_gpa(Gfn gfn) { return gfn << kPageShift; }
constexpr uint64_t page_offset(uint64_t addr) { return addr & (kPageSize - 1); }
constexpr bool page_aligned(uint64_t addr) { return page_offset(addr) == 0; }
// Whether len bytes from addr stay in addr's page (len compared with what is
// left of the page: offset + len could wrap).
constexpr bool fits_in_page(uint64_t addr, uint64_t len) { return len <= kPageSize - page_offset(addr); }
// Whether an access of `size` bytes is one an instruction makes: 1, 2, 4 or 8.
constexpr bool is_access_width(uint64_t size) { return size == 1 || size == 2 || size == 4 || size == 8; }

}  // namespace nestcache
