#include "server/session_store.h"

#include "server/echo.h"

#include <sys/random.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/status_macros.h"

namespace remotelens {
namespace {

// What a persistent hook holds: its serialized size, dominated by set/add values.
int64_t HookBytes(const v1::HookOp& op) { return static_cast<int64_t>(op.ByteSizeLong()); }

// Session ids are the only thing between a user and another user's session id guessing, so they
// come from the kernel's CSPRNG (the source behind /dev/urandom), not a seeded PRNG.
absl::StatusOr<std::string> RandomSessionId() {
  unsigned char bytes[16];  // 128 bits
  size_t filled = 0;
  while (filled < sizeof(bytes)) {
    const ssize_t n = getrandom(bytes + filled, sizeof(bytes) - filled, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(
          absl::StrCat("cannot read random bytes for a session id: ", std::strerror(errno)));
    }
    filled += static_cast<size_t>(n);
  }
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(bytes), sizeof(bytes)));
}

// "1.5 MiB": quota messages are read by people deciding what to delete.
std::string FormatBytes(int64_t bytes) {
  if (bytes < 1024) return absl::StrCat(bytes, " bytes");
  static constexpr const char* kUnits[] = {"KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes) / 1024;
  int unit = 0;
  while (value >= 1024 && unit + 1 < 4) {
    value /= 1024;
    ++unit;
  }
  return absl::StrFormat("%.1f %s", value, kUnits[unit]);
}

absl::Status SessionNotFound(const std::string& id) {
  return absl::NotFoundError(absl::StrCat("session '", Echo(id), "' not found or expired"));
}

}  // namespace

const at::Tensor* StoredCache::Find(absl::string_view name) const {
  for (const auto& [hook, tensor] : tensors) {
    if (hook == name) return &tensor;
  }
  return nullptr;
}

SessionStore::SessionStore(SessionLimits limits, std::function<absl::Time()> clock)
    : limits_(limits), clock_(std::move(clock)) {}

bool SessionStore::Expired(const Session& session, absl::Time now) const {
  return now - session.last_access >= session.ttl;
}

SessionSummary SessionStore::Summarize(const Session& session) const {
  SessionSummary summary;
  summary.id = session.id;
  summary.owner = session.owner;
  summary.ttl = session.ttl;
  summary.expires = session.last_access + session.ttl;
  summary.num_hooks = static_cast<int64_t>(session.hooks.size());
  summary.num_caches = static_cast<int64_t>(session.caches.size());
  summary.stored_bytes = session.stored_bytes;
  return summary;
}

absl::StatusOr<SessionStore::Session*> SessionStore::Access(const std::string& owner,
                                                            const std::string& id) {
  const absl::Time now = clock_();
  auto it = sessions_.find(id);
  // An expired session is unreachable at once, even before the janitor frees it.
  if (it == sessions_.end() || Expired(*it->second, now)) return SessionNotFound(id);
  Session* session = it->second.get();
  if (session->owner != owner) {
    return absl::PermissionDeniedError(
        absl::StrCat("session '", Echo(id), "' belongs to another user"));
  }
  session->last_access = now;
  return session;
}

std::unique_ptr<SessionStore::Session> SessionStore::Remove(const std::string& id) {
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return nullptr;
  std::unique_ptr<Session> session = std::move(it->second);
  sessions_.erase(it);
  auto owner_ids = ids_by_owner_.find(session->owner);
  owner_ids->second.erase(session->id);
  if (owner_ids->second.empty()) ids_by_owner_.erase(owner_ids);
  if (session->stored_bytes > 0) {
    auto owner_bytes = bytes_by_owner_.find(session->owner);
    owner_bytes->second -= session->stored_bytes;
    if (owner_bytes->second == 0) bytes_by_owner_.erase(owner_bytes);
  }
  num_hooks_ -= static_cast<int64_t>(session->hooks.size());
  stored_bytes_ -= session->stored_bytes;
  return session;
}

