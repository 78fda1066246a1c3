// Page strategies: how L0 reaches the L1 pages a nested guest needs
// (DESIGN.md §4 "Page strategies"; the seed's whole subject).
//
//   map     the kernel before the seed: a HostMap per nested entry, unmapped
//           at the nested exit; the MSR bitmap mapped only for the merge.
//           Nothing invalidates the maps: kept across a migration they go
//           stale, and the frame tags show it.
//   cache   the seed: one PfnCache per page, activated on first use, checked
//           (and refreshed) on entry, kept mapped across exits. The caches
//           whose pfn the hardware uses are bound to the vCPU.
//   oracle  the physical limit: the same caches, but their mappings are
//           hardware-view pointers that cost nothing to make.
//
// A PageSet is one vCPU's handles on the five pages. Entry code asks it for
// the pfn of each page (hardware use) or for a checked view of a page (L0
// software use); exit code calls put().
#pragma once

#include <array>
#include <atomic>
#include <functional>
#include <cstring>
#include <memory>
#include <optional>
#include <string_view>

#include "base/error.h"
#include "host/phys_mem.h"
#include "vm/host_map.h"
#include "vm/pfn_cache.h"
#include "vm/vm.h"

namespace nestcache::vmx {

enum class StrategyKind { map, cache, oracle };
const char* strategy_name(StrategyKind kind);
std::optional<StrategyKind> parse_strategy(std::string_view name);

// The five kinds of L1 page L0 touches for a nested guest.
enum class L1Page : int { msr_bitmap = 0, apic_access, vapic, pi_desc, evmcs, kCount };
inline constexpr int kNumL1Pages = static_cast<int>(L1Page::kCount);
const char* l1_page_name(L1Page p);
// APIC-access, virtual-APIC and the descriptor: the hardware uses their pfns.
constexpr bool hardware_uses(L1Page p) {
  return p == L1Page::apic_access || p == L1Page::vapic || p == L1Page::pi_desc;
}

// A page as the hardware is given it: a pfn (written into vmcs02) and the
// tag of the frame when L0 wrote it there. The CPU model checks the tag on
// every access; a mismatch is a stale access.
struct HwPage {
  host::FrameTag tag;
  uint64_t offset = 0;  // within the page (the descriptor need not be aligned)
  bool valid() const { return tag.valid(); }
  Pfn pfn() const { return tag.pfn; }
};

// A checked view of one L1 page (from its first byte) for L0 software, valid
// inside the callback that receives it. Every access checks that the mapping
// is still current.
class PageView {
 public:
  using CheckFn = bool (*)(const void* ctx);
  PageView(std::byte* data, CheckFn check, const void* ctx) : data_(data), check_(check), ctx_(ctx) {}
  template <class T>
  T read(size_t off) const {
    T v;
    check();
    std::memcpy(&v, data_ + off, sizeof v);
    return v;
  }
  template <class T>
  void write(size_t off, T v) const {
    check();
    std::memcpy(data_ + off, &v, sizeof v);
  }
  // Atomic read-modify-writes, for pages other CPUs update concurrently
  // (the posted-interrupt descriptor, the virtual-APIC IRR).
  uint64_t exchange64(size_t off, uint64_t v) const {
    check();
    return std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(data_ + off)).exchange(v);
  }
  uint64_t fetch_or64(size_t off, uint64_t v) const {
    check();
    return std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(data_ + off)).fetch_or(v);
  }
  uint32_t fetch_or32(size_t off, uint32_t v) const {
    check();
    return std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(data_ + off)).fetch_or(v);
  }
  uint8_t fetch_and8(size_t off, uint8_t v) const {
    check();
    return std::atomic_ref<uint8_t>(*reinterpret_cast<uint8_t*>(data_ + off)).fetch_and(v);
  }
  // Checks once and returns the bytes (bulk copies: the MSR-bitmap merge,
  // the eVMCS image).
  const std::byte* bytes() const {
    check();
    return data_;
  }
  // The same, writable (the eVMCS write-back on a nested exit).
  std::byte* mutable_bytes() const {
    check();
    return data_;
  }
  bool check() const { return !check_ || check_(ctx_); }

 private:
  std::byte* data_;
  CheckFn check_;
  const void* ctx_;
};

// The five caches of one cache set (one per nested context, DESIGN.md §4).
struct CacheBundle {
  CacheBundle(vm::Vm& vm, vm::Vcpu* vcpu, const host::HardwareView* hw);
  std::array<std::unique_ptr<vm::PfnCache>, kNumL1Pages> caches;
  vm::PfnCache& operator[](L1Page p) { return *caches[static_cast<int>(p)]; }
};

class PageSet {
 public:
  virtual ~PageSet() = default;
  virtual StrategyKind kind() const = 0;
  // The frame of page `p` at `gpa` for vmcs02. Errors mean the page is
  // unusable and the caller applies KVM's fallback for that page.
  virtual Result<HwPage> get_hw(L1Page p, Gpa gpa) = 0;
  // Runs fn(view) on a checked mapping of the page holding `gpa`.
  virtual Status access(L1Page p, Gpa gpa, const std::function<void(const PageView&)>& fn) = 0;
  // Nested exit ("put vmcs12 pages"): map unmaps everything; caches stay.
  virtual void put() = 0;
  // The last check before hardware entry: is any hardware-used page invalid?
  virtual bool any_invalid() const = 0;
  // VMXOFF, vCPU teardown: drops the mappings this set owns and goes back to
  // its own caches. A nested context's caches are the context's: they stay
  // mapped until the VM frees the context (clear it before calling this).
  virtual void release() = 0;
  // Points the set at the caches of a nested context (nullptr: back to the
  // vCPU's own set). The caches keep what they map; the next get_hw/access
  // re-activates any whose gpa differs. No-op for map.
  virtual void use_bundle(CacheBundle* bundle) {}
  // The cache serving page `p` now (nullptr for map): tests and reports.
  virtual vm::PfnCache* cache(L1Page p) { return nullptr; }

  // The enlightened VMCS (seed patch 7): runs fn on a checked view of the
  // eVMCS page at `gpa`.
  //   map     the HostMap taken when the eVMCS became current (a gpa this
  //           set has not mapped) is kept and reused until release_evmcs():
  //           nothing revalidates it, so a memslot move or a migration leaves
  //           it stale, and the view's checks count every such access;
  //   cache   the eVMCS cache (not bound to a vCPU) is locked on every call:
  //           checked, or refreshed / re-activated at `gpa`;
  //   oracle  the same with hardware-view mappings.
  // An error means the page cannot be mapped (no memslot holds it): the
  // caller's #UD (EVMPTRLD_ERROR). fn does not run then.
  virtual Status lock_evmcs(Gpa gpa, const std::function<void(const PageView&)>& fn) = 0;
  // nested_release_evmcs: map drops its kept HostMap; a cache stays mapped
  // (it belongs to the nested context, or to the set until release()).
  virtual void release_evmcs() = 0;
};

// Makes the page set for one vCPU. `hw` is required for oracle.
std::unique_ptr<PageSet> make_page_set(StrategyKind kind, vm::Vm& vm, vm::Vcpu& vcpu, CounterSet& vcpu_counters,
                                       const host::HardwareView* hw);

}  // namespace nestcache::vmx
