// Registration functions of the nested-VMX scenarios (registry.cc calls them).
#pragma once

#include "workloads/registry.h"

namespace nestcache::workloads {

void register_vmx_instructions_selftest();
void register_nested_pages_selftest();
void register_migrate_under_l2_selftest();
void register_apic_update_selftest();
void register_l2_switch_selftest();
void register_nested_state_selftest();
void register_evmcs_selftest();

}  // namespace nestcache::workloads
