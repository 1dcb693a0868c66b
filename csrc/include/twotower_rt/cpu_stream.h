// The CPU kernels' stream: kernel calls queued on one worker thread and run there in order, so
// that the Python between the kernels of one forward runs on one core while the kernels run on
// another (a CUDA stream's contract, on the CPU).
//
// A Python thread opens a scope (stream_begin), in which every kernel call of that thread is
// queued instead of run (bindings_cpu.cpp: Run), and closes it (stream_end), which waits until
// every call queued so far has run. Inside the scope the caller must read no kernel's output
// and must keep every buffer a queued call reads or writes alive (python/twotower_rt/_ext.py:
// cpu_stream does both). A queued call is the same code on the same inputs as a direct one, so
// the numbers do not change; its thread-local scratch is the worker's.
//
// Waiting: the worker spins for a while after each call (the Python between two kernels is tens
// of microseconds; waking a sleeping thread costs about as much), then sleeps. A thread waiting
// for the stream (stream_wait, stream_end) helps: it takes tasks of the kernel call the worker
// is running (stream_run_shared), so that a forward whose kernels take longer than its Python
// still uses both cores, and the idle worker helps with the kernel calls made outside a scope.
// Any split of a call's tasks gives the same bits (cpu_pool.h).
#pragma once

#include <cstdint>
#include <functional>

namespace twotower_rt {
namespace cpu {

// A queued kernel call: returns nullptr, or the kernel's error message (a static string).
using StreamTask = std::function<const char*()>;

// Whether the calling thread is inside a scope (its kernel calls are queued).
bool stream_active();

// Opens a scope on the calling thread (scopes nest; the outermost one counts).
void stream_begin();

// Queues a call (inside a scope). The first error of the calling thread's calls since its
// outermost stream_begin is kept for its stream_end; after an error that thread's later calls
// are skipped (their inputs may be incomplete).
void stream_push(StreamTask task);

// Inside a scope: waits until every call queued so far has run (the scope stays open), so that
// the caller may read their outputs. Returns and clears the calling thread's first error.
const char* stream_wait();

// Inside a scope: when more than max_pending calls are queued and not yet run, waits (helping)
// until none is, and returns true (the caller may then drop what it held for them); else returns
// false at once. It bounds how far the caller runs ahead of a worker that is behind (a forward
// whose kernels take longer than its Python), and with it the memory the queued calls hold.
bool stream_drain_if_behind(int64_t max_pending);

// Closes a scope; the outermost one waits until every call queued so far (by any thread) has
// run. Returns the calling thread's first error since its stream_begin, or nullptr.
const char* stream_end();

// Runs task(context, i) for i in [0, count), shared with whichever thread comes to help: a
// thread waiting for the stream, or the stream's worker while it has nothing queued (cpu_pool.cpp
// calls it where it would run the tasks alone, i.e. with one kernel thread). Shared only for a
// call on the worker, in a scope, or anywhere while sharing is on (stream_set_sharing: the
// stream's setting, so that with the stream off a started worker takes no part); one call at a
// time; any other runs alone. Returns false when a task threw (as pool_run).
bool stream_run_shared(int64_t count, void (*task)(void*, int64_t), void* context);

// Whether kernel calls made outside a scope may be shared with the worker (the stream's setting:
// python/twotower_rt/_ext.py set_stream_enabled).
void stream_set_sharing(bool on);

}  // namespace cpu
}  // namespace twotower_rt
