/*
 * The pfn-cache / invalidation / nested-entry protocol of nestcache, for SPIN.
 *
 * One guest page whose pfn the hardware uses (the virtual-APIC page) is
 * cached per vCPU by a vCPU-bound pfn cache; the vCPU builds vmcs02 from the
 * cache, enters L2 through the last check, and L0 software reaches the page
 * through the same cache between entries. Host threads migrate or discard
 * the page's frame through the MMU notifier; a VMM thread moves or deletes
 * its memslot. model/README.md maps every step to the C++ code, states the
 * properties and the bounds, and shows how to run the check (model/check.sh).
 *
 * Every step prints "@@ <step> <args>"; model/trail_steps.awk turns a
 * counterexample trail into numbered sentences.
 *
 * Protocol variants (default: nestcache's protocol). Each changes one step:
 *   SEED            a software refresh does not request a vmcs02 rewrite
 *                   (the seed's nested_gpc_lock_if_active, v4)
 *   NO_WAIT         the notifier kicks bound vCPUs but does not wait for them
 *   NO_RETRY        refresh installs the frame it mapped without comparing
 *                   mmu_invalidate_seq (no retry)
 *   NO_LAST_CHECK   no last check for invalid caches before entering L2
 *   FLIPPED_ONLY    the notifier waits only for vCPUs of caches it flips from
 *                   valid, not of caches already invalid (the seed's patch 2)
 *   SW_DEACTIVATE   a failed software refresh deactivates the cache
 *   NO_DEACTIVATE   a vCPU-bound cache whose activation fails stays active
 *                   (no patch-4 deactivation)
 *   STALE_SNAPSHOT  refresh snapshots mmu_invalidate_seq once, not per try
 *   NAME_FIRST      the notifier names a cache's bound vCPU before marking the
 *                   cache invalid, not after (nestcache before 3bddd42)
 *
 * ENTRY_INVARIANT adds the invariant behind the safety property as an
 * assertion at every entry into L2 (check.sh checks it for ours).
 * HOST_AFTER_SLOT_CHANGE restricts the runs, not the protocol: host changes
 * start only once the first memslot change is committed (check.sh uses it to
 * print the seed's counterexample through a memslot move).
 * REBIND (with NVCPU 2) adds a context handover: vCPU 0 runs L2 on cache 0,
 * may give it up (L1's VMCLEAR; vCPU 0 runs only L1 from then on), and vCPU 1
 * then takes cache 0 over (VMPTRLD: CachePageSet::lock binds the cache to
 * vCPU 1, then reads it) and runs L2 on it. Cache 1 is not used.
 *
 * Bounds: NVCPU vCPUs (1 or 2; with 2 their caches map the same page),
 * NINV host changes (each a migrate or a discard of hva A, or of hva B when
 * memslot changes can move the page there; each in its own thread), NSLOT
 * memslot changes (each a move to the other hva or a delete, or a re-create
 * after a delete). check.sh names the configurations it checks.
 */

#ifndef NVCPU
#define NVCPU 1
#endif
#if defined(REBIND) && NVCPU != 2
#error REBIND needs NVCPU=2
#endif
#ifndef NINV
#define NINV 1
#endif
#ifndef NSLOT
#define NSLOT 2
#endif

#define NONE 255
#define A 0
#define B 1
#define NHVA 2
/* Each invalidation allocates at most one frame (migrate's new frame, or the
 * fault after a discard); frames are never reused, so a frame that stopped
 * backing its hva can never look current again. */
#define NFRAMES (NHVA + NINV)
#define BIT(h) (1 << (h))

/* refresh outcomes */
#define OK 1
#define EFAULT 2
#define AGAIN 3

/* ---- host memory (HostMm, PhysMem) ---- */
byte backing[NHVA];     /* the frame backing each hva; NONE: not present */
bool freed[NFRAMES];
byte next_frame = NHVA;
bool busy[NHVA];        /* a migration of the page is under way */

/* ---- memslots (Memslots): where the guest page lives ---- */
byte slot_hva = A;      /* NONE: no valid memslot holds the gpa */
byte gen = 0;           /* memslot generation */

