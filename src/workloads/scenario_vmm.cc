// The VMM's steps of a scenario: memslots, guest memory through the VMM's
// mappings, nested state and the VP-assist MSR (see scenario_session.h).
// Each one is a call of the public API a VMM has: vm::Vm and cpu::Machine.
#include <cstring>

#include "base/rcu.h"
#include "vmx/nested_state_format.h"
#include "workloads/scenario_session.h"

namespace nestcache::workloads::scenario {

namespace {

Observation from_status(const Status& st) {
  Observation o;
  if (st) return o;
  o.outcome = {Outcome::Kind::errno_code, static_cast<uint64_t>(st.error().code)};
  o.detail = st.error().message;
  return o;
}

Observation runner_error(std::string why) {
  Observation o;
  o.outcome = {Outcome::Kind::error, 0};
  o.detail = std::move(why);
  return o;
}

}  // namespace

Observation Session::vmm_step(const Step& s) {
  switch (s.verb) {
    case Verb::set_memory_region:
    case Verb::delete_memslot:
    case Verb::move_memslot:
    case Verb::set_memslot_flags: return memslot_step(s);
    case Verb::add_memslots: return add_memslots(s);
    case Verb::vmm_write:
    case Verb::vmm_read: return guest_memory_step(s);
    case Verb::get_nested_state: return get_nested_state(s);
    case Verb::set_nested_state: return set_nested_state(s);
    case Verb::set_vp_assist_msr: return from_status(machine_->set_vp_assist_msr(s.vcpu, eval(s.operand("value"))));
    default: return runner_error("not a VMM step");
  }
}

// KVM_SET_USER_MEMORY_REGION, either as written or, for delete/move/flags,
// re-issued for the slot as it is now (what a VMM does).
Observation Session::memslot_step(const Step& s) {
  const uint32_t slot = static_cast<uint32_t>(eval(s.operand("slot")));
  if (s.verb == Verb::set_memory_region)
    return from_status(vm_->set_memory_region(
        {slot, static_cast<uint32_t>(operand(s, "flags", 0)), operand(s, "gpa", 0), eval(s.operand("size")),
         operand(s, "hva", 0)}));
  std::optional<vm::Memslot> cur;
  {
    rcu::ReadLock rcu;
    if (const vm::Memslot* m = vm_->memslots().active()->by_id(slot)) cur = *m;
  }
  vm::MemoryRegion r{slot, 0, 0, 0, 0};
  if (cur) r = {slot, cur->flags, gfn_to_gpa(cur->base_gfn), cur->npages * kPageSize, cur->userspace_addr};
  switch (s.verb) {
    case Verb::delete_memslot: r.memory_size = 0; break;
    case Verb::move_memslot:
      if (!cur) return runner_error(fmt::format("slot {} does not exist: nothing to move", slot));
      r.guest_phys_addr = eval(s.operand("gpa"));
      break;
    case Verb::set_memslot_flags:
      if (!cur) return runner_error(fmt::format("slot {} does not exist: no flags to change", slot));
      r.flags = static_cast<uint32_t>(eval(s.operand("flags")));
      break;
    default: break;
  }
  return from_status(vm_->set_memory_region(r));
}

// Many slots under one slots_lock hold, as set-up code makes them.
Observation Session::add_memslots(const Step& s) {
  const uint64_t first = eval(s.operand("first_slot")), count = eval(s.operand("count"));
  const uint64_t size = eval(s.operand("size")), stride = operand(s, "stride", size);
  if (count > vm::kMaxUserMemslots + 16) return runner_error(fmt::format("count {} is more than any VM can hold", count));
  std::vector<vm::MemoryRegion> rs;
  for (uint64_t i = 0; i < count; i++)
    rs.push_back({static_cast<uint32_t>(first + i), static_cast<uint32_t>(operand(s, "flags", 0)),
                  eval(s.operand("gpa")) + i * stride, size, eval(s.operand("hva")) + i * stride});
  return from_status(vm_->set_memory_regions(rs));
}

// The VMM's own access to guest memory: by gpa through the memslots
// (kvm_read_guest / kvm_write_guest), or by hva through its mapping of a
// region, as a VMM writes its guest's RAM.
Observation Session::guest_memory_step(const Step& s) {
  const size_t size = s.bytes.empty() ? operand(s, "size", 8) : s.bytes.size();
  if (s.bytes.empty() && !is_access_width(size))
    return runner_error(fmt::format("size {} is not 1, 2, 4 or 8", size));
  std::vector<uint8_t> data = s.bytes;
  if (data.empty()) {
    const uint64_t v = s.has("value") ? eval(s.operand("value")) : 0;
    data.resize(size);
    std::memcpy(data.data(), &v, size);
  }
  const bool write = s.verb == Verb::vmm_write;
  Observation o;
  if (s.has("gpa")) {
    const Gpa gpa = eval(s.operand("gpa"));
    Status st = write ? vm_->write_guest(gpa, data.data(), data.size()) : vm_->read_guest(gpa, data.data(), data.size());
    if (!st) return from_status(st);
  } else {
    const Hva hva = eval(s.operand("hva"));
    bool inside = false;
    for (const auto& [name, base] : regions_) {
      const uint64_t bytes = case_.vm.regions.at(name);
      // Written so that no sum wraps: hva may be anything up to all ones.
      inside = inside || (hva >= base && hva - base <= bytes && data.size() <= bytes - (hva - base));
    }
    if (!inside) return runner_error(fmt::format("hva {:#x} is not inside a region of this VM", hva));
    // Through HostMm, not a raw pointer: a managed page is mapped only by
    // its first fault, and a page may be migrating.
    Status st = write ? mm_->copy_to(hva, data.data(), data.size()) : mm_->copy_from(hva, data.data(), data.size());
    if (!st) return from_status(st);
  }
  if (!write) {
    uint64_t v = 0;
    std::memcpy(&v, data.data(), std::min<size_t>(data.size(), 8));
    o.value = v;
  }
  return o;
}

Observation Session::get_nested_state(const Step& s) {
  auto blob = machine_->get_nested_state(s.vcpu);
  if (!blob) return from_status(tl::unexpected(blob.error()));
  if (!s.save_as.empty()) blobs_[s.save_as] = *blob;
  Observation o;
  o.blob = std::move(*blob);
  o.detail = fmt::format("{} bytes", o.blob.size());
  return o;
}

Result<std::vector<std::byte>> Session::blob_for(const Step& s) {
  std::vector<std::byte> b;
  if (s.state) {
    vmx::NestedStateImage img;
    img.vmxon_gpa = eval(s.state->vmxon);
    img.current_vmcs_gpa = eval(s.state->vmcs);
    img.guest_mode = s.state->guest_mode;
    img.run_pending = s.state->run_pending;
    img.evmcs = s.state->evmcs;
    if (s.state->vmcs12) img.vmcs12 = build_vmcs12(*s.state->vmcs12);
    b = vmx::encode(img);  // encode() does not validate: a bad state makes a bad blob
  } else {
    auto it = blobs_.find(s.blob);
    if (it == blobs_.end()) return errorf(EINVAL, "blob '{}' was never saved: its get_nested_state failed", s.blob);
    b = it->second;
  }
  for (const Patch& p : s.patches) {
    if (p.kind == Patch::Kind::resize) {
      b.resize(p.size, std::byte{0});
      continue;
    }
    // Written so that no sum wraps: the offset may be anything up to 2^64-1.
    if (p.offset > b.size() || p.size > b.size() - p.offset)
      return errorf(EINVAL, "patch {}: offset {} + {} bytes is beyond the blob's {} bytes", p.what, p.offset, p.size,
                    b.size());
    const uint64_t v = eval(p.value);
    std::memcpy(b.data() + p.offset, &v, p.size);
  }
  return b;
}

Observation Session::set_nested_state(const Step& s) {
  auto blob = blob_for(s);
  if (!blob) return runner_error(blob.error().message);
  return from_status(machine_->set_nested_state(s.vcpu, *blob));
}

}  // namespace nestcache::workloads::scenario
