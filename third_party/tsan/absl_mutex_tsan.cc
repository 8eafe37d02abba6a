// TSan builds only (--config=tsan, see .bazelrc and scripts/sanitize.sh): tells ThreadSanitizer
// what Debian's Abseil Mutex does.
//
// Debian's libabsl_synchronization is not built with -fsanitize=thread, so its Mutex (a futex
// word, not a pthread mutex) is invisible to TSan: every access our code makes under an
// absl::Mutex looks unsynchronized and TSan reports it as a race (it did, in SessionStore::Create
// and Scheduler::Submit). Suppressing those reports would also hide real races in our code. This
// file instead interposes the library's exported Mutex and CondVar entry points (the executable's
// definitions win over the shared library's), forwards to the real ones, and annotates each with
// the happens-before edge it implies: a lock acquires the mutex, an unlock releases it, a wait
// releases then reacquires it. While inside Abseil, accesses are ignored: Abseil evaluates other
// threads' Conditions while unlocking, which TSan could not otherwise order.
//
// Result: accesses under the same absl::Mutex are ordered; accesses without the mutex (a real
// race) are still reported.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

extern "C" {
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_ignore_thread_begin();
void __tsan_ignore_thread_end();
}

namespace {

template <typename F>
F Real(const char* symbol) {
  void* f = dlsym(RTLD_NEXT, symbol);
  if (f == nullptr) {
    std::fprintf(stderr, "absl_mutex_tsan: %s not found\n", symbol);
    std::abort();
  }
  return reinterpret_cast<F>(f);
}

struct Ignored {  // accesses inside Abseil are not ours to check
  Ignored() { __tsan_ignore_thread_begin(); }
  ~Ignored() { __tsan_ignore_thread_end(); }
};

using absl::Condition;
using absl::CondVar;
using absl::Duration;
using absl::Mutex;
using absl::Time;

}  // namespace

// Each shim has the member function's ABI: `this` first. The asm label gives it the mangled name.
#define LOCK_SHIM(ret, name, mangled, params, args, acquire_if)       \
  extern "C" ret name params __asm__(mangled);                         \
  extern "C" ret name params {                                         \
    static auto real = Real<ret(*) params>(mangled);                   \
    ret r;                                                             \
    {                                                                  \
      Ignored ignored;                                                 \
      r = real args;                                                   \
    }                                                                  \
    if (acquire_if) __tsan_acquire(mu);                                \
    return r;                                                          \
  }

#define VOID_LOCK_SHIM(name, mangled, params, args, before, after) \
  extern "C" void name params __asm__(mangled);                    \
  extern "C" void name params {                                    \
    static auto real = Real<void(*) params>(mangled);              \
    before;                                                        \
    {                                                              \
      Ignored ignored;                                             \
      real args;                                                   \
    }                                                              \
    after;                                                         \
  }

VOID_LOCK_SHIM(tsan_Lock, "_ZN4absl7debian35Mutex4LockEv", (Mutex * mu), (mu), (void)0, __tsan_acquire(mu))
VOID_LOCK_SHIM(tsan_ReaderLock, "_ZN4absl7debian35Mutex10ReaderLockEv", (Mutex * mu), (mu), (void)0,
               __tsan_acquire(mu))
VOID_LOCK_SHIM(tsan_Unlock, "_ZN4absl7debian35Mutex6UnlockEv", (Mutex * mu), (mu), __tsan_release(mu), (void)0)
VOID_LOCK_SHIM(tsan_ReaderUnlock, "_ZN4absl7debian35Mutex12ReaderUnlockEv", (Mutex * mu), (mu),
               __tsan_release(mu), (void)0)
VOID_LOCK_SHIM(tsan_LockWhen, "_ZN4absl7debian35Mutex8LockWhenERKNS0_9ConditionE",
               (Mutex * mu, const Condition& c), (mu, c), (void)0, __tsan_acquire(mu))
VOID_LOCK_SHIM(tsan_ReaderLockWhen, "_ZN4absl7debian35Mutex14ReaderLockWhenERKNS0_9ConditionE",
               (Mutex * mu, const Condition& c), (mu, c), (void)0, __tsan_acquire(mu))
VOID_LOCK_SHIM(tsan_Await, "_ZN4absl7debian35Mutex5AwaitERKNS0_9ConditionE",
               (Mutex * mu, const Condition& c), (mu, c), __tsan_release(mu), __tsan_acquire(mu))
VOID_LOCK_SHIM(tsan_Wait, "_ZN4absl7debian37CondVar4WaitEPNS0_5MutexE", (CondVar * cv, Mutex* mu),
               (cv, mu), __tsan_release(mu), __tsan_acquire(mu))

LOCK_SHIM(bool, tsan_TryLock, "_ZN4absl7debian35Mutex7TryLockEv", (Mutex * mu), (mu), r)
LOCK_SHIM(bool, tsan_ReaderTryLock, "_ZN4absl7debian35Mutex13ReaderTryLockEv", (Mutex * mu), (mu), r)
// The timed forms hold the mutex on return whatever they return.
LOCK_SHIM(bool, tsan_LockWhenWithTimeout,
          "_ZN4absl7debian35Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE",
          (Mutex * mu, const Condition& c, Duration d), (mu, c, d), true)
LOCK_SHIM(bool, tsan_LockWhenWithDeadline,
          "_ZN4absl7debian35Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE",
          (Mutex * mu, const Condition& c, Time t), (mu, c, t), true)

#define WAIT_SHIM(name, mangled, params, args, mutex)              \
  extern "C" bool name params __asm__(mangled);                    \
  extern "C" bool name params {                                    \
    static auto real = Real<bool(*) params>(mangled);              \
    __tsan_release(mutex);                                         \
    bool r;                                                        \
    {                                                              \
      Ignored ignored;                                             \
      r = real args;                                               \
    }                                                              \
    __tsan_acquire(mutex);                                         \
    return r;                                                      \
  }

WAIT_SHIM(tsan_AwaitWithTimeout, "_ZN4absl7debian35Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE",
          (Mutex * mu, const Condition& c, Duration d), (mu, c, d), mu)
WAIT_SHIM(tsan_AwaitWithDeadline, "_ZN4absl7debian35Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE",
          (Mutex * mu, const Condition& c, Time t), (mu, c, t), mu)
WAIT_SHIM(tsan_WaitWithTimeout, "_ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE",
          (CondVar * cv, Mutex* mu, Duration d), (cv, mu, d), mu)
WAIT_SHIM(tsan_WaitWithDeadline, "_ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE",
          (CondVar * cv, Mutex* mu, Time t), (cv, mu, t), mu)
