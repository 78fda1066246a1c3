// Read-modify-write of a guest qword that other agents change at the same
// time (the processor clearing a posted-interrupt request, L0 reading an MSR
// bitmap, another vCPU): a LOCK CMPXCHG loop, as a kernel's set_bit/clear_bit.
#pragma once

#include <cstdint>

#include "cpu/guest_task.h"

namespace nestcache::guest {

// What an update does when the qword has no memslot (reads come back as
// kUnbackedRead and writes are dropped, wait.h).
enum class IfUnbacked : uint8_t {
  wait,     // the VMM is moving its memslot: wait until it is back, then update
  proceed,  // update anyway (the write is dropped), as a plain store would be
};

// Sets the bits of `set` and clears those of `clear` in the qword at `gpa`
// (8-aligned) atomically; returns the new value.
cpu::GuestFn<uint64_t> locked_update(Gpa gpa, uint64_t set, uint64_t clear, IfUnbacked unbacked);

}  // namespace nestcache::guest
