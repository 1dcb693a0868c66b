// The kernels' worker threads (see twotower_rt/cpu_pool.h).
#include "twotower_rt/cpu_pool.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "twotower_rt/cpu_stream.h"

namespace twotower_rt {
namespace cpu {
namespace {

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// How long an idle worker spins before it sleeps.
constexpr std::chrono::microseconds kSpin{2000};

class Pool {
 public:
  int threads() {
    std::lock_guard<std::mutex> hold(run_mutex_);
    adopt();
    return 1 + static_cast<int>(workers_.size());
  }

  void resize(int threads) {
    std::lock_guard<std::mutex> hold(run_mutex_);
    adopt();
    threads = threads < 1 ? 1 : threads;
    if (threads == 1 + static_cast<int>(workers_.size())) return;
    stop_workers();
    start_workers(threads);
  }

  bool run(int64_t count, void (*task)(void*, int64_t), void* context) {
    std::unique_lock<std::mutex> hold(run_mutex_, std::try_to_lock);
    if (hold.owns_lock()) adopt();
    if (!hold.owns_lock()) {  // busy: another thread's call holds the workers
      for (int64_t i = 0; i < count; ++i) task(context, i);
      return true;
    }
    if (workers_.empty()) {  // one thread: on the stream's worker, with a waiting thread's help
      hold.unlock();
      return stream_run_shared(count, task, context);
    }
    task_ = task;
    context_ = context;
    count_ = count;
    failed_.store(false, std::memory_order_relaxed);
    next_.store(0, std::memory_order_relaxed);
    ++generation_;
    for (auto& slot : slots_) slot.ticket.store(generation_ * 4 + kPosted);  // seq_cst: loop()
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    work();
    // Every task is taken. A worker that has not joined yet (asleep, or not scheduled: the
    // machine busy with other work) is told not to, rather than waited for; one that has joined
    // is waited for, until its last task is done.
    for (auto& slot : slots_) {
      uint64_t posted = generation_ * 4 + kPosted;
      if (slot.ticket.compare_exchange_strong(posted, generation_ * 4 + kCancelled)) continue;
      while (slot.finished.load(std::memory_order_acquire) != generation_) relax();
    }
    return !failed_.load(std::memory_order_relaxed);
  }

 private:
  // A slot's ticket: generation * 4 + what became of the worker's invitation to it.
  static constexpr uint64_t kPosted = 0, kJoined = 1, kCancelled = 2;
  struct alignas(64) Slot {
    std::atomic<uint64_t> ticket{0};    // the generation this worker is asked to join, and how
    std::atomic<uint64_t> finished{0};  // the last generation it has left after joining
  };

  // Takes tasks until none are left. A task that throws (a scratch buffer that cannot grow) must
  // not unwind out of a worker (that ends the process) nor out of the caller while the workers
  // still use its stack: it is noted, its outputs are left unwritten, and run() says so.
  void work() {
    for (;;) {
      const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= count_) return;
      try {
        task_(context_, i);
      } catch (...) {
        failed_.store(true, std::memory_order_relaxed);
      }
    }
  }

  // seen: the last generation this worker was asked to join.
  void loop(Slot* slot, uint64_t seen) {
    running_.fetch_add(1);
    for (;;) {
      uint64_t ticket = slot->ticket.load(std::memory_order_acquire);
      auto start = std::chrono::steady_clock::now();
      for (int spins = 1; ticket / 4 == seen && !stop_.load(std::memory_order_relaxed); ++spins) {
        relax();
        ticket = slot->ticket.load(std::memory_order_acquire);
        if (spins % 256 != 0 || std::chrono::steady_clock::now() - start < kSpin) continue;
        // Sleep. sleepers_ goes up before the ticket is read again, and run() stores the ticket
        // before it reads sleepers_ (both seq_cst): one of the two sees the other.
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return slot->ticket.load() / 4 != seen || stop_.load(); });
        sleepers_.fetch_sub(1);
        ticket = slot->ticket.load(std::memory_order_acquire);
        start = std::chrono::steady_clock::now();
      }
      if (stop_.load()) return;
      seen = ticket / 4;
      // Join, unless run() has already done every task and cancelled this invitation.
      if (ticket % 4 == kPosted && slot->ticket.compare_exchange_strong(ticket, ticket + kJoined)) {
        work();
        slot->finished.store(seen, std::memory_order_release);
      }
    }
  }

  void start_workers(int threads) {
    owner_ = getpid();
    slots_ = std::vector<Slot>(threads - 1);
    for (auto& slot : slots_) {
      slot.ticket.store(generation_ * 4 + kCancelled);
      slot.finished.store(generation_);
    }
    running_.store(0);
    for (int i = 0; i + 1 < threads; ++i) {
      workers_.emplace_back([this, i, g = generation_] { loop(&slots_[i], g); });
    }
    // Back only once every worker runs (spinning): the first call then finds them ready.
    while (running_.load() < threads - 1) std::this_thread::yield();
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      stop_.store(true);
      wake_.notify_all();
    }
    for (auto& w : workers_) w.join();
    workers_.clear();
    stop_.store(false);
  }

  // In a child made by fork() the workers are gone (only the forking thread is copied): forget
  // their handles without joining them, and start the same number afresh.
  void adopt() {
    if (workers_.empty() || owner_ == getpid()) return;
    const int threads = 1 + static_cast<int>(workers_.size());
    new std::vector<std::thread>(std::move(workers_));  // leaked: never joined, never destroyed
    workers_.clear();
    new std::vector<Slot>(std::move(slots_));  // their slots, in case one was still referenced
    new (&sleep_mutex_) std::mutex;
    new (&wake_) std::condition_variable;
    sleepers_.store(0);
    start_workers(threads);
  }

  std::mutex run_mutex_;  // one call (or resize) at a time owns the workers
  std::vector<std::thread> workers_;
  std::vector<Slot> slots_;
  pid_t owner_ = 0;
  uint64_t generation_ = 0;
  void (*task_)(void*, int64_t) = nullptr;
  void* context_ = nullptr;
  int64_t count_ = 0;
  alignas(64) std::atomic<int64_t> next_{0};
  std::atomic<bool> failed_{false};
  alignas(64) std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> running_{0};  // workers that have entered loop()
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
};

// Never destroyed: at exit the workers may still be spinning, and joining them from a static
// destructor would race the interpreter's own shutdown.
Pool& pool() {
  static Pool* p = new Pool;
  return *p;
}

}  // namespace

int pool_threads() { return pool().threads(); }

void set_pool_threads(int threads) { pool().resize(threads); }

bool pool_run(int64_t count, int64_t work, void (*task)(void*, int64_t), void* context) {
  if (count <= 0) return true;
  if (count == 1 || work < kPoolMinWork) {
    for (int64_t i = 0; i < count; ++i) task(context, i);
    return true;
  }
  return pool().run(count, task, context);
}

}  // namespace cpu
}  // namespace twotower_rt
