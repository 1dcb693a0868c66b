// The CPU kernels' stream (see twotower_rt/cpu_stream.h): a FIFO of calls under a mutex, one
// worker that takes them in order, counters that say how far it got.
#include "twotower_rt/cpu_stream.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TWOTOWER_RT_PAUSE() _mm_pause()
#else
#define TWOTOWER_RT_PAUSE() ((void)0)
#endif

namespace twotower_rt {
namespace cpu {
namespace {

class Stream;

// What one calling thread's scope holds: its depth, its first error and the stream it queues on
// (looked up once, at its outermost stream_begin). The worker writes the error through a pointer
// to it, which lives as long as the thread.
struct Scope {
  int depth = 0;
  std::atomic<const char*> error{nullptr};
  Stream* stream = nullptr;
};

thread_local Scope scope;
thread_local bool on_worker = false;  // the calling thread is the stream's worker
std::atomic<bool> started{false};  // a worker exists (in this process or its parent)
std::atomic<bool> sharing{false};  // calls outside a scope may be shared (stream_set_sharing)

// The kernel call that may be shared (stream_run_shared): one at a time (`busy`); its fields are
// written before `open` is set (release) and read after it is seen (acquire); `helpers` counts the
// threads inside it, and its owner leaves only when none is (Dekker-style, seq_cst on both).
struct SharedCall {
  std::atomic<bool> busy{false};
  void (*task)(void*, int64_t) = nullptr;
  void* context = nullptr;
  int64_t count = 0;
  alignas(64) std::atomic<int64_t> next{0};
  alignas(64) std::atomic<bool> open{false};
  std::atomic<int> helpers{0};
  std::atomic<bool> failed{false};
};

SharedCall shared;

// Takes tasks of the shared call until none is left.
void take_tasks() {
  for (;;) {
    const int64_t i = shared.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= shared.count) return;
    try {
      shared.task(shared.context, i);
    } catch (...) {
      shared.failed.store(true, std::memory_order_relaxed);
    }
  }
}

// A waiting thread's turn: joins the open call, if any, and takes tasks from it.
void help() {
  if (!shared.open.load(std::memory_order_acquire)) return;
  shared.helpers.fetch_add(1);
  if (shared.open.load()) take_tasks();
  shared.helpers.fetch_sub(1);
}

struct Item {
  StreamTask task;
  std::atomic<const char*>* error;  // the owner's
};

class Stream {
 public:
  explicit Stream(pid_t pid) : pid_(pid) { worker_ = std::thread([this] { Loop(); }); }

  pid_t pid() const { return pid_; }