/* ---- invalidation sequence (Vm) ---- */
byte in_progress = 0;
byte range = 0;         /* hvas being invalidated (a mask: only widens) */
byte mmu_seq = 0;

/* ---- vCPUs (vm::Vcpu) ---- */
mtype = { OUTSIDE, IN_GUEST, EXITING };
mtype mode[NVCPU];
bool req_outside[NVCPU];  /* kOutsideGuestMode */
bool req_refresh[NVCPU];  /* kRefreshGuestPages */
/* armed[i * NVCPU + v]: invalidation i saw vCPU v in guest mode and waits
 * until that guest-mode episode ends (exit_guest_mode clears it). */
bool armed[NINV * NVCPU];

/* ---- the caches of the page (PfnCache), one per vCPU ---- */
byte cur[NVCPU];        /* the cache a vCPU builds vmcs02 from (cache v, until a rebind) */
byte owner[NVCPU];      /* the cache's bound vCPU (vcpu_): whom an invalidation waits for */
bool released;          /* REBIND: vCPU 0 gave cache 0 up */
bool c_active[NVCPU];
bool c_valid[NVCPU];
byte c_hva[NVCPU];      /* hva_ */
byte c_idx[NVCPU];      /* indexed_hva_: its key in the registry; NONE: not filed */
byte c_frame[NVCPU];
byte c_gen[NVCPU];

/* ---- for the progress properties ---- */
bool in_l2[NVCPU];      /* the vCPU is running L2 (its last check passed) */
byte hosts_done = 0;    /* invalidations that have returned */

/* ---- vmcs02's pfn for the page ---- */
bool v02_used[NVCPU];
byte v02_frame[NVCPU];
byte v02_hva[NVCPU];

/* ---------------------------------------------------------------------- */
/* The accesses the properties are about.                                  */

/* The CPU, running L2, uses vmcs02's frame. */
inline l2_access(v) {
  atomic {
    if
    :: v02_used[v] && freed[v02_frame[v]] ->
       printf("@@ VIOLATION l2_freed %d %d\n", v, v02_frame[v]);
       assert(!freed[v02_frame[v]])
    :: v02_used[v] && !freed[v02_frame[v]] && backing[v02_hva[v]] != v02_frame[v] ->
       printf("@@ VIOLATION l2_stale %d %d %d\n", v, v02_frame[v], v02_hva[v]);
       assert(backing[v02_hva[v]] == v02_frame[v])
    :: v02_used[v] && !freed[v02_frame[v]] && backing[v02_hva[v]] == v02_frame[v] ->
       printf("@@ l2_access %d %d\n", v, v02_frame[v])
    :: !v02_used[v] -> printf("@@ l2_nopage %d\n", v)
    fi
  }
}

/* L0 software uses the cache's frame (under the cache's read lock). */
inline sw_use(v, c) {
  if
  :: freed[c_frame[c]] ->
     printf("@@ VIOLATION sw_freed %d %d\n", v, c_frame[c]);
     assert(!freed[c_frame[c]])
  :: !freed[c_frame[c]] && backing[c_hva[c]] != c_frame[c] ->
     printf("@@ VIOLATION sw_stale %d %d %d\n", v, c_frame[c], c_hva[c]);
     assert(backing[c_hva[c]] == c_frame[c])
  :: !freed[c_frame[c]] && backing[c_hva[c]] == c_frame[c] ->
     printf("@@ sw_access %d %d\n", v, c_frame[c])
  fi
}

/* ---------------------------------------------------------------------- */
/* vCPU side                                                               */

/* vm::Vcpu::exit_guest_mode: ends the guest-mode episode and releases every
 * invalidation waiting for it. Used inside atomic blocks. */
inline exit_guest(v) {
  mode[v] = OUTSIDE;
  k = 0;
  do
  :: k < NINV -> armed[k * NVCPU + v] = false; k++
  :: else -> break
  od;
  k = 0;
  in_l2[v] = false;
  printf("@@ mode_out %d\n", v)
}

