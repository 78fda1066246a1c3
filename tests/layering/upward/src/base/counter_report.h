// Fixture for the layering check: a base header that reaches up into vm.
#pragma once

#include <cstdint>

#include "base/types.h"
#include "vm/vm.h"
