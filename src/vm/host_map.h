// HostMap: a one-shot map of one guest page (kvm_vcpu_map / kvm_vcpu_unmap;
// the "before" of the seed, DESIGN.md §3).
//
// map(gfn) resolves memslot -> hva -> frame. A managed frame is reached
// through the direct map and pinned; an unmanaged frame gets a remap window
// (a real mmap, and a real munmap at unmap). Nothing invalidates a HostMap:
// kept across a migration, discard or memslot change, it goes stale, exactly
// as the kernel's does today. Every access checks for that and counts it:
//   - the frame tag (the frame stopped backing the page: migrate, discard);
//   - the memslot translation (the gfn no longer resolves to the same hva).
//
// Move-only RAII: destruction unmaps. Not thread-safe: one owner at a time.
#pragma once

#include <cstring>

#include "base/error.h"
#include "host/phys_mem.h"
#include "vm/vm.h"

namespace nestcache::vm {

class HostMap {
 public:
  HostMap() = default;
  HostMap(HostMap&& o) noexcept { *this = std::move(o); }
  HostMap& operator=(HostMap&& o) noexcept;
  ~HostMap() { unmap(false); }

  // Maps gfn for reading and writing (kvm_vcpu_map). EFAULT if no valid
  // memslot holds it, if that memslot is read-only (KVM_MEM_READONLY: KVM
  // refuses it a writable mapping) or if the fault fails; ENOMEM if the remap
  // window cannot be opened. Counts maps, unmaps, windows and stale accesses
  // in `counters` (a vCPU's), or in the VM's.
  static Result<HostMap> map(Vm& vm, Gfn gfn, CounterSet* counters = nullptr) {
    return map_impl(vm, gfn, counters, true);
  }
  // The same for reading only (kvm_vcpu_map_readonly): a read-only memslot
  // is fine. The mapping itself is the same; the caller promises not to
  // write through it.
  static Result<HostMap> map_readonly(Vm& vm, Gfn gfn, CounterSet* counters = nullptr) {
    return map_impl(vm, gfn, counters, false);
  }
  // Releases the mapping. `dirty` records that the guest page was written
  // (no dirty log is modelled; kept for the call sites' honesty).
  void unmap(bool dirty);

  bool mapped() const { return vm_ != nullptr; }
  Gfn gfn() const { return gfn_; }
  Pfn pfn() const { return tag_.pfn; }
  const host::FrameTag& tag() const { return tag_; }
  std::byte* data() const { return data_; }

  // True if the mapping still shows what the gfn holds; otherwise counts a
  // stale access (and aborts if stale accesses are fatal).
  bool check() const;

  template <class T>
  T read(size_t offset) const {
    T v;
    check();
    std::memcpy(&v, data_ + offset, sizeof v);
    return v;
  }
  template <class T>
  void write(size_t offset, T v) const {
    check();
    std::memcpy(data_ + offset, &v, sizeof v);
  }

 private:
  static Result<HostMap> map_impl(Vm& vm, Gfn gfn, CounterSet* counters, bool writable);
  Vm* vm_ = nullptr;
  CounterSet* counters_ = nullptr;
  Gfn gfn_ = 0;
  Hva hva_ = 0;
  uint64_t generation_ = 0;
  host::FrameTag tag_;
  std::byte* data_ = nullptr;
  host::FramePin pin_;
  host::RemapWindow window_;
};

}  // namespace nestcache::vm
