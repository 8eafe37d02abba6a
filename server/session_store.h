// SessionStore: users' sessions, each with persistent hooks (TransformerLens add_hook) and stored
// activation caches, freed after an idle TTL. Sessions belong to the store, never to the model,
// and every access names its owner, so one user can never read or change another's session.
// Thread-safe: the service's handlers, the scheduler and a janitor thread share one store.
//
//   SessionStore store(SessionLimits{.max_sessions_per_user = 8});
//   ASSIGN_OR_RETURN(SessionSummary session, store.Create("alice", absl::ZeroDuration()));
//   ASSIGN_OR_RETURN(int64_t hook_id, store.AddHook("alice", session.id, op, /*prepend=*/false));
//   ASSIGN_OR_RETURN(std::string handle,
//                    store.StoreCache("alice", session.id, std::move(cache), quota_bytes));
//   store.GetCache("bob", session.id, handle);  // PERMISSION_DENIED
//   ...
//   store.ExpireIdle();  // from the janitor, every few seconds
#ifndef REMOTELENS_SERVER_SESSION_STORE_H_
#define REMOTELENS_SERVER_SESSION_STORE_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "remotelens/v1/hooks.pb.h"
#include "server/parsed_hook_op.h"

namespace remotelens {

// From ServerConfig.limits; the defaults are that proto's documented defaults.
struct SessionLimits {
  absl::Duration default_ttl = absl::Hours(1);  // idle TTL when Create asks for zero
  absl::Duration max_ttl = absl::Hours(24);     // longer requests are clamped to this
  int max_sessions_per_user = 64;               // live sessions per owner
  int max_hooks_per_session = 1024;             // persistent hooks per session
  // Every user's stored caches together: per-user quotas alone let many users fill the host.
  int64_t max_total_stored_bytes = int64_t{16} << 30;
};

// Activations kept on the server for later patching or fetching. Immutable once stored: readers
// hold a shared_ptr, so a cache deleted (or expired) while a run patches from it stays valid
// until that run lets go.
struct StoredCache {
  enum class Kind {
    kActivations,  // hook name -> activation (RunRequest.cache.store); patch sources
    kKeyValues,    // a past_kv_cache: engine/kv_cache_tensors' names ("kv.mask", "kv.{L}.keys", ...)
  };
  std::vector<std::pair<std::string, at::Tensor>> tensors;  // name -> tensor, forward order
  int64_t bytes = 0;  // sum of the tensors' nbytes(); StoreCache recomputes it
  Kind kind = Kind::kActivations;

  // The activation stored under `name`, or nullptr.
  const at::Tensor* Find(absl::string_view name) const;
};

// A snapshot of one session, for CreateSession and ListSessions.
struct SessionSummary {
  std::string id;
  std::string owner;
  absl::Duration ttl;   // idle time after which it is freed
  absl::Time expires;   // last access + ttl
  int64_t num_hooks = 0;
  int64_t num_caches = 0;
  int64_t stored_bytes = 0;  // its caches' bytes and its hooks' serialized size
};

// A persistent hook of a session.
struct SessionHook {
  int64_t id = 0;
  v1::HookOp op;                              // as the client sent it
  std::shared_ptr<const ParsedHookOp> parsed;  // its engine form (null if never parsed)
};

class SessionStore {
 public:
  // `clock` is injectable so tests can move time; it is called with the store's lock held.
  explicit SessionStore(SessionLimits limits, std::function<absl::Time()> clock = absl::Now);

  SessionStore(const SessionStore&) = delete;
  SessionStore& operator=(const SessionStore&) = delete;

  // A new session for `owner` with an unguessable id (128 random bits as 32 lowercase hex chars).
  // `ttl` zero means limits.default_ttl; above limits.max_ttl it is clamped; negative is
  // INVALID_ARGUMENT. RESOURCE_EXHAUSTED when the owner already has max_sessions_per_user live
  // sessions: "user 'bob' already has 64 sessions (max_sessions_per_user)".
  absl::StatusOr<SessionSummary> Create(const std::string& owner, absl::Duration ttl);

  // Every method below that takes (owner, id) fails the same way: NOT_FOUND "session 'x' not
  // found or expired" when no live session has that id, else PERMISSION_DENIED "session 'x'
  // belongs to another user" when `owner` is not its owner. Every successful call restarts the
  // session's idle timer.

  // Frees the session with its hooks and caches.
  absl::Status Close(const std::string& owner, const std::string& id);

  // Live sessions of `owner` (ListAll: everyone's, for admins), oldest first. Listing is not an
  // access: it does not keep sessions alive.
  std::vector<SessionSummary> List(const std::string& owner) const;
  std::vector<SessionSummary> ListAll() const;

