# Turns the output of `spin -T -t protocol.pml` (a counterexample replayed)
# into numbered steps, one sentence each, with the C++ counterpart of each.
#
#   spin -T -t [macros] protocol.pml | awk -f trail_steps.awk
#   awk -v table=1 -f trail_steps.awk </dev/null     # the step table (markdown)
#
# The model prints "@@ <step> <args>" at each step; the table below names
# what the step does and where the code does it. Placeholders in a sentence:
# {vN} vCPU, {hN} hva, {fN} frame, {nN} number, where N is the argument's
# position after the step name.

function def(key, actor, text, code) { A[key] = actor; T[key] = text; C[key] = code; order[++nkeys] = key }

BEGIN {
  # --- vCPU thread --------------------------------------------------------
  def("rebind", "v", "L1 loads the vmcs12 vCPU 0 cleared: the context's cache {n2} is bound to this vCPU, then read", "src/vmx/page_strategy.cc CachePageSet::lock (PfnCache::set_vcpu)")
  def("vmlaunch", "v", "L1 executes VMLAUNCH: L0 builds vmcs02", "src/vmx/nested_entry.cc NestedVmx::enter")
  def("check_ok", "v", "the cache checks valid: vmcs02 gets frame {f2} (hva {h3})", "src/vm/pfn_cache.h PfnCache::with_read_lock (check)")
  def("activate", "v", "activates the cache", "src/vm/pfn_cache.cc PfnCache::activate")
  def("check_fail", "v", "the cache fails its check (invalid, or an older memslot generation): refresh", "src/vmx/page_strategy.cc CachePageSet::lock")
  def("resolve", "v", "refresh: the gpa resolves to hva {h2} (memslot generation {n3})", "src/vm/pfn_cache.cc PfnCache::refresh_locked")
  def("efault", "v", "refresh: no valid memslot holds the gpa (EFAULT); the cache stays active and invalid", "src/vm/pfn_cache.cc PfnCache::refresh_locked")
  def("same_hva", "v", "refresh: same hva and still valid: keeps the mapping, takes generation {n2}", "src/vm/pfn_cache.cc PfnCache::refresh_locked")
  def("index", "v", "refresh: files the cache in the registry at hva {h2}", "src/vm/pfn_cache.cc CacheRegistry::index")
  def("seq", "v", "refresh: snapshots mmu_invalidate_seq = {n2}", "src/vm/pfn_cache.cc PfnCache::refresh_locked")
  def("map", "v", "refresh: maps hva {h2}: frame {f3}", "src/vm/pfn_cache.cc PfnCache::map_frame, HostMm::fault_in")
  def("install", "v", "refresh: installs frame {f2}; the cache is valid", "src/vm/pfn_cache.cc PfnCache::refresh_locked")
  def("retry", "v", "refresh: an invalidation raced it ({n2} in progress, seq {n3}): drops the frame and retries", "src/vm/pfn_cache.cc PfnCache::refresh_locked (Vm::mmu_invalidate_retry)")
  def("deactivate", "v", "deactivates the cache (it leaves the registry)", "src/vm/pfn_cache.cc PfnCache::deactivate")
  def("keep_active", "v", "the activation failed; the cache stays active and invalid", "src/vmx/page_strategy.cc CachePageSet::lock")
  def("v02", "v", "vmcs02 holds frame {f2} (hva {h3})", "src/vmx/nested_entry.cc NestedVmx::get_vmcs12_pages")
  def("v02_none", "v", "vmcs02 without the page (KVM's fallback)", "src/vmx/nested_entry.cc NestedVmx::get_vmcs12_pages")
  def("requests", "v", "processes requests (kOutsideGuestMode is cleared)", "src/cpu/vcpu.cc cpu::Vcpu::process_requests")
  def("req_refresh", "v", "kRefreshGuestPages: rewrites vmcs02", "src/cpu/vcpu.cc cpu::Vcpu::process_requests; src/vmx/nested_entry.cc NestedVmx::refresh_guest_pages")
  def("mode_in", "v", "publishes IN_GUEST_MODE, then looks at its requests", "src/vm/vcpu.cc vm::Vcpu::enter_guest_mode")
  def("cancel_req", "v", "a request is pending: the entry is cancelled", "src/vm/vcpu.cc vm::Vcpu::enter_guest_mode")
  def("last_check_fail", "v", "last check: the cache is invalid: entry cancelled, kRefreshGuestPages", "src/vmx/nested_entry.cc NestedVmx::check_before_hardware_entry, last_check_fails; src/vmx/page_strategy.cc CachePageSet::any_invalid")
  def("l2", "v", "the last check passes: L2 runs on vmcs02", "src/cpu/vcpu.cc cpu::Vcpu::run_loop, cpu::Vcpu::run_guest")
  def("l2_access", "v", "the CPU accesses frame {f2} through vmcs02", "src/cpu/cpu_model.cc CpuModel::frame (frame-tag check)")
  def("l2_nopage", "v", "L2 runs; vmcs02 has no pfn for the page", "src/cpu/cpu_model.cc CpuModel")
  def("l2_kicked", "v", "kicked: L2 exits at the next operation boundary", "src/cpu/vcpu.cc cpu::Vcpu::run_guest (exit_requested)")
  def("l2_exit", "v", "L2 exits (a VM exit of its own)", "src/cpu/vcpu.cc cpu::Vcpu::run_guest")
  def("mode_out", "v", "leaves guest mode (releases invalidations waiting for it)", "src/vm/vcpu.cc vm::Vcpu::exit_guest_mode")
  def("exit_l0", "v", "the exit is handled in L0; L2 is entered again", "src/cpu/exit_handlers.cc cpu::Vcpu::handle_exit")
  def("exit_sw", "v", "the exit is handled in L0: posted-interrupt completion reaches the page in software", "src/cpu/exit_handlers.cc cpu::Vcpu::complete_posted_interrupts_in_software; src/vmx/page_strategy.cc CachePageSet::access")
  def("exit_l1", "v", "the exit is reflected to L1, which VMRESUMEs: L0 builds vmcs02", "src/vmx/nested.cc NestedVmx::reflect_exit; src/vmx/nested_entry.cc NestedVmx::enter")
  def("sw_check_fail", "v", "L0 software finds the cache invalid (or of an older generation): refreshes it", "src/vmx/page_strategy.cc CachePageSet::access")
  def("sw_enoent", "v", "L0 software finds the cache inactive: page not mapped, nothing accessed", "src/vmx/page_strategy.cc CachePageSet::access")
  def("sw_access", "v", "L0 software accesses frame {f2} through the cache", "src/vmx/page_strategy.cc CachePageSet::access (PageView)")
  def("sw_request", "v", "after that refresh, requests kRefreshGuestPages (vmcs02 may hold the old pfn)", "src/vmx/page_strategy.cc CachePageSet::access")
  def("release", "v", "L1 clears this L2's vmcs12 (VMCLEAR) and runs on without it: cache {n2} is free for another vCPU", "src/vmx/nested.cc NestedVmx::clear_context")
  def("sw_norequest", "v", "after that refresh, requests nothing: vmcs02 keeps its pfn (the seed)", "src/vmx/page_strategy.cc CachePageSet::access")
  # --- host threads --------------------------------------------------------
  def("migrate", "h", "migrates hva {h2}: frame {f3} to a new frame {f4}", "src/host/host_mm.cc HostMm::migrate")
  def("migrate_refused", "h", "migrate of hva {h2} refused (not present, or already migrating)", "src/host/host_mm.cc HostMm::migrate")
  def("discard", "h", "discards hva {h2}", "src/host/host_mm.cc HostMm::discard")
  def("start", "h", "notifier: invalidate_range_start(hva {h2})", "src/vm/vm.cc Vm::invalidate_range_start")
  def("name", "h", "notifier: names each cache's bound vCPU, before marking it", "src/vm/pfn_cache.cc PfnCache::notifier_invalidate")
  def("mark", "h", "notifier: marks the cache bound to vCPU{v2} invalid", "src/vm/pfn_cache.cc CacheRegistry::invalidate, PfnCache::notifier_invalidate")
  def("nocache", "h", "notifier: no cache is filed at hva {h2}: nothing to mark, no vCPU to wait for", "src/vm/pfn_cache.cc CacheRegistry::invalidate")
  def("collect", "h", "notifier: vCPU{v2}'s cache was already invalid: waits for vCPU{v2} all the same", "src/vm/pfn_cache.cc CacheRegistry::invalidate")
  def("skip_invalid", "h", "notifier: vCPU{v2}'s cache was already invalid: vCPU{v2} is not waited for", "src/vm/pfn_cache.cc CacheRegistry::invalidate")
  def("request", "h", "notifier: requests kOutsideGuestMode of vCPU{v2}", "src/vm/vcpu.cc vm::Vcpu::make_request_and_wait")
  def("sees_in", "h", "notifier: reads vCPU{v2}'s mode: in guest mode", "src/vm/vcpu.cc vm::Vcpu::make_request_and_wait")
  def("sees_out", "h", "notifier: reads vCPU{v2}'s mode: outside guest mode (no wait)", "src/vm/vcpu.cc vm::Vcpu::make_request_and_wait")
  def("kick", "h", "notifier: kicks vCPU{v2} (IN_GUEST_MODE to EXITING)", "src/vm/vcpu.cc vm::Vcpu::kick")
  def("wait", "h", "notifier: waits for vCPU{v2} to leave guest mode", "src/vm/vcpu.cc vm::Vcpu::wait_for_exit")
  def("waited", "h", "notifier: vCPU{v2} has left guest mode", "src/vm/vcpu.cc vm::Vcpu::wait_for_exit")
  def("nowait", "h", "notifier: returns without waiting for the vCPUs", "src/vm/vm.cc Vm::invalidate_range_start")
  def("remap", "h", "remaps hva {h2} to frame {f4}: frame {f3} no longer backs it", "src/host/host_mm.cc HostMm::migrate")
  def("remap_gone", "h", "the page went away meanwhile: migration abandoned", "src/host/host_mm.cc HostMm::migrate")
  def("unmap", "h", "unmaps hva {h2} (frame {f3})", "src/host/host_mm.cc HostMm::discard")
  def("end", "h", "notifier: invalidate_range_end(hva {h2}): mmu_invalidate_seq = {n3}", "src/vm/vm.cc Vm::invalidate_range_end")
  def("free", "h", "frees frame {f2}", "src/host/host_mm.cc HostMm::migrate/discard, PhysMem::free")
  # --- VMM -------------------------------------------------------------------
  def("slot_invalid", "m", "memslot at hva {h1} published invalid (generation {n2})", "src/vm/vm.cc Vm::set_memory_region, Memslots::publish_invalid")
  def("slot_move", "m", "memslot committed at hva {h1} (generation {n2})", "src/vm/memslots.cc Memslots::commit")
  def("slot_delete", "m", "memslot deleted (generation {n1})", "src/vm/memslots.cc Memslots::commit")
  def("slot_create", "m", "memslot created at hva {h1} (generation {n2})", "src/vm/memslots.cc Memslots::commit")
  # --- property violations ------------------------------------------------------
  def("l2_freed", "v", "VIOLATION: the CPU accesses frame {f2} through vmcs02, and frame {f2} is free", "src/cpu/cpu_model.cc CpuModel::frame")
  def("l2_stale", "v", "VIOLATION: the CPU accesses frame {f2} through vmcs02, but frame {f2} no longer backs hva {h3}", "src/cpu/cpu_model.cc CpuModel::frame")
  def("sw_freed", "v", "VIOLATION: L0 software accesses frame {f2} through the cache, and frame {f2} is free", "src/vmx/page_strategy.cc PageView")
  def("sw_stale", "v", "VIOLATION: L0 software accesses frame {f2} through the cache, but frame {f2} no longer backs hva {h3}", "src/vmx/page_strategy.cc PageView")

  if (table) {
    print "| model step | what it does | C++ counterpart |"
    print "|---|---|---|"
    for (i = 1; i <= nkeys; i++) {
      k = order[i]
      print "| `" k "` | " plain(T[k]) " | " C[k] " |"
    }
    exit 0
  }
  n = 0; cyc = 0; ncyc = 0
}

