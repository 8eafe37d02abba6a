#include "server/auth.h"

#include <algorithm>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/evp.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"

namespace remotelens {
namespace {

constexpr absl::string_view kMissingKeyMessage =
    "missing API key: send metadata 'authorization: Bearer <key>'";
// The value is never echoed: a client that forgot the scheme sent the bare key.
constexpr absl::string_view kMalformedMessage =
    "malformed authorization metadata: expected 'Bearer <key>'";
constexpr absl::string_view kInvalidKeyMessage = "invalid API key";

bool IsLowercaseHexSha256(absl::string_view s) {
  if (s.size() != 64) return false;
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

// Keeps the first error protobuf reports, with its position, for a message that points at the
// offending line of the users file.
class FirstErrorCollector : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    if (!first_error_.empty()) return;
    // protobuf counts lines and columns from 0; editors count from 1. Its message is dropped:
    // it quotes the text it choked on ("Expected identifier, got: sk-..."), and a key pasted
    // unquoted where a hash or name belongs would then reach the log.
    (void)message;
    first_error_ = absl::StrCat("line ", line + 1, ", column ", column + 1,
                                ": syntax error (the text there is not shown, in case it is a "
                                "key; check quoting and field names against UsersFile in "
                                "config.proto)");
  }
  const std::string& first_error() const { return first_error_; }

 private:
  std::string first_error_;
};

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) {
    const int error = errno;
    if (error == ENOENT)
      return absl::NotFoundError(absl::StrCat("users file ", path, " does not exist"));
    return absl::ErrnoToStatus(error, absl::StrCat("cannot open users file ", path));
  }
  std::string contents;
  char buffer[64 * 1024];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), file)) > 0) contents.append(buffer, n);
  const bool failed = std::ferror(file) != 0;
  std::fclose(file);
  if (failed) return absl::DataLossError(absl::StrCat("error reading users file ", path));
  return contents;
}

absl::Status CheckQuotaField(absl::string_view prefix, absl::string_view field, int64_t value) {
  if (value >= 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(prefix, "quota.", field, " must be >= 0 (0 means the default), got ", value));
}

}  // namespace

std::string Sha256Hex(absl::string_view data) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int digest_size = 0;
  // Failure here means libcrypto itself is broken (no SHA-256); nothing sensible to recover.
  if (EVP_Digest(data.data(), data.size(), digest, &digest_size, EVP_sha256(), nullptr) != 1) {
    std::abort();
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex(2 * digest_size, '0');
  for (unsigned int i = 0; i < digest_size; ++i) {
    hex[2 * i] = kHex[digest[i] >> 4];
    hex[2 * i + 1] = kHex[digest[i] & 0xf];
  }
  return hex;
}

v1::Quota WithQuotaDefaults(const v1::Quota& quota) {
  v1::Quota filled = quota;
  if (filled.max_concurrent_requests() == 0) {
    filled.set_max_concurrent_requests(kDefaultMaxConcurrentRequests);
  }
  if (filled.max_tokens_per_request() == 0) {
    filled.set_max_tokens_per_request(kDefaultMaxTokensPerRequest);
  }
  if (filled.max_streamed_bytes_per_request() == 0) {
    filled.set_max_streamed_bytes_per_request(kDefaultMaxStreamedBytesPerRequest);
  }
  if (filled.max_stored_cache_bytes() == 0) {
    filled.set_max_stored_cache_bytes(kDefaultMaxStoredCacheBytes);
  }
  return filled;
}

// ---------------------------------------------------------------------------------------------
// Authenticator

Authenticator::Authenticator(bool enabled) : enabled_(enabled) {
  local_user_.name = std::string(kLocalUserName);
  local_user_.quota = WithQuotaDefaults(v1::Quota());
}

std::vector<std::string> Authenticator::UserNames() const {
  std::vector<std::string> names;
  if (!enabled_) names.push_back(local_user_.name);
  for (const auto& [hash, user] : users_by_key_hash_) names.push_back(user.name);
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  return names;
}