/* PfnCache::deactivate (and its unindex). Used inside atomic blocks. */
inline deactivate(v, c) {
  c_active[c] = false; c_valid[c] = false; c_hva[c] = NONE; c_idx[c] = NONE;
  c_frame[c] = NONE; c_gen[c] = 0;
  printf("@@ deactivate %d\n", v)
}

/* PfnCache::refresh_locked: resolve the gpa, file the cache at its hva,
 * then map the frame and install it unless an invalidation raced the
 * resolve. Sets rc to OK or EFAULT. */
inline refresh(v, c) {
  atomic {
    r_hva = slot_hva; r_gen = gen;
    printf("@@ resolve %d %d %d\n", v, r_hva, r_gen);
    if
    :: r_hva == NONE ->
       c_valid[c] = false; c_frame[c] = NONE; rc = EFAULT; printf("@@ efault %d\n", v)
    :: r_hva != NONE && r_hva == c_idx[c] && c_valid[c] ->
       c_gen[c] = r_gen; rc = OK; printf("@@ same_hva %d %d\n", v, r_gen)
    :: r_hva != NONE && !(r_hva == c_idx[c] && c_valid[c]) -> rc = AGAIN
    fi
  }
  if
  :: rc == AGAIN ->
     if
     :: r_hva != c_idx[c] ->
        /* Invalid first, while still filed (and matched) at the old hva;
         * then filed at the new hva before the sequence snapshot below. */
        atomic { c_valid[c] = false }
        atomic { c_idx[c] = r_hva; printf("@@ index %d %d\n", v, r_hva) }
        atomic { c_hva[c] = r_hva }
     :: else
     fi;
#ifdef STALE_SNAPSHOT
     atomic { r_seq = mmu_seq; printf("@@ seq %d %d\n", v, r_seq) }
#endif
     do
     :: true ->
#ifndef STALE_SNAPSHOT
        atomic { r_seq = mmu_seq; printf("@@ seq %d %d\n", v, r_seq) }
#endif
        atomic {   /* map_frame: HostMm::fault_in */
          if
          :: backing[r_hva] == NONE -> backing[r_hva] = next_frame; next_frame++
          :: else
          fi;
          r_frame = backing[r_hva];
          printf("@@ map %d %d %d\n", v, r_hva, r_frame)
        }
        atomic {
          if
#ifdef NO_RETRY
          :: true ->
#else
          :: !((in_progress > 0 && (range & BIT(r_hva))) || mmu_seq != r_seq) ->
#endif
             c_frame[c] = r_frame; c_gen[c] = r_gen; c_valid[c] = true; rc = OK;
             printf("@@ install %d %d\n", v, r_frame)
#ifndef NO_RETRY
          :: else -> printf("@@ retry %d %d %d\n", v, in_progress, mmu_seq)
#endif
          fi
        }
        if
        :: rc == OK -> break
        :: else
        fi
     od
  :: else
  fi
}

/* NestedVmx::get_vmcs12_pages for the page: CachePageSet::get_hw -> lock ->
 * PfnCache::with_read_lock (check, or activate / refresh), then vmcs02. */
inline build(v, c) {
  do
  :: atomic {
       if
       :: c_active[c] && c_valid[c] && c_gen[c] == gen ->
          /* under the cache's read lock: the pfn goes into vmcs02 */
          v02_used[v] = true; v02_frame[v] = c_frame[c]; v02_hva[v] = c_hva[c]; done = true;
          printf("@@ check_ok %d %d %d\n", v, v02_frame[v], v02_hva[v])
       :: !c_active[c] -> c_active[c] = true; printf("@@ activate %d\n", v)
       :: c_active[c] && !(c_valid[c] && c_gen[c] == gen) -> printf("@@ check_fail %d\n", v)
       fi
     }
     if
     :: done -> break
     :: else ->
        refresh(v, c);
        if
        :: rc != OK -> break
        :: else
        fi
     fi
  od;
  atomic {
    if
    :: !done ->   /* KVM's fallback: vmcs02 without the page */
#ifndef NO_DEACTIVATE
       deactivate(v, c);
#else
       printf("@@ keep_active %d\n", v);
#endif
       v02_used[v] = false; v02_frame[v] = NONE; v02_hva[v] = NONE;
       printf("@@ v02_none %d\n", v)
    :: else
    fi;
    r_hva = 0; r_gen = 0; r_seq = 0; r_frame = 0; rc = 0; done = false
  }
}

