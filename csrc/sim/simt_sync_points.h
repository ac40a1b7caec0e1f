// The SIMT emulator's sync points: __syncthreads and its counting variants, the warp
// intrinsics (shuffles, votes, match) and thread exit, as members of the Scheduler. They decide
// when waiting threads are released and report misuse (divergent barriers, bad masks, and
// which thread waits for what when a block deadlocks).
// Included at the end of simt_scheduler.h, which declares the class; never on its own.
#pragma once

#include <cstdint>
#include <string>

#include "simt_scheduler.h"

namespace simt {

// ------------------------------------------------------------------------------------------------
// What waiting threads wait for (deadlock reports)

inline std::string Scheduler::waiting_description(const ThreadSlot& slot) const {
  if (slot.state == ThreadState::kAtBarrier) {
    return format("waits at %s at %s", barrier_op_name(barrier_op_), describe(slot.site()).c_str());
  }
  return format("waits in %s(mask=0x%08x) at %s", warp_op_name(slot.warp_op), slot.mask,
                describe(slot.site()).c_str());
}

inline std::string Scheduler::missing_lane_description(const ThreadSlot& slot) const {
  const unsigned warp = slot.linear / 32;
  const unsigned missing = slot.mask & ~warps_[warp].exited & ~warps_[warp].arrived;
  if (missing == 0) return "";
  const unsigned lane = static_cast<unsigned>(__builtin_ctz(missing));
  return format("; lane %u of its mask %s", lane,
                waiting_description(slots_[warp * 32 + lane]).c_str());
}

// One line per run of consecutive threads that wait at the same place.
inline std::string Scheduler::deadlock_report() const {
  std::string report = format("simt: deadlock in %s: no thread can make progress (%u of %u exited)",
                              where().c_str(), exited_count_, thread_count_);
  constexpr int kMaxLines = 12;
  int lines = 0;
  for (unsigned t = 0; t < thread_count_ && lines < kMaxLines; ++t) {
    const ThreadSlot& slot = slots_[t];
    if (slot.state == ThreadState::kExited) continue;
    const std::string waiting = waiting_description(slot) + missing_lane_description(slot);
    unsigned last = t;
    while (last + 1 < thread_count_ && slots_[last + 1].state == slot.state &&
           waiting_description(slots_[last + 1]) + missing_lane_description(slots_[last + 1]) ==
               waiting) {
      ++last;
    }
    report += "\n  " + thread_name(t);
    if (last != t) report += " .. " + thread_name(last);
    report += " " + waiting;
    t = last;
    ++lines;
  }
  return report;
}

// ------------------------------------------------------------------------------------------------
// Barriers

inline int Scheduler::barrier(BarrierOp op, int predicate, Site site) {
  if (exited_count_ > 0) {
    fail([&] {
      return format("divergent barrier: %s at %s can never complete because %s already exited",
                    barrier_op_name(op), describe(site).c_str(),
                    thread_name(first_exited_).c_str());
    });
  }
  if (barrier_arrivals_ > 0 && (barrier_op_ != op || !same_site(barrier_site_, site))) {
    fail([&] {
      return format("divergent barrier: this thread reached %s at %s while %s waits at %s at %s",
                    barrier_op_name(op), describe(site).c_str(),
                    thread_name(barrier_first_).c_str(), barrier_op_name(barrier_op_),
                    describe(barrier_site_).c_str());
    });
  }
  if (barrier_arrivals_ == 0) {
    barrier_op_ = op;
    barrier_site_ = site;
    barrier_first_ = current_;
    barrier_true_count_ = 0;
  }
  barrier_true_count_ += predicate != 0 ? 1 : 0;
  slots_[current_].wait_at(site, ThreadState::kAtBarrier);
  if (++barrier_arrivals_ == thread_count_) {
    switch (op) {
      case BarrierOp::kPlain: barrier_result_ = 0; break;
      case BarrierOp::kCount: barrier_result_ = static_cast<int>(barrier_true_count_); break;
      case BarrierOp::kAnd: barrier_result_ = barrier_true_count_ == thread_count_; break;
      case BarrierOp::kOr: barrier_result_ = barrier_true_count_ != 0; break;
    }
    barrier_arrivals_ = 0;
    release(all_threads_.data(), thread_count_);
  }
  wait_for_release();
  // No thread can reach the next barrier before every released thread has run, so the result
  // is still this barrier's.
  return barrier_result_;
}

// ------------------------------------------------------------------------------------------------
// Warp intrinsics

inline std::uint64_t Scheduler::warp_exchange(WarpOp op, unsigned mask, std::uint64_t value,
                                              unsigned bytes, int arg, int width, Site site) {
  const unsigned warp = current_ / 32;
  const unsigned lane = current_ % 32;
  if ((mask >> lane & 1u) == 0) {
    fail([&] {
      return format("%s at %s called with mask 0x%08x, which does not include the calling lane %u",
                    warp_op_name(op), describe(site).c_str(), mask, lane);
    });
  }
  if (is_shuffle(op) && (width < 1 || width > 32 || (width & (width - 1)) != 0)) {
    fail([&] {
      return format("%s at %s called with width %d; it must be a power of two from 1 to 32",
                    warp_op_name(op), describe(site).c_str(), width);
    });
  }
  ThreadSlot& self = slots_[current_];
  self.wait_at(site, ThreadState::kAtWarpOp);
  self.warp_op = op;
  self.mask = mask;
  self.value = value;
  self.value_bytes = static_cast<std::uint8_t>(bytes);
  self.arg = arg;
  self.width = static_cast<std::uint8_t>(width);
  warps_[warp].arrived |= 1u << lane;
  try_complete_exchange(warp, mask);
  wait_for_release();
  return self.result;
}

// An exchange completes once every lane of the mask that has not exited has arrived. Lanes that
// exited take no part (CUDA: "all non-exited threads named in mask must execute the same
// intrinsic"); reading a value from one yields poison.
inline void Scheduler::try_complete_exchange(unsigned warp, unsigned mask) {
  const unsigned participants = mask & ~warps_[warp].exited;
  if (participants == 0 || (warps_[warp].arrived & participants) != participants) return;
  const ThreadSlot& leader = slot_of(warp, static_cast<unsigned>(__builtin_ctz(participants)));
  for (unsigned lane = 0; lane < 32; ++lane) {
    if ((participants >> lane & 1u) == 0) continue;
    const ThreadSlot& other = slot_of(warp, lane);
    if (other.warp_op != leader.warp_op || other.mask != leader.mask ||
        other.value_bytes != leader.value_bytes) {
      fail([&] {
        return format(
            "warp lanes disagree: %s calls %s(mask=0x%08x, %u-byte value) at %s but %s calls "
            "%s(mask=0x%08x, %u-byte value) at %s",
            thread_name(leader.linear).c_str(), warp_op_name(leader.warp_op), leader.mask,
            unsigned{leader.value_bytes}, describe(leader.site()).c_str(),
            thread_name(other.linear).c_str(), warp_op_name(other.warp_op), other.mask,
            unsigned{other.value_bytes}, describe(other.site()).c_str());
      });
    }
  }
  complete_exchange(warp, participants);
}

inline void Scheduler::complete_exchange(unsigned warp, unsigned participants) {
  const WarpOp op = slot_of(warp, static_cast<unsigned>(__builtin_ctz(participants))).warp_op;
  // Each loop visits the participating lanes in ascending order (lowest set bit first).
  unsigned votes = 0;
  for (unsigned rest = participants; rest != 0; rest &= rest - 1) {
    const unsigned lane = static_cast<unsigned>(__builtin_ctz(rest));
    if (slot_of(warp, lane).value != 0) votes |= 1u << lane;
  }
  unsigned released[32];
  unsigned released_count = 0;
  for (unsigned rest = participants; rest != 0; rest &= rest - 1) {
    const unsigned lane = static_cast<unsigned>(__builtin_ctz(rest));
    ThreadSlot& slot = slot_of(warp, lane);
    if (is_shuffle(op)) {
      const unsigned source = shuffle_source_lane(op, lane, slot.arg, slot.width);
      const bool defined = (participants >> source & 1u) != 0;
      slot.result = defined ? slot_of(warp, source).value : ~std::uint64_t{0};
    } else if (op == WarpOp::kBallot) {
      slot.result = votes;
    } else if (op == WarpOp::kAny) {
      slot.result = votes != 0;
    } else if (op == WarpOp::kAll) {
      slot.result = votes == participants;
    } else {
      slot.result = 0;
    }
    released[released_count++] = warp * 32 + lane;
  }
  warps_[warp].arrived &= ~participants;
  release(released, released_count);
}

[[noreturn]] inline void Scheduler::exit_current_thread() {
  ThreadSlot& self = slots_[current_];
  const unsigned warp = current_ / 32;
  if (exited_count_++ == 0) first_exited_ = current_;
  self.state = ThreadState::kExited;
  warps_[warp].exited |= 1u << (current_ % 32);
  if (barrier_arrivals_ > 0) {
    fail([&] {
      return format("divergent barrier: this thread exited while %s waits at %s at %s",
                    thread_name(barrier_first_).c_str(), barrier_op_name(barrier_op_),
                    describe(barrier_site_).c_str());
    });
  }
  // Exchanges of this warp that were only waiting for this lane can now complete.
  for (unsigned lane = 0; lane < 32; ++lane) {
    if ((warps_[warp].arrived >> lane & 1u) != 0) {
      try_complete_exchange(warp, slot_of(warp, lane).mask);
    }
  }
  finish_current_thread();
}

}  // namespace simt
