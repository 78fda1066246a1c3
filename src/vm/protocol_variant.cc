#include "vm/protocol_variant.h"

namespace nestcache::vm {

std::optional<ProtocolVariant> ProtocolVariant::from_model(std::string_view name) {
  ProtocolVariant v;
  if (name == "OURS") return v;
  if (name == "SEED") {
    v.software_refresh_requests_rewrite = false;
  } else if (name == "NO_WAIT") {
    v.notifier_waits_for_vcpus = false;
  } else if (name == "FLIPPED_ONLY") {
    v.wait_for_already_invalid = false;
  } else if (name == "NO_RETRY") {
    v.refresh_retries = false;
  } else if (name == "STALE_SNAPSHOT") {
    v.snapshot_seq_per_try = false;
  } else if (name == "NO_LAST_CHECK") {
    v.last_check = false;
  } else if (name == "NO_DEACTIVATE") {
    v.deactivate_failed_activation = false;
  } else if (name == "SW_DEACTIVATE") {
    v.software_refresh_failure_deactivates = true;
  } else if (name == "NAME_FIRST") {
    v.name_vcpu_after_marking = false;
  } else {
    return std::nullopt;
  }
  return v;
}

}  // namespace nestcache::vm