  void Push(StreamTask task, std::atomic<const char*>* error) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(Item{std::move(task), error});
    }
    pushed_.fetch_add(1, std::memory_order_release);
    if (sleeping_.load(std::memory_order_acquire)) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_one();
    }
  }

  // Wakes a sleeping worker to help with a shared call (stream_run_shared).
  void Nudge() {
    if (!sleeping_.load(std::memory_order_acquire)) return;
    std::lock_guard<std::mutex> lock(mutex_);
    wake_.notify_one();
  }

  // Calls pushed and not yet done.
  uint64_t Pending() const {
    return pushed_.load(std::memory_order_acquire) - done_.load(std::memory_order_acquire);
  }

  // Waits until every call pushed before this one has run, helping with the worker's current
  // kernel call meanwhile (help); spins, then yields the core.
  void Wait() {
    const uint64_t target = pushed_.load(std::memory_order_acquire);
    for (int spin = 0; done_.load(std::memory_order_acquire) < target; ++spin) {
      help();
      if (spin < (1 << 16)) {
        TWOTOWER_RT_PAUSE();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  void Loop() {
    on_worker = true;
    for (;;) {
      Item item;
      if (!Take(item)) continue;
      if (item.error->load(std::memory_order_acquire) == nullptr) {  // skip after an error
        const char* error = nullptr;
        try {
          error = item.task();
        } catch (const std::exception&) {
          error = "a queued CPU kernel threw (out of memory?)";
        }
        if (error != nullptr) item.error->store(error, std::memory_order_release);
      }
      item.task = nullptr;  // free what it captured before saying it is done
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  // The next call: after spinning for up to kSpin (as the pool's workers, cpu_pool.cpp: the
  // Python between two forwards of a step is often more than a few hundred microseconds, and
  // a sleeping worker helps nobody), sleeps until one is pushed or a call is shared.
  bool Take(Item& item) {
    constexpr auto kSpin = std::chrono::microseconds(2000);
    const auto until = std::chrono::steady_clock::now() + kSpin;
    int spin = 0;
    while (pushed_.load(std::memory_order_acquire) == taken_) {
      help();  // idle: a kernel call of a thread outside its scope may be shared
      TWOTOWER_RT_PAUSE();
      if (++spin % 64 == 0 && std::chrono::steady_clock::now() > until) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleeping_.store(true, std::memory_order_release);
        wake_.wait(lock, [this] { return !queue_.empty() || shared.open.load(); });
        sleeping_.store(false, std::memory_order_release);
        break;
      }
    }
    std::lock_guard<std::mutex> lock(mutex_);
    if (queue_.empty()) return false;
    item = std::move(queue_.front());
    queue_.pop_front();
    ++taken_;
    return true;
  }

  const pid_t pid_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Item> queue_;
  std::atomic<uint64_t> pushed_{0}, done_{0};
  uint64_t taken_ = 0;  // the worker's own count
  std::atomic<bool> sleeping_{false};
  std::thread worker_;
};

std::mutex stream_mutex;
Stream* stream_ptr = nullptr;  // never destroyed: the worker may still sleep at exit

// The process's stream, started on first use; a child process after fork() starts its own (the
// parent's worker thread does not exist there).
Stream& the_stream() {
  std::lock_guard<std::mutex> lock(stream_mutex);
  const pid_t pid = getpid();
  if (stream_ptr == nullptr || stream_ptr->pid() != pid) {
    stream_ptr = new Stream(pid);
    started.store(true);
  }
  return *stream_ptr;
}

}  // namespace

void stream_set_sharing(bool on) { sharing.store(on, std::memory_order_relaxed); }

bool stream_run_shared(int64_t count, void (*task)(void*, int64_t), void* context) {
  const bool allowed = scope.depth > 0 || on_worker || sharing.load(std::memory_order_relaxed);
  if (!allowed || !started.load(std::memory_order_relaxed) || shared.busy.exchange(true)) {
    for (int64_t i = 0; i < count; ++i) task(context, i);  // no stream, or the slot is taken
    return true;
  }
  shared.task = task;
  shared.context = context;
  shared.count = count;
  shared.failed.store(false, std::memory_order_relaxed);
  shared.next.store(0, std::memory_order_relaxed);
  shared.open.store(true, std::memory_order_release);
  the_stream().Nudge();
  take_tasks();
  shared.open.store(false);
  while (shared.helpers.load() != 0) TWOTOWER_RT_PAUSE();  // a helper's last task
  const bool ok = !shared.failed.load(std::memory_order_relaxed);
  shared.busy.store(false, std::memory_order_release);
  return ok;
}

bool stream_active() { return scope.depth > 0; }

void stream_begin() {
  if (scope.depth++ == 0) {
    scope.error.store(nullptr, std::memory_order_relaxed);
    scope.stream = &the_stream();
  }
}

void stream_push(StreamTask task) { scope.stream->Push(std::move(task), &scope.error); }

const char* stream_wait() {
  if (scope.depth == 0) return "stream_wait outside a stream scope";
  scope.stream->Wait();
  return scope.error.exchange(nullptr, std::memory_order_acq_rel);
}

bool stream_drain_if_behind(int64_t max_pending) {
  if (scope.depth == 0 || scope.stream->Pending() <= static_cast<uint64_t>(max_pending)) {
    return false;
  }
  scope.stream->Wait();
  return true;
}

const char* stream_end() {
  if (scope.depth == 0) return "stream_end without stream_begin";
  if (--scope.depth > 0) return nullptr;
  scope.stream->Wait();
  scope.stream = nullptr;
  return scope.error.exchange(nullptr, std::memory_order_acq_rel);
}

}  // namespace cpu
}  // namespace twotower_rt
