// The CPU kernels' threads: a fixed set of workers that, with the calling thread, run the
// independent tasks of one kernel call (the 64-output column blocks of a projection, the experts
// of an MoE layer).
//
// Numbers: a task computes its outputs exactly as one thread would (the same chains in the same
// order), so results do not depend on the thread count or on which thread ran which task.
//
// Waiting: between two calls a worker spins for a short while (the Python between the kernels of
// one forward is tens of microseconds; waking a sleeping thread costs about as much), then sleeps.
// With one thread (the default) nothing is started and every task runs on the caller.
#pragma once

#include <cstdint>

namespace twotower_rt {
namespace cpu {

// Threads the kernels use, the caller included (>= 1).
int pool_threads();

// Sets it: 1 stops the workers. Not while a kernel runs (the bindings hold the GIL here).
void set_pool_threads(int threads);

// Runs task(context, i) for every i in [0, count), each exactly once, over the workers and the
// calling thread, and returns when all are done. It runs them in order on the caller alone with
// one thread, for a single task, while another thread's call holds the workers, or when `work`
// (the call's size in multiply-adds) is below kPoolMinWork: handing a call over costs a few
// microseconds, more than it saves there. A task must not call pool_run itself.
//
// Returns false when a task threw on the workers' path (its outputs are then incomplete; the
// others ran); on the caller-alone path an exception propagates as from a plain loop.
[[nodiscard]] bool pool_run(int64_t count, int64_t work, void (*task)(void*, int64_t),
                            void* context);

// The kernels' message for a false pool_run.
constexpr const char* kPoolFailed = "a task on the kernel threads failed (out of memory?)";

// How a projection's rows x out outputs become tasks (linear_cpu.cpp, linear_dot_cpu.cpp): whole
// register tiles, the outputs in blocks of the widest tile (128 for one to three rows, else 64),
// and where that leaves few blocks, the rows in two halves at a multiple of 4 as well. Task i
// computes block i % blocks of rows [0, half) (i < blocks) or [half, rows). Every output is the
// same chain whoever computes it, so any split gives the one-thread bits.
struct ProjectionSplit {
  int64_t width, blocks, half;  // half: the first row of the second half (rows: no split)
  int64_t tasks(int64_t rows) const { return blocks * (half < rows ? 2 : 1); }
};

inline ProjectionSplit projection_split(int64_t rows, int64_t out) {
  constexpr int64_t kTileRows = 4;
  ProjectionSplit s;
  s.width = rows < kTileRows ? 128 : 64;
  s.blocks = (out + s.width - 1) / s.width;
  s.half = rows >= 2 * kTileRows && s.blocks < 6
               ? (rows / 2 + kTileRows - 1) / kTileRows * kTileRows
               : rows;
  return s;
}

// A task that runs a kernel's arithmetic should be a TWOTOWER_RT_CLONES function (a lambda is
// compiled for the baseline instruction set only); a pointer to a clone resolves like a call.
constexpr int64_t kPoolMinWork = 96 * 1024;

}  // namespace cpu
}  // namespace twotower_rt
