// PageIndex (see page_index.h).
#include "vm/page_index.h"

#include "base/check.h"

namespace nestcache::vm {

namespace {
constexpr size_t kInitialSize = 64;  // a power of two
}

PageIndex::PageIndex() : table_(kInitialSize), mask_(kInitialSize - 1), shift_(64 - 6) { publish(); }

void PageIndex::publish() {
  published_table_.store(table_.data(), std::memory_order_relaxed);
  published_shift_.store(shift_, std::memory_order_relaxed);
}

void PageIndex::place(Hva page, const void* value) {
  size_t i = home(page);
  while (table_[i].page != 0) i = (i + 1) & mask_;
  table_[i] = {page, value};
}

void PageIndex::grow() {
  decltype(table_) old = std::move(table_);
  table_.assign(old.size() * 2, Entry{});
  mask_ = table_.size() - 1;
  shift_--;
  for (const Entry& e : old)
    if (e.page != 0) place(e.page, e.value);
  publish();
}

void PageIndex::insert(Hva page, const void* value) {
  NC_CHECK(page != 0 && page_aligned(page));
  if (2 * (size_ + 1) > table_.size()) grow();
  place(page, value);
  size_++;
}

bool PageIndex::erase(Hva page, const void* value) {
  size_t i = home(page);
  for (;; i = (i + 1) & mask_) {
    if (table_[i].page == 0) return false;
    if (table_[i].page == page && table_[i].value == value) break;
  }
  // Backward-shift deletion: pull later entries of the run into the hole
  // when their home position allows it, so no lookup meets a gap before the
  // entry it looks for.
  size_t hole = i;
  for (size_t j = (hole + 1) & mask_; table_[j].page != 0; j = (j + 1) & mask_) {
    const size_t h = home(table_[j].page);
    // Entry j may move to the hole if its home is not in (hole, j] (cyclically).
    const bool home_between = hole <= j ? (h > hole && h <= j) : (h > hole || h <= j);
    if (!home_between) {
      table_[hole] = table_[j];
      hole = j;
    }
  }
  table_[hole] = Entry{};
  size_--;
  return true;
}

}  // namespace nestcache::vm