/* CachePageSet::access for a page the hardware uses (the posted-interrupt
 * completion): refresh an active cache, never activate one. */
inline sw_access(v, c) {
  do
  :: atomic {
       if
       :: !c_active[c] -> printf("@@ sw_enoent %d\n", v); done = true
       :: c_active[c] && c_valid[c] && c_gen[c] == gen -> sw_use(v, c); done = true
       :: c_active[c] && !(c_valid[c] && c_gen[c] == gen) -> printf("@@ sw_check_fail %d\n", v)
       fi
     }
     if
     :: done -> break
     :: else ->
        refresh(v, c);
        if
        :: rc != OK ->
#ifdef SW_DEACTIVATE
           atomic { deactivate(v, c) };
#endif
           break
        :: else
        fi;
#ifndef SEED
        atomic { req_refresh[v] = true; printf("@@ sw_request %d\n", v) }
#else
        printf("@@ sw_norequest %d\n", v)
#endif
     fi
  od;
  atomic { r_hva = 0; r_gen = 0; r_seq = 0; r_frame = 0; rc = 0; done = false }
}

/* The run loop (cpu::Vcpu::run_loop) of a vCPU whose L1 runs an L2. */
proctype vcpu(byte v) {
  byte r_hva, r_gen, r_seq, r_frame, rc, k, c;
  bool done;

  c = v;
#ifdef REBIND
  if
  :: v == 1 ->
     /* VMPTRLD of vCPU 0's old vmcs12: the context's caches are vCPU 1's
      * now. set_vcpu, then the reads of the build below. */
     released;
     atomic { cur[v] = 0; c = 0 }
     atomic { owner[0] = v; printf("@@ rebind %d %d\n", v, c) }
  :: else
  fi;
#endif
  printf("@@ vmlaunch %d\n", v);
  build(v, c);
  do
  :: true ->
     /* process_requests */
     atomic {
       req_outside[v] = false;
       printf("@@ requests %d\n", v);
       if
       :: req_refresh[v] -> req_refresh[v] = false; done = true; printf("@@ req_refresh %d\n", v)
       :: else
       fi
     }
     if
     :: done -> done = false; build(v, c)
     :: else
     fi;
     /* enter_guest_mode: publish the mode, then look at requests */
     atomic { mode[v] = IN_GUEST; printf("@@ mode_in %d\n", v) }
     if
     :: atomic { (req_outside[v] || req_refresh[v]) -> printf("@@ cancel_req %d\n", v); exit_guest(v) }
     :: else ->
        /* The last check (seed patch 3), after the mode is published. */
        if
#ifndef NO_LAST_CHECK
        :: atomic {
             (c_active[c] && !c_valid[c]) ->
             printf("@@ last_check_fail %d\n", v); exit_guest(v); req_refresh[v] = true
           }
        :: atomic {
             !(c_active[c] && !c_valid[c]) -> in_l2[v] = true; printf("@@ l2 %d\n", v);
#ifdef ENTRY_INVARIANT
             /* What makes the accesses safe (model/README.md): at entry,
              * vmcs02's frame is the valid cache's, filed at its hva. */
             assert(!v02_used[v] || (c_active[c] && c_valid[c] && c_frame[c] == v02_frame[v] &&
                                     c_hva[c] == v02_hva[v] && c_idx[c] == v02_hva[v]))
#endif
           }
#else
        :: atomic { true -> in_l2[v] = true; printf("@@ l2 %d\n", v) }
#endif
        fi;
        if
        :: in_l2[v] ->
           /* L2 runs until a kick or an exit of its own; the CPU checks for
            * a kick between operations, so one access can follow a kick. */
           do
           :: atomic { mode[v] == EXITING -> printf("@@ l2_kicked %d\n", v); exit_guest(v) }; break
           :: mode[v] == IN_GUEST -> l2_access(v)
           :: atomic { mode[v] == IN_GUEST -> printf("@@ l2_exit %d\n", v); exit_guest(v) }; break
           od;
           if
           :: printf("@@ exit_l0 %d\n", v)
           :: printf("@@ exit_sw %d\n", v); sw_access(v, c)
           :: printf("@@ exit_l1 %d\n", v); build(v, c)
#ifdef REBIND
           :: v == 0 && !released ->
              /* L1 clears this L2's vmcs12 and runs on without it */
              atomic { released = true; printf("@@ release %d %d\n", v, c) };
              break
#endif
           fi
        :: else
        fi
     fi
  od
}