  // Persistent hooks: the (already validated) proto op, which ListHooks returns, and its parsed
  // engine form (request_builder's ParseHookOp), which runs use without decoding it again. Ids start at 1 and increase
  // per session, never reused, so a stale id cannot remove a newer hook. `prepend` puts the hook
  // first in application order. RESOURCE_EXHAUSTED past max_hooks_per_session, or when the op's
  // serialized size (its set/add value) would take the owner past `max_user_bytes` or the
  // server past max_total_stored_bytes: hook values count as stored bytes, like caches.
  absl::StatusOr<int64_t> AddHook(const std::string& owner, const std::string& id,
                                  v1::HookOp op, bool prepend, int64_t max_user_bytes,
                                  std::shared_ptr<const ParsedHookOp> parsed = nullptr);
  // NOT_FOUND "hook 7 not found in session 'x'".
  absl::Status RemoveHook(const std::string& owner, const std::string& id, int64_t hook_id);
  // In application order.
  absl::StatusOr<std::vector<SessionHook>> ListHooks(const std::string& owner, const std::string& id);
  // Removes every hook; returns how many there were.
  absl::StatusOr<int64_t> ResetHooks(const std::string& owner, const std::string& id);

  // Keeps `cache` under a new handle ("c1", "c2", ... per session). `max_user_bytes` is the
  // owner's quota over all their sessions; RESOURCE_EXHAUSTED "storing 3.0 MiB would exceed user
  // 'bob''s stored cache quota of 2.0 MiB (1.5 MiB in use)", or, past
  // SessionLimits::max_total_stored_bytes, a message naming the server's capacity (never other
  // users' usage). Expired sessions' caches are freed first, whoever owns them.
  absl::StatusOr<std::string> StoreCache(const std::string& owner, const std::string& id,
                                         StoredCache cache, int64_t max_user_bytes);
  // Puts `next` under `handle` in place of `expected` (a past_kv_cache run extending its key/value
  // cache), charging only the difference in bytes against the quotas as StoreCache does
  // (RESOURCE_EXHAUSTED leaves `expected` in place). Compare-and-swap: ABORTED "cache 'c3' was
  // replaced by another run since this run read it" when the handle no longer holds `expected`;
  // NOT_FOUND as GetCache when it was deleted meanwhile.
  absl::Status ReplaceCache(const std::string& owner, const std::string& id,
                            const std::string& handle,
                            const std::shared_ptr<const StoredCache>& expected, StoredCache next,
                            int64_t max_user_bytes);
  // NOT_FOUND "cache 'c3' not found in session 'x'".
  absl::StatusOr<std::shared_ptr<const StoredCache>> GetCache(const std::string& owner,
                                                              const std::string& id,
                                                              const std::string& handle);
  // Returns the bytes freed. NOT_FOUND as GetCache.
  absl::StatusOr<int64_t> DeleteCache(const std::string& owner, const std::string& id,
                                      const std::string& handle);

  // Frees every session idle for at least its TTL, with its caches; returns how many. A server
  // janitor thread calls this periodically; an expired session is already unreachable before
  // that (NOT_FOUND), this only returns its memory.
  int ExpireIdle();

  // Totals over the store, for metrics. Sessions past their TTL count until freed.
  int64_t NumSessions() const;
  int64_t NumHooks() const;
  int64_t StoredBytes() const;
  int64_t StoredBytesOf(const std::string& owner) const;

 private:
  struct Session {
    std::string id;
    std::string owner;
    int64_t sequence = 0;  // creation order, for stable listings
    absl::Duration ttl;
    absl::Time last_access;
    int64_t next_hook_id = 1;
    std::vector<SessionHook> hooks;  // application order
    int64_t next_cache = 1;
    std::map<std::string, std::shared_ptr<const StoredCache>> caches;  // by handle
    int64_t stored_bytes = 0;  // caches and hook values
  };

  // The owner's live session `id`, its idle timer restarted, or NOT_FOUND / PERMISSION_DENIED.
  using CacheMap = std::map<std::string, std::shared_ptr<const StoredCache>>;
  // The session's cache under `handle`, or NOT_FOUND naming both.
  static absl::StatusOr<CacheMap::iterator> FindCache(Session& session, const std::string& id,
                                                      const std::string& handle);
  absl::StatusOr<Session*> Access(const std::string& owner, const std::string& id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool Expired(const Session& session, absl::Time now) const;
  // Counts `bytes` more against the session, its owner (quota `max_user_bytes`) and the server
  // (max_total_stored_bytes), or RESOURCE_EXHAUSTED "<what> 3.0 MiB would exceed ...". Expired
  // sessions are moved to `expired` first so they never block a quota.
  absl::Status Charge(Session& session, int64_t bytes, int64_t max_user_bytes,
                      absl::string_view what, std::vector<std::unique_ptr<Session>>& expired)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Refund(Session& session, int64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  SessionSummary Summarize(const Session& session) const;
  // Unlinks the session and its totals; the caller destroys it outside the lock.
  std::unique_ptr<Session> Remove(const std::string& id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<SessionSummary> ListWhere(const std::function<bool(const Session&)>& keep) const;

  const SessionLimits limits_;
  const std::function<absl::Time()> clock_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, absl::flat_hash_set<std::string>> ids_by_owner_
      ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, int64_t> bytes_by_owner_ ABSL_GUARDED_BY(mu_);
  int64_t next_sequence_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t num_hooks_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t stored_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace remotelens

#endif  // REMOTELENS_SERVER_SESSION_STORE_H_
