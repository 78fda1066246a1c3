// ProtocolVariant: switches that each take one step out of the pfn-cache /
// invalidation / nested-entry protocol. They exist only so that tests can
// replay, against this code, the counterexamples SPIN finds for the same
// variants of the protocol's model (model/protocol.pml, model/README.md):
// each replay must fail with its variant and pass with the default, which is
// nestcache's protocol. Nothing else sets them.
//
// Each field names the one place that reads it; the model's macro for the
// variant is in brackets.
#pragma once

#include <optional>
#include <string_view>

namespace nestcache::vm {

struct ProtocolVariant {
  // vmx CachePageSet::access: after a software refresh of a page the
  // hardware uses, request kRefreshGuestPages [SEED: no].
  bool software_refresh_requests_rewrite = true;
  // Vm::invalidate_range_start: wait for the vCPUs of invalidated caches to
  // leave guest mode [NO_WAIT: request and kick only].
  bool notifier_waits_for_vcpus = true;
  // CacheRegistry::invalidate: wait for the vCPU of a cache that was already
  // invalid too [FLIPPED_ONLY: only for caches this invalidation flips].
  // (Lock-free readers are waited for either way.)
  bool wait_for_already_invalid = true;
  // PfnCache::map_and_install: retry when an invalidation raced the resolve
  // [NO_RETRY: install the frame that was mapped].
  bool refresh_retries = true;
  // PfnCache::map_and_install: snapshot the cache's count of invalidations
  // that found it on every try [STALE_SNAPSHOT: once, before the first].
  bool snapshot_seq_per_try = true;
  // vmx CachePageSet::any_invalid: the last check before entry looks for
  // invalid caches [NO_LAST_CHECK: it finds none].
  bool last_check = true;
  // vmx CachePageSet::lock: deactivate a vCPU-bound cache whose activation
  // fails [NO_DEACTIVATE: it stays active and invalid].
  bool deactivate_failed_activation = true;
  // vmx CachePageSet::access: a software refresh that fails deactivates the
  // cache [SW_DEACTIVATE: yes].
  bool software_refresh_failure_deactivates = false;
  // PfnCache::notifier_invalidate: name the cache's bound vCPU after marking
  // the cache invalid [NAME_FIRST: before].
  bool name_vcpu_after_marking = true;

  // The variant the model selects with macro `name` ("SEED", "NO_WAIT", ...;
  // "OURS" is the default), or nullopt if the model has no such variant.
  static std::optional<ProtocolVariant> from_model(std::string_view name);
};

}  // namespace nestcache::vm