std::unique_ptr<Authenticator> Authenticator::Disabled() {
  return std::unique_ptr<Authenticator>(new Authenticator(/*enabled=*/false));
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::FromUsersFile(
    const std::string& path) {
  ASSIGN_OR_RETURN(const std::string text, ReadWholeFile(path));

  v1::UsersFile users;
  FirstErrorCollector errors;
  google::protobuf::TextFormat::Parser parser;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, &users)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "users file ", path, " is not a valid UsersFile textproto: ", errors.first_error()));
  }
  return FromUsersProto(users, path);
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::FromUsersProto(
    const v1::UsersFile& users, absl::string_view source_name) {
  if (users.users().empty()) {
    // Auth on with nobody allowed in is never what was meant; running without auth is a
    // different, explicit choice (no users_file, loopback only).
    return absl::InvalidArgumentError(absl::StrCat(
        "users file ", source_name,
        " defines no users; add `users { name: ... api_key_sha256: ... }` entries, or leave "
        "users_file unset to run without authentication on loopback only"));
  }
  std::unique_ptr<Authenticator> auth(new Authenticator(/*enabled=*/true));
  absl::flat_hash_map<std::string, int> index_by_name;

  for (int i = 0; i < users.users_size(); ++i) {
    const v1::User& user = users.users(i);
    if (user.name().empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("users file ", source_name, ": user #", i + 1, " has no name"));
    }
    const std::string prefix =
        absl::StrCat("users file ", source_name, ": user '", user.name(), "': ");

    // The value is never echoed: an operator who pasted the key instead of its hash would
    // otherwise see the key in the server log.
    if (!IsLowercaseHexSha256(user.api_key_sha256())) {
      return absl::InvalidArgumentError(absl::StrCat(
          prefix, "api_key_sha256 must be 64 lowercase hex characters, the SHA-256 of the key ",
          "(e.g. printf %s \"$KEY\" | sha256sum); got ", user.api_key_sha256().size(),
          " characters",
          user.api_key_sha256().size() == 64 ? " with a non-lowercase-hex one" : ""));
    }

    bool admin = false;
    if (user.role() == "admin") {
      admin = true;
    } else if (!user.role().empty() && user.role() != "user") {
      return absl::InvalidArgumentError(absl::StrCat(
          prefix, "role '", user.role(), "' is not one of \"user\" (the default) or \"admin\""));
    }

    const v1::Quota& quota = user.quota();
    RETURN_IF_ERROR(
        CheckQuotaField(prefix, "max_concurrent_requests", quota.max_concurrent_requests()));
    RETURN_IF_ERROR(
        CheckQuotaField(prefix, "max_tokens_per_request", quota.max_tokens_per_request()));
    RETURN_IF_ERROR(CheckQuotaField(prefix, "max_streamed_bytes_per_request",
                                    quota.max_streamed_bytes_per_request()));
    RETURN_IF_ERROR(
        CheckQuotaField(prefix, "max_stored_cache_bytes", quota.max_stored_cache_bytes()));

    auto [name_it, name_is_new] = index_by_name.emplace(user.name(), i);
    if (!name_is_new) {
      return absl::InvalidArgumentError(absl::StrCat("users file ", source_name, ": users #",
                                                     name_it->second + 1, " and #", i + 1,
                                                     " are both named '", user.name(), "'"));
    }
    AuthUser entry;
    entry.name = user.name();
    entry.admin = admin;
    entry.quota = WithQuotaDefaults(quota);
    auto [hash_it, hash_is_new] =
        auth->users_by_key_hash_.emplace(user.api_key_sha256(), std::move(entry));
    if (!hash_is_new) {
      return absl::InvalidArgumentError(absl::StrCat(
          "users file ", source_name, ": users '", hash_it->second.name, "' and '", user.name(),
          "' have the same api_key_sha256; every user needs their own key"));
    }
  }
  return auth;
}

absl::StatusOr<const AuthUser*> Authenticator::Authenticate(absl::string_view authorization) const {
  // Clients may send a key to a server without auth; it is simply not needed.
  if (!enabled_) return &local_user_;

  const absl::string_view value = absl::StripAsciiWhitespace(authorization);
  if (value.empty()) return absl::UnauthenticatedError(kMissingKeyMessage);

  const size_t space = value.find_first_of(" \t");
  const absl::string_view scheme = value.substr(0, space);
  if (!absl::EqualsIgnoreCase(scheme, "bearer")) {
    return absl::UnauthenticatedError(kMalformedMessage);
  }
  if (space == absl::string_view::npos) return absl::UnauthenticatedError(kMissingKeyMessage);
  const absl::string_view key = absl::StripLeadingAsciiWhitespace(value.substr(space));
  if (key.find_first_of(" \t") != absl::string_view::npos) {
    return absl::UnauthenticatedError(
        absl::StrCat(kMalformedMessage, " (the key contains whitespace)"));
  }

  // The look-up is keyed by the hash, so its timing depends only on the hash of what the client
  // sent, never on how much of a real key it guessed right; no constant-time compare is needed.
  auto it = users_by_key_hash_.find(Sha256Hex(key));
  if (it == users_by_key_hash_.end()) return absl::UnauthenticatedError(kInvalidKeyMessage);
  return &it->second;
}