absl::StatusOr<SessionSummary> SessionStore::Create(const std::string& owner,
                                                    absl::Duration ttl) {
  if (ttl < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("session ttl must not be negative, got ",
                                                   absl::FormatDuration(ttl),
                                                   " (0: the default of ",
                                                   absl::FormatDuration(limits_.default_ttl), ")"));
  }
  if (ttl == absl::ZeroDuration()) ttl = limits_.default_ttl;
  ttl = std::min(ttl, limits_.max_ttl);
  ASSIGN_OR_RETURN(std::string id, RandomSessionId());

  std::vector<std::unique_ptr<Session>> expired;  // destroyed after the lock is released
  absl::MutexLock lock(&mu_);
  const absl::Time now = clock_();
  int live = 0;
  if (auto owner_ids = ids_by_owner_.find(owner); owner_ids != ids_by_owner_.end()) {
    // Expired sessions must not count against the limit even if the janitor has not run yet.
    for (const std::string& other : owner_ids->second) {
      if (!Expired(*sessions_.at(other), now)) ++live;
    }
  }
  if (live >= limits_.max_sessions_per_user) {
    return absl::ResourceExhaustedError(absl::StrCat("user '", owner, "' already has ", live,
                                                     " sessions (max_sessions_per_user)"));
  }
  // 128 random bits do not collide in practice; the loop makes it a certainty.
  while (sessions_.contains(id)) {
    ASSIGN_OR_RETURN(id, RandomSessionId());
  }
  auto session = std::make_unique<Session>();
  session->id = id;
  session->owner = owner;
  session->sequence = next_sequence_++;
  session->ttl = ttl;
  session->last_access = now;
  SessionSummary summary = Summarize(*session);
  ids_by_owner_[owner].insert(id);
  sessions_.emplace(id, std::move(session));
  return summary;
}

absl::Status SessionStore::Close(const std::string& owner, const std::string& id) {
  std::unique_ptr<Session> closed;  // its caches are freed after the lock is released
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Session * session, Access(owner, id));
  closed = Remove(session->id);
  return absl::OkStatus();
}

std::vector<SessionSummary> SessionStore::ListWhere(
    const std::function<bool(const Session&)>& keep) const {
  std::vector<std::pair<int64_t, SessionSummary>> found;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = clock_();
    for (const auto& [id, session] : sessions_) {
      if (!Expired(*session, now) && keep(*session)) {
        found.emplace_back(session->sequence, Summarize(*session));
      }
    }
  }
  std::sort(found.begin(), found.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<SessionSummary> summaries;
  summaries.reserve(found.size());
  for (auto& [sequence, summary] : found) summaries.push_back(std::move(summary));
  return summaries;
}

std::vector<SessionSummary> SessionStore::List(const std::string& owner) const {
  return ListWhere([&owner](const Session& session) { return session.owner == owner; });
}

std::vector<SessionSummary> SessionStore::ListAll() const {
  return ListWhere([](const Session&) { return true; });
}

absl::StatusOr<int64_t> SessionStore::AddHook(const std::string& owner, const std::string& id,
                                              v1::HookOp op, bool prepend,
                                              int64_t max_user_bytes,
                                              std::shared_ptr<const ParsedHookOp> parsed) {
  std::vector<std::unique_ptr<Session>> expired;  // destroyed after the lock is released
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Session * session, Access(owner, id));
  if (static_cast<int64_t>(session->hooks.size()) >= limits_.max_hooks_per_session) {
    return absl::ResourceExhaustedError(
        absl::StrCat("session '", Echo(id), "' already has ", session->hooks.size(),
                     " hooks (max_hooks_per_session); remove some or reset_hooks()"));
  }
  RETURN_IF_ERROR(Charge(*session, HookBytes(op), max_user_bytes, "a hook of", expired));
  const int64_t hook_id = session->next_hook_id++;
  auto where = prepend ? session->hooks.begin() : session->hooks.end();
  session->hooks.insert(where, SessionHook{hook_id, std::move(op), std::move(parsed)});
  ++num_hooks_;
  return hook_id;
}