/* ---------------------------------------------------------------------- */
/* Host side: the MMU notifier (Vm::invalidate_range_start/end)            */

inline notify_start(i, h) {
  atomic {
    if
    :: in_progress == 0 -> range = BIT(h)
    :: else -> range = range | BIT(h)
    fi;
    in_progress++;
    printf("@@ start %d %d\n", i, h)
  }
  /* CacheRegistry::invalidate, under the registry mutex: mark each cache
   * filed in the range (under its write lock), then name its bound vCPU
   * (PfnCache::notifier_invalidate). */
#ifdef NAME_FIRST
  atomic {
    v = 0;
    do
    :: v < NVCPU -> named[v] = owner[v]; v++
    :: else -> break
    od;
    v = 0;
    printf("@@ name %d\n", i)
  }
#else
#define named owner
#endif
  atomic {
    v = 0;
    k = 0;   /* caches found */
    do
    :: v < NVCPU ->
       if
       :: c_active[v] && c_idx[v] == h && c_hva[v] == h ->
          k++;
          if
          :: c_valid[v] -> c_valid[v] = false; collect[named[v]] = true; printf("@@ mark %d %d\n", i, named[v])
          :: else ->
#ifndef FLIPPED_ONLY
             collect[named[v]] = true; printf("@@ collect %d %d\n", i, named[v])
#else
             printf("@@ skip_invalid %d %d\n", i, named[v])
#endif
          fi
       :: else
       fi;
       v++
    :: else -> break
    od;
    if
    :: k == 0 -> printf("@@ nocache %d %d\n", i, h)
    :: else
    fi;
    v = 0;
    k = 0
  }
  /* Vcpu::make_request_and_wait(collected, kOutsideGuestMode): request,
   * read the mode, kick, for each; then wait for those seen in guest mode. */
  do
  :: v < NVCPU && collect[v] ->
     atomic { req_outside[v] = true; printf("@@ request %d %d\n", i, v) }
     atomic {
       if
       :: mode[v] != OUTSIDE -> armed[i * NVCPU + v] = true; printf("@@ sees_in %d %d\n", i, v)
       :: else -> printf("@@ sees_out %d %d\n", i, v)
       fi
     }
     atomic {
       if
       :: mode[v] == IN_GUEST -> mode[v] = EXITING; printf("@@ kick %d %d\n", i, v)
       :: else
       fi;
       v++
     }
  :: v < NVCPU && !collect[v] -> v++
  :: else -> break
  od;
  v = 0;
#ifndef NO_WAIT
  do
  :: v < NVCPU && armed[i * NVCPU + v] ->
     atomic { printf("@@ wait %d %d\n", i, v); !armed[i * NVCPU + v] -> printf("@@ waited %d %d\n", i, v); v++ }
  :: v < NVCPU && !armed[i * NVCPU + v] -> v++
  :: else -> break
  od;
#else
  printf("@@ nowait %d\n", i);
#endif
  atomic {
    v = 0;
    do
    :: v < NVCPU -> collect[v] = false; v++
    :: else -> break
    od;
    v = 0
  }
}

inline notify_end(i, h) {
  atomic { mmu_seq++; in_progress--; printf("@@ end %d %d %d\n", i, h, mmu_seq) }
}

/* One host change of the page at hva A or B, in its own thread:
 * HostMm::migrate or HostMm::discard. */
