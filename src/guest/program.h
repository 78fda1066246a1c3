// The names guest programs are written with — the coroutine types, the
// operations and the L1<->L2 mailbox — for code outside the guest layer that
// writes one (a scenario's own L1 or L2 program):
//
//   namespace { using namespace guest::program; ... }
#pragma once

#include "cpu/guest_task.h"
#include "guest/mailbox.h"

namespace nestcache::guest::program {

namespace ops = cpu::ops;
using cpu::GuestFn;
using cpu::GuestOp;
using cpu::GuestTask;
using cpu::OpResult;
using cpu::Outcome;
using guest::Call;
using guest::Mailbox;

}  // namespace nestcache::guest::program