absl::Status SessionStore::RemoveHook(const std::string& owner, const std::string& id,
                                      int64_t hook_id) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Session * session, Access(owner, id));
  auto it = std::find_if(session->hooks.begin(), session->hooks.end(),
                         [hook_id](const SessionHook& hook) { return hook.id == hook_id; });
  if (it == session->hooks.end()) {
    return absl::NotFoundError(
        absl::StrCat("hook ", hook_id, " not found in session '", Echo(id), "'"));
  }
  Refund(*session, HookBytes(it->op));
  session->hooks.erase(it);
  --num_hooks_;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<SessionHook>> SessionStore::ListHooks(
    const std::string& owner, const std::string& id) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Session * session, Access(owner, id));
  return session->hooks;
}

absl::StatusOr<int64_t> SessionStore::ResetHooks(const std::string& owner,
                                                 const std::string& id) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Session * session, Access(owner, id));
  const int64_t removed = static_cast<int64_t>(session->hooks.size());
  for (const SessionHook& hook : session->hooks) Refund(*session, HookBytes(hook.op));
  session->hooks.clear();  // next_hook_id keeps counting: old ids stay dead
  num_hooks_ -= removed;
  return removed;
}

absl::StatusOr<std::string> SessionStore::StoreCache(const std::string& owner,
                                                     const std::string& id, StoredCache cache,
                                                     int64_t max_user_bytes) {
  // Quotas are only as good as the byte count, so it is not taken on trust from the caller.
  cache.bytes = 0;
  for (const auto& [name, tensor] : cache.tensors) {
    if (tensor.defined()) cache.bytes += static_cast<int64_t>(tensor.nbytes());
  }

  std::vector<std::unique_ptr<Session>> expired;  // destroyed after the lock is released
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Session * session, Access(owner, id));
  RETURN_IF_ERROR(Charge(*session, cache.bytes, max_user_bytes, "storing", expired));
  std::string handle = absl::StrCat("c", session->next_cache++);
  session->caches.emplace(handle, std::make_shared<const StoredCache>(std::move(cache)));
  return handle;
}

absl::Status SessionStore::ReplaceCache(const std::string& owner, const std::string& id,
                                        const std::string& handle,
                                        const std::shared_ptr<const StoredCache>& expected,
                                        StoredCache next, int64_t max_user_bytes) {
  next.bytes = 0;
  for (const auto& [name, tensor] : next.tensors) {
    if (tensor.defined()) next.bytes += static_cast<int64_t>(tensor.nbytes());
  }
  std::shared_ptr<const StoredCache> replaced;      // freed after the lock is released
  std::vector<std::unique_ptr<Session>> expired;    // likewise
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Session * session, Access(owner, id));
  ASSIGN_OR_RETURN(auto it, FindCache(*session, id, handle));
  if (it->second != expected) {
    return absl::AbortedError(absl::StrCat(
        "cache '", Echo(handle), "' was replaced by another run since this run read it; this "
        "run's result was not stored: run it again on the cache as it is now"));
  }
  const int64_t delta = next.bytes - it->second->bytes;
  if (delta > 0) {
    RETURN_IF_ERROR(Charge(*session, delta, max_user_bytes,
                           absl::StrCat("growing cache '", Echo(handle), "' by"), expired));
  } else if (delta < 0) {
    Refund(*session, -delta);
  }
  replaced = std::move(it->second);
  it->second = std::make_shared<const StoredCache>(std::move(next));
  return absl::OkStatus();
}