proctype invalidator(byte i) {
  byte h, old, new, v, k;
  bool collect[NVCPU];
#ifdef NAME_FIRST
  byte named[NVCPU];   /* the caches' bound vCPUs, read before the marking */
#endif
  bool moved;

#ifdef HOST_AFTER_SLOT_CHANGE
  (gen >= 2);
#endif
  /* hva B matters only once a memslot change can move the page there */
  if
  :: atomic { true -> h = A }
#if NSLOT > 0
  :: atomic { true -> h = B }
#endif
  fi;
  if
  :: atomic {   /* migrate: allocate the new frame, mark the page busy */
       if
       :: backing[h] == NONE || busy[h] -> printf("@@ migrate_refused %d %d\n", i, h); goto done
       :: else -> old = backing[h]; new = next_frame; next_frame++; busy[h] = true;
                  printf("@@ migrate %d %d %d %d\n", i, h, old, new)
       fi
     }
     notify_start(i, h);
     atomic {   /* copy, remap: the old frame no longer backs the hva */
       busy[h] = false;
       if
       :: backing[h] == old -> backing[h] = new; moved = true; printf("@@ remap %d %d %d %d\n", i, h, old, new)
       :: else -> moved = false; printf("@@ remap_gone %d %d\n", i, h)
       fi
     }
     notify_end(i, h);
     atomic {
       if
       :: moved -> freed[old] = true; printf("@@ free %d %d\n", i, old)
       :: else -> freed[new] = true; printf("@@ free %d %d\n", i, new)
       fi
     }
  :: atomic { true -> printf("@@ discard %d %d\n", i, h) }
     notify_start(i, h);
     atomic { old = backing[h]; backing[h] = NONE; printf("@@ unmap %d %d %d\n", i, h, old) }
     notify_end(i, h);
     atomic {
       if
       :: old != NONE -> freed[old] = true; printf("@@ free %d %d\n", i, old)
       :: else
       fi
     }
  fi;
done:
  hosts_done++
}

/* ---------------------------------------------------------------------- */
/* VMM: memslot changes (Vm::set_memory_region). A delete or move publishes */
/* the old slot invalid first, then the final set; both bump the generation. */

proctype vmm() {
  byte n, was;
  do
  :: n < NSLOT ->
     if
     :: slot_hva != NONE ->
        atomic { was = slot_hva; slot_hva = NONE; gen++; printf("@@ slot_invalid %d %d\n", was, gen) }
        if
        :: atomic { slot_hva = 1 - was; gen++; printf("@@ slot_move %d %d\n", slot_hva, gen) }
        :: atomic { gen++; printf("@@ slot_delete %d\n", gen) }
        fi
     :: else ->
        if
        :: atomic { slot_hva = A; gen++; printf("@@ slot_create %d %d\n", A, gen) }
        :: atomic { slot_hva = B; gen++; printf("@@ slot_create %d %d\n", B, gen) }
        fi
     fi;
     n++
  :: else -> break
  od
}

init {
  byte i;
  atomic {
    backing[A] = 0;
    backing[B] = 1;
    i = 0;
    do
    :: i < NVCPU ->
       mode[i] = OUTSIDE; c_hva[i] = NONE; c_idx[i] = NONE; c_frame[i] = NONE;
       cur[i] = i; owner[i] = i;
       v02_frame[i] = NONE; v02_hva[i] = NONE;
       i++
    :: else -> break
    od;
    i = 0;
    do
    :: i < NVCPU -> run vcpu(i); i++
    :: else -> break
    od;
    i = 0;
    do
    :: i < NINV -> run invalidator(i); i++
    :: else -> break
    od;
    run vmm()
  }
}

/* Progress under weak fairness (pan -a -f): vCPU 0 runs L2 again and again
 * (so none of its entries is cancelled forever and each of its refreshes
 * ends), and every host change returns from the notifier. The vCPUs run the
 * same code on the same page, so what holds for vCPU 0 holds for vCPU 1.
 * With REBIND, L2 runs again and again on vCPU 0 or, once it took the
 * cache over, on vCPU 1. */
#ifdef REBIND
ltl progress { ([] <> (in_l2[0] || in_l2[1])) && (<> (hosts_done == NINV)) }
#else
ltl progress { ([] <> in_l2[0]) && (<> (hosts_done == NINV)) }
#endif