// ---------------------------------------------------------------------------------------------
// ConcurrencyLimiter

ConcurrencyLimiter::Lease::Lease(ConcurrencyLimiter* limiter, std::string user_name)
    : limiter_(limiter), user_name_(std::move(user_name)) {}

ConcurrencyLimiter::Lease::Lease(Lease&& other) noexcept
    : limiter_(std::exchange(other.limiter_, nullptr)), user_name_(std::move(other.user_name_)) {}

ConcurrencyLimiter::Lease& ConcurrencyLimiter::Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    Release();
    limiter_ = std::exchange(other.limiter_, nullptr);
    user_name_ = std::move(other.user_name_);
  }
  return *this;
}

ConcurrencyLimiter::Lease::~Lease() { Release(); }

void ConcurrencyLimiter::Lease::Release() {
  if (limiter_ == nullptr) return;
  std::exchange(limiter_, nullptr)->Release(user_name_);
}

absl::StatusOr<ConcurrencyLimiter::Lease> ConcurrencyLimiter::Acquire(const AuthUser& user) {
  const int limit = user.quota.max_concurrent_requests() > 0 ? user.quota.max_concurrent_requests()
                                                             : kDefaultMaxConcurrentRequests;
  {
    absl::MutexLock lock(&mu_);
    int& in_flight = in_flight_[user.name];
    if (in_flight >= limit) {
      return absl::ResourceExhaustedError(
          absl::StrCat("user '", user.name, "' already has ", in_flight,
                       " requests in flight (quota max_concurrent_requests = ", limit, ")"));
    }
    ++in_flight;
  }
  return Lease(this, user.name);
}

void ConcurrencyLimiter::Release(const std::string& user_name) {
  absl::MutexLock lock(&mu_);
  auto it = in_flight_.find(user_name);
  if (it == in_flight_.end()) return;  // unreachable: every lease was counted in Acquire
  if (--it->second <= 0) in_flight_.erase(it);
}

int ConcurrencyLimiter::InFlight(const std::string& user_name) const {
  absl::MutexLock lock(&mu_);
  auto it = in_flight_.find(user_name);
  return it == in_flight_.end() ? 0 : it->second;
}

// ---------------------------------------------------------------------------------------------
// Listen addresses

bool IsLoopbackAddress(absl::string_view host_port) {
  absl::string_view host;
  absl::string_view port;
  if (absl::StartsWith(host_port, "[")) {
    const size_t close = host_port.find(']');
    if (close == absl::string_view::npos) return false;
    host = host_port.substr(1, close - 1);
    const absl::string_view rest = host_port.substr(close + 1);
    if (!rest.empty()) {
      if (rest[0] != ':') return false;
      port = rest.substr(1);
      if (port.empty()) return false;
    }
  } else {
    const size_t first_colon = host_port.find(':');
    if (first_colon != absl::string_view::npos && first_colon == host_port.rfind(':')) {
      host = host_port.substr(0, first_colon);
      port = host_port.substr(first_colon + 1);
      if (port.empty()) return false;
    } else {
      // No colon: a bare host. Several: a bare IPv6 address, whose last group is not a port.
      host = host_port;
    }
  }
  for (char c : port) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) return false;
  }
  // An empty host (":50051") and wildcards bind every interface.
  if (host.empty()) return false;
  if (absl::EqualsIgnoreCase(host, "localhost")) return true;

  const std::string host_string(host);  // inet_pton needs a NUL-terminated string
  in_addr v4;
  if (inet_pton(AF_INET, host_string.c_str(), &v4) == 1) {
    return (ntohl(v4.s_addr) >> 24) == 127;  // 127.0.0.0/8
  }
  in6_addr v6;
  if (inet_pton(AF_INET6, host_string.c_str(), &v6) == 1) {
    if (IN6_IS_ADDR_LOOPBACK(&v6)) return true;
    return IN6_IS_ADDR_V4MAPPED(&v6) && v6.s6_addr[12] == 127;  // ::ffff:127.x.y.z
  }
  // Any other name may resolve to a routable address.
  return false;
}

}  // namespace remotelens