absl::Status SessionStore::Charge(Session& session, int64_t bytes, int64_t max_user_bytes,
                                  absl::string_view what,
                                  std::vector<std::unique_ptr<Session>>& expired) {
  const std::string& owner = session.owner;
  const std::string& id = session.id;
  // The owner's expired sessions give their bytes back now rather than at the next janitor pass,
  // so a quota is never blocked by caches nobody can reach any more.
  const absl::Time now = clock_();
  if (auto owner_ids = ids_by_owner_.find(owner); owner_ids != ids_by_owner_.end()) {
    std::vector<std::string> stale;
    for (const std::string& other : owner_ids->second) {
      if (Expired(*sessions_.at(other), now)) stale.push_back(other);
    }
    for (const std::string& other : stale) expired.push_back(Remove(other));
  }
  auto in_use_it = bytes_by_owner_.find(owner);
  const int64_t in_use = in_use_it == bytes_by_owner_.end() ? 0 : in_use_it->second;
  if (bytes > max_user_bytes - in_use) {
    return absl::ResourceExhaustedError(absl::StrCat(
        what, " ", FormatBytes(bytes), " would exceed user '", owner,
        "''s stored cache quota (max_stored_cache_bytes: caches and session hook values) of ",
        FormatBytes(max_user_bytes), " (", FormatBytes(in_use), " in use)"));
  }
  if (bytes > limits_.max_total_stored_bytes - stored_bytes_) {
    // Caches nobody can reach any more never block: free every expired session, then recheck.
    std::vector<std::string> stale;
    for (const auto& [other, other_session] : sessions_) {
      if (other != id && Expired(*other_session, now)) stale.push_back(other);
    }
    for (const std::string& other : stale) expired.push_back(Remove(other));
    if (bytes > limits_.max_total_stored_bytes - stored_bytes_) {
      return absl::ResourceExhaustedError(absl::StrCat(
          what, " ", FormatBytes(bytes), " would exceed the server's stored cache capacity of ",
          FormatBytes(limits_.max_total_stored_bytes),
          " (all users together); delete caches you no longer need (DeleteCache) or retry later"));
    }
  }
  session.stored_bytes += bytes;
  if (bytes > 0) bytes_by_owner_[owner] += bytes;
  stored_bytes_ += bytes;
  return absl::OkStatus();
}

void SessionStore::Refund(Session& session, int64_t bytes) {
  session.stored_bytes -= bytes;
  stored_bytes_ -= bytes;
  if (bytes > 0) {
    auto owner_bytes = bytes_by_owner_.find(session.owner);
    owner_bytes->second -= bytes;
    if (owner_bytes->second == 0) bytes_by_owner_.erase(owner_bytes);
  }
}

absl::StatusOr<SessionStore::CacheMap::iterator> SessionStore::FindCache(
    Session& session, const std::string& id, const std::string& handle) {
  auto it = session.caches.find(handle);
  if (it == session.caches.end()) {
    return absl::NotFoundError(
        absl::StrCat("cache '", Echo(handle), "' not found in session '", Echo(id), "'"));
  }
  return it;
}

absl::StatusOr<std::shared_ptr<const StoredCache>> SessionStore::GetCache(
    const std::string& owner, const std::string& id, const std::string& handle) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Session * session, Access(owner, id));
  ASSIGN_OR_RETURN(auto it, FindCache(*session, id, handle));
  return it->second;
}

absl::StatusOr<int64_t> SessionStore::DeleteCache(const std::string& owner,
                                                  const std::string& id,
                                                  const std::string& handle) {
  std::shared_ptr<const StoredCache> deleted;  // freed after the lock is released
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Session * session, Access(owner, id));
  ASSIGN_OR_RETURN(auto it, FindCache(*session, id, handle));
  deleted = std::move(it->second);
  session->caches.erase(it);
  const int64_t bytes = deleted->bytes;
  Refund(*session, bytes);
  return bytes;
}

int SessionStore::ExpireIdle() {
  std::vector<std::unique_ptr<Session>> expired;  // destroyed after the lock is released
  absl::MutexLock lock(&mu_);
  const absl::Time now = clock_();
  std::vector<std::string> stale;
  for (const auto& [id, session] : sessions_) {
    if (Expired(*session, now)) stale.push_back(id);
  }
  for (const std::string& id : stale) expired.push_back(Remove(id));
  return static_cast<int>(expired.size());
}

int64_t SessionStore::NumSessions() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(sessions_.size());
}

int64_t SessionStore::NumHooks() const {
  absl::MutexLock lock(&mu_);
  return num_hooks_;
}

int64_t SessionStore::StoredBytes() const {
  absl::MutexLock lock(&mu_);
  return stored_bytes_;
}

int64_t SessionStore::StoredBytesOf(const std::string& owner) const {
  absl::MutexLock lock(&mu_);
  auto it = bytes_by_owner_.find(owner);
  return it == bytes_by_owner_.end() ? 0 : it->second;
}

}  // namespace remotelens
