// Fixture for the layering check: CLI11 belongs to the cli layer alone.
#include "vm/vm.h"

#include <CLI/CLI.hpp>
