// A guest-memory environment for tests and micro-benchmarks of the host, vm
// and vmx layers: a PhysMem, a HostMm and a Vm with one region of `pages`
// guest pages of one frame kind, mapped by memslot 0 at gpa 0.
//
// Header-only and free of GoogleTest, so bench/ can use it too.
#pragma once

#include <memory>

#include "base/check.h"
#include "base/error.h"
#include "host/host_mm.h"
#include "host/phys_mem.h"
#include "vm/vm.h"

namespace nestcache::test_support {

struct VmEnvConfig {
  host::FrameKind kind = host::FrameKind::unmanaged;
  size_t pages = 64;        // the region in memslot 0
  size_t spare = 4096;      // free frames of `kind` (faults after a discard, migrations)
  size_t other_kind = 16;   // frames of the other kind, for regions tests add
  bool stale_fatal = false;  // abort on a stale access
  vm::CacheReadSide cache_read_side = vm::VmOptions{}.cache_read_side;  // the Vm's pfn caches' read side
};

struct VmEnv {
  // Builds the environment; aborts if it cannot (a test set-up).
  explicit VmEnv(const VmEnvConfig& c) { NC_CHECK(init(c)); }
  explicit VmEnv(host::FrameKind kind, size_t pages = 64, size_t spare = 4096)
      : VmEnv(VmEnvConfig{.kind = kind, .pages = pages, .spare = spare}) {}
  // The same, as an error value.
  static Result<std::unique_ptr<VmEnv>> create(const VmEnvConfig& c) {
    std::unique_ptr<VmEnv> env(new VmEnv());
    NC_TRY(env->init(c));
    return env;
  }
  Hva hva_of(Gpa gpa) const { return base + gpa; }

  host::FrameKind kind = host::FrameKind::unmanaged;
  // Declared in construction order, so the Vm goes before the HostMm it
  // subscribes to, and the HostMm before the frames it maps.
  std::unique_ptr<host::PhysMem> phys;
  std::unique_ptr<host::HostMm> mm;
  std::unique_ptr<vm::Vm> vm;
  Hva base = 0;

 private:
  VmEnv() = default;
  Status init(const VmEnvConfig& c) {
    const bool managed = c.kind == host::FrameKind::managed;
    const size_t frames = c.pages + c.spare;
    kind = c.kind;
    phys = NC_TRY(host::PhysMem::create({managed ? frames : c.other_kind, managed ? c.other_kind : frames}));
    phys->set_stale_access_fatal(c.stale_fatal);
    mm = std::make_unique<host::HostMm>(*phys);
    vm = std::make_unique<vm::Vm>(*mm, 1, vm::VmOptions{c.cache_read_side});
    base = NC_TRY(mm->create_region(c.pages * kPageSize, c.kind));
    return vm->set_memory_region({0, 0, 0, c.pages * kPageSize, base});
  }
};

}  // namespace nestcache::test_support
