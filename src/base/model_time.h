// Modelled time (DESIGN.md §5 "Time: what a result measures").
//
// A simulated CPU runs guest code far slower than silicon and hands the CPU
// between threads through the scheduler, so wall-clock time measures the
// simulator. Every thread that takes part in a benchmark (each vCPU thread,
// and any host thread that joins) instead keeps a ModelClock, in nanoseconds,
// split into the parts a result is explained by:
//
//   transitions    hardware VM exits and entries: a fixed cost each
//   guest_ops      guest instructions: a fixed, hardware-like cost each
//   remap_windows  L0 time inside HostMap map/unmap (measured, except the
//                  mmap and munmap of a window: a calibrated fixed cost)
//   pfn_cache      L0 time inside pfn-cache checks, refreshes, invalidation
//                  (measured)
//   other_l0       every other piece of L0 or host work (measured)
//   idle           a halted vCPU moved on to its APIC timer, a TPAUSE's delay:
//                  time that passes with nothing to do
//
// Measured parts are the thread's CPU time (CLOCK_THREAD_CPUTIME_ID), so
// being preempted by another process costs nothing, and a blocked thread
// accrues nothing; the cost of reading that clock is calibrated once and
// taken off every interval. Waiting adds nothing by itself: a thread that
// waits for another takes the later of the two clocks (merge()), which the
// waker hands over as a TimeStamp (with a written word, an interrupt, a
// kick). A TimeStamp carries all the parts, and merge() keeps the parts of
// the later clock, so a thread's parts always add up to its time and explain
// its critical path.
//
// A clock belongs to one thread (bind it with ModelClock::Binding): nothing
// here is thread-safe, and other threads see a clock only through the stamps
// its owner hands out under their own synchronisation.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>

namespace nestcache {

enum class TimePart : uint8_t { transitions, guest_ops, remap_windows, pfn_cache, other_l0, idle, kCount };
inline constexpr int kTimeParts = static_cast<int>(TimePart::kCount);

// "transitions", "guest_ops", "remap_windows", "pfn_cache", "other_l0", "idle".
std::string_view time_part_name(TimePart p);

// A point of modelled time with its parts.
struct TimeStamp {
  std::array<uint64_t, kTimeParts> ns{};

  uint64_t total() const;
  uint64_t operator[](TimePart p) const { return ns[static_cast<int>(p)]; }
  // Part by part; parts of `b` above those of `a` clamp to 0.
  friend TimeStamp operator-(const TimeStamp& a, const TimeStamp& b);
  // The time from `from` to `to` by part, adding up to to.total() −
  // from.total() (0 when `to` is not later): `to` − `from`, except that a
  // part can be lower in `to` when the clock took a later thread's stamp in
  // between (merge()); clamped to 0 alone it leaves the other parts counting
  // that difference again, so the parts that grew are scaled down together
  // to the interval. What a stopwatch's breakdown is.
  static TimeStamp interval(const TimeStamp& from, const TimeStamp& to);
  friend bool operator==(const TimeStamp&, const TimeStamp&) = default;
  // Whichever of `a` and `b` is later (a on a tie).
  static const TimeStamp& later(const TimeStamp& a, const TimeStamp& b) { return b.total() > a.total() ? b : a; }
};

// The calling thread's CPU time in nanoseconds.
uint64_t thread_cpu_ns();
// What one thread_cpu_ns() call adds to an interval it bounds (the median of
// back-to-back reads, measured on first use).
uint64_t thread_cpu_read_overhead_ns();

class ModelClock {
 public:
  ModelClock() = default;
  ModelClock(const ModelClock&) = delete;
  ModelClock& operator=(const ModelClock&) = delete;

  // The clock bound to the calling thread, or nullptr (the thread takes no
  // part in modelled time: its work and its hand-overs are not counted).
  static ModelClock* current();

  // Binds `clock` to the calling thread for the binding's lifetime.
  class Binding {
   public:
    explicit Binding(ModelClock& clock);
    ~Binding();
    Binding(const Binding&) = delete;
    Binding& operator=(const Binding&) = delete;

   private:
    ModelClock* previous_;
  };

  uint64_t now() const { return stamp_.total(); }
  const TimeStamp& stamp() const { return stamp_; }
  // This thread's own work by part: what it charged and measured, without
  // the time merges took over from other threads (the clock is the critical
  // path; this is the thread's share of the work).
  const TimeStamp& work() const { return work_; }

  // Adds a fixed cost to part `p` (transitions, guest operations).
  void charge(TimePart p, uint64_t ns) {
    stamp_.ns[static_cast<int>(p)] += ns;
    work_.ns[static_cast<int>(p)] += ns;
  }
  // A wait ended by another clock's event at `other`: this clock moves on to
  // the later of the two, parts and all.
  void merge(const TimeStamp& other) { stamp_ = TimeStamp::later(stamp_, other); }
  // Moves the clock on by `ns` of part `p` if it is behind `total`; used by a
  // timer that fires while the thread idles.
  void advance_to(uint64_t total, TimePart p);

  // Measured work: between begin_measured() and end_measured() the thread's
  // CPU time counts, to other_l0 unless a PartScope names another part.
  // Not nestable; a PartScope outside it measures nothing.
  void begin_measured();
  void end_measured();
  bool measuring() const { return measuring_; }

  // Charges the CPU time of its scope to `part` (when the calling thread's
  // clock is measuring); scopes nest, an inner scope's time is its own.
  class PartScope {
   public:
    explicit PartScope(TimePart part);
    ~PartScope();
    PartScope(const PartScope&) = delete;
    PartScope& operator=(const PartScope&) = delete;

   private:
    ModelClock* clock_;
    TimePart outer_ = TimePart::other_l0;
  };

  // Charges a fixed `ns` to the current part in place of the CPU time of its
  // scope (when the calling thread's clock is measuring): for host work
  // whose measured cost depends on what else the machine runs, such as a
  // munmap whose TLB shootdown waits for other CPUs only while they run
  // this process's threads. The cost is then calibrated once, under stated
  // conditions, and every occurrence is charged the same.
  class FixedCost {
   public:
    explicit FixedCost(uint64_t ns);
    ~FixedCost();
    FixedCost(const FixedCost&) = delete;
    FixedCost& operator=(const FixedCost&) = delete;

   private:
    ModelClock* clock_;
    uint64_t ns_;
  };

 private:
  // Charges the CPU time since the last read to the current part.
  void settle();

  TimeStamp stamp_;
  TimeStamp work_;
  bool measuring_ = false;
  TimePart part_ = TimePart::other_l0;
  uint64_t last_cpu_ns_ = 0;
};

}  // namespace nestcache