function hva(x) { return x == 0 ? "A" : x == 1 ? "B" : "none" }

function fill(text, args,    out, m, kind, idx, val) {
  out = text
  while (match(out, /\{[vhfn][0-9]\}/)) {
    kind = substr(out, RSTART + 1, 1)
    idx = substr(out, RSTART + 2, 1) + 0
    val = args[idx]
    if (kind == "h") val = hva(val)
    out = substr(out, 1, RSTART - 1) val substr(out, RSTART + RLENGTH)
  }
  return out
}

function plain(text) {
  gsub(/\{v[0-9]\}/, "N", text); gsub(/\{h[0-9]\}/, "H", text); gsub(/\{f[0-9]\}/, "F", text); gsub(/\{n[0-9]\}/, "n", text)
  return text
}

function step(line,    f, nf, key, args, i, who) {
  nf = split(line, f, " ")
  if (f[2] == "VIOLATION") { key = f[3]; i = 3 } else { key = f[2]; i = 2 }
  for (j = i + 1; j <= nf; j++) args[j - i] = f[j]
  if (!(key in T)) return sprintf("%-8s %s", "?", line)
  if (A[key] == "v") who = "vCPU" args[1]
  else if (A[key] == "h") who = "host" args[1]
  else who = "VMM"
  return sprintf("%-7s %s  [%s]", who, fill(T[key], args), C[key])
}

/^<<<<<START OF CYCLE>>>>>/ { cyc = 1; next }
/^@@ / {
  s = step($0)
  if (cyc) cycle[++ncyc] = s; else pre[++n] = s
  next
}
/^spin: text of failed assertion:/ { failed = substr($0, 33) }

END {
  if (table) exit 0
  for (i = 1; i <= n; i++) printf("  %3d. %s\n", i, pre[i])
  if (ncyc) {
    # spin replays the cycle until the trail ends, often twice: show it once.
    len = ncyc
    if (ncyc % 2 == 0) {
      same = 1
      for (i = 1; i <= ncyc / 2; i++) if (cycle[i] != cycle[i + ncyc / 2]) same = 0
      if (same) len = ncyc / 2
    }
    printf("       ---- from here the run repeats forever: no L2 entry ever again ----\n")
    for (i = 1; i <= len; i++) printf("  %3d. %s\n", n + i, cycle[i])
  }
  if (failed != "") printf("       (spin: assertion %s failed)\n", failed)
}
