// Fixture for the layering check: vm may include base.
#pragma once

#include "base/types.h"
