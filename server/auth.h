// API-key authentication, per-user concurrency quotas, and the loopback rule that keeps an
// unauthenticated server off the network.
//
// Keys are never stored: the users file holds the lowercase hex SHA-256 of each key, and a
// presented key is hashed and looked up. No message or log line ever contains a key.
//
//   std::unique_ptr<Authenticator> auth = Authenticator::Disabled();
//   if (!config.users_file().empty()) {
//     ASSIGN_OR_RETURN(auth, Authenticator::FromUsersFile(config.users_file()));
//   } else if (!IsLoopbackAddress(config.listen_address())) {
//     ... refuse to start: no users file, so loopback only ...
//   }
//
//   // Per RPC, with the value of the "authorization" metadata:
//   ASSIGN_OR_RETURN(const AuthUser* user, auth->Authenticate("Bearer sk-..."));
//   ASSIGN_OR_RETURN(ConcurrencyLimiter::Lease lease, limiter.Acquire(*user));
//   // ... run the request; the lease gives the slot back when it goes out of scope.
#ifndef REMOTELENS_SERVER_AUTH_H_
#define REMOTELENS_SERVER_AUTH_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/node_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "remotelens/v1/config.pb.h"

namespace remotelens {

// Quota defaults. proto3 cannot tell an unset field from 0, so 0 in the users file means
// "the default" for every field.
inline constexpr int32_t kDefaultMaxConcurrentRequests = 8;
// 0 stays 0: "whatever the server's Limits.max_tokens_per_request is", resolved by the caller
// that knows the server config.
inline constexpr int64_t kDefaultMaxTokensPerRequest = 0;
inline constexpr int64_t kDefaultMaxStreamedBytesPerRequest = int64_t{4} << 30;  // 4 GiB
inline constexpr int64_t kDefaultMaxStoredCacheBytes = int64_t{2} << 30;         // 2 GiB

// The user every caller is when authentication is off.
inline constexpr absl::string_view kLocalUserName = "local";

// Lowercase hex SHA-256 of `data` (64 characters), the form api_key_sha256 is written in.
std::string Sha256Hex(absl::string_view data);

// `quota` with every 0 field replaced by its default (see the constants above).
v1::Quota WithQuotaDefaults(const v1::Quota& quota);

struct AuthUser {
  std::string name;
  bool admin = false;  // role "admin": may list every user's sessions
  v1::Quota quota;     // defaults already filled in (WithQuotaDefaults)
};

class Authenticator {
 public:
  // Reads and validates a UsersFile textproto. NotFound when the file does not exist;
  // InvalidArgument, naming the file and the user, when it does not parse, defines no users,
  // has a user without a name, an api_key_sha256 that is not 64 lowercase hex characters,
  // duplicate names or hashes, a role other than "", "user" or "admin", or a negative quota.
  static absl::StatusOr<std::unique_ptr<Authenticator>> FromUsersFile(const std::string& path);

  // As FromUsersFile, for an already parsed file; `source_name` names it in error messages.
  static absl::StatusOr<std::unique_ptr<Authenticator>> FromUsersProto(
      const v1::UsersFile& users, absl::string_view source_name);

  // No users file: authentication is off and every caller is the non-admin user "local" with
  // default quotas. Only safe on loopback (IsLoopbackAddress).
  static std::unique_ptr<Authenticator> Disabled();

  Authenticator(const Authenticator&) = delete;
  Authenticator& operator=(const Authenticator&) = delete;

  bool enabled() const { return enabled_; }
  // Every user's name (the users file's, or the one local user when disabled); for bounded
  // per-user metric labels.
  std::vector<std::string> UserNames() const;

  // `authorization` is the value of the "authorization" metadata, possibly empty; accepted form
  // "Bearer <key>" (scheme case-insensitive, surrounding spaces ignored). When disabled, always
  // the local user. Otherwise UNAUTHENTICATED when the value is missing, malformed, or the key is
  // unknown ("invalid API key"). The returned pointer lives as long as this Authenticator.
  absl::StatusOr<const AuthUser*> Authenticate(absl::string_view authorization) const;

 private:
  explicit Authenticator(bool enabled);

  bool enabled_;
  AuthUser local_user_;  // the caller when !enabled_
  // Hex SHA-256 of the key -> user. node_hash_map: the AuthUser* handed out must stay put.
  absl::node_hash_map<std::string, AuthUser> users_by_key_hash_;
};

// Per-user in-flight request counting for the max_concurrent_requests quota. Thread-safe.
// Leases must not outlive the limiter.
class ConcurrencyLimiter {
 public:
  // One in-flight slot of one user; gives it back when destroyed. Movable, not copyable.
  class Lease {
   public:
    Lease() = default;  // holds nothing
    Lease(Lease&& other) noexcept;
    Lease& operator=(Lease&& other) noexcept;
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease();

    bool held() const { return limiter_ != nullptr; }
    // Gives the slot back now rather than at destruction; no-op when nothing is held.
    void Release();

   private:
    friend class ConcurrencyLimiter;
    Lease(ConcurrencyLimiter* limiter, std::string user_name);

    ConcurrencyLimiter* limiter_ = nullptr;
    std::string user_name_;
  };

  ConcurrencyLimiter() = default;
  ConcurrencyLimiter(const ConcurrencyLimiter&) = delete;
  ConcurrencyLimiter& operator=(const ConcurrencyLimiter&) = delete;

  // A slot for `user`, or RESOURCE_EXHAUSTED "user 'alice' already has 8 requests in flight
  // (quota max_concurrent_requests = 8)". A quota of 0 means the default.
  absl::StatusOr<Lease> Acquire(const AuthUser& user);

  // Requests of `user_name` holding a lease right now.
  int InFlight(const std::string& user_name) const;

 private:
  void Release(const std::string& user_name);

  mutable absl::Mutex mu_;
  // Only users with something in flight have an entry, so the map stays as small as the load.
  absl::flat_hash_map<std::string, int> in_flight_ ABSL_GUARDED_BY(mu_);
};

// Whether a gRPC listen address ("host:port", "[v6]:port") binds only to loopback: localhost,
// 127.0.0.0/8 or ::1. Without authentication the server must not listen anywhere else.
//   IsLoopbackAddress("127.0.0.1:50051")  // true
//   IsLoopbackAddress("[::1]:5")          // true
//   IsLoopbackAddress("0.0.0.0:5")        // false
//   IsLoopbackAddress(":50051")           // false: empty host means every interface
bool IsLoopbackAddress(absl::string_view host_port);

}  // namespace remotelens

#endif  // REMOTELENS_SERVER_AUTH_H_
