#include "server/auth.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "google/protobuf/text_format.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

// SHA-256 test vectors (FIPS 180-2).
constexpr char kSha256OfEmpty[] =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
constexpr char kSha256OfAbc[] = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return absl::StrCat(dir != nullptr ? dir : "/tmp", "/", name);
}

std::string WriteTempFile(const std::string& name, const std::string& contents) {
  const std::string path = TempPath(name);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << contents;
  return path;
}

v1::UsersFile ParseUsers(const std::string& text) {
  v1::UsersFile users;
  EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(text, &users)) << text;
  return users;
}

// Key "abc" for alice (hash is the known vector), "bob-secret-key" for bob.
std::string TwoUsersText() {
  const std::string alice = absl::StrCat("users { name: \"alice\" api_key_sha256: \"", kSha256OfAbc,
                                         "\" role: \"admin\" }\n");
  const std::string bob =
      absl::StrCat("users {\n  name: \"bob\"\n  api_key_sha256: \"", Sha256Hex("bob-secret-key"),
                   "\"\n  quota { max_concurrent_requests: 2 max_stored_cache_bytes: 1000 }\n}\n");
  return alice + bob;
}

TEST(Sha256Hex, MatchesKnownVectors) {
  EXPECT_EQ(Sha256Hex(""), kSha256OfEmpty);
  EXPECT_EQ(Sha256Hex("abc"), kSha256OfAbc);
  EXPECT_EQ(Sha256Hex(absl::string_view("a\0b", 3)).size(), 64u);
  EXPECT_NE(Sha256Hex(absl::string_view("a\0b", 3)), Sha256Hex("a"));
}

TEST(Authenticator, LoadsUsersFileAndFillsQuotaDefaults) {
  const std::string path = WriteTempFile("two_users.textproto", TwoUsersText());
  auto auth = Authenticator::FromUsersFile(path);
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_TRUE((*auth)->enabled());

  auto alice = (*auth)->Authenticate("Bearer abc");
  ASSERT_TRUE(alice.ok()) << alice.status();
  EXPECT_EQ((*alice)->name, "alice");
  EXPECT_TRUE((*alice)->admin);
  EXPECT_EQ((*alice)->quota.max_concurrent_requests(), 8);
  EXPECT_EQ((*alice)->quota.max_tokens_per_request(), 0);  // 0: the server's limit
  EXPECT_EQ((*alice)->quota.max_streamed_bytes_per_request(), int64_t{4} << 30);
  EXPECT_EQ((*alice)->quota.max_stored_cache_bytes(), int64_t{2} << 30);

  auto bob = (*auth)->Authenticate("Bearer bob-secret-key");
  ASSERT_TRUE(bob.ok()) << bob.status();
  EXPECT_EQ((*bob)->name, "bob");
  EXPECT_FALSE((*bob)->admin);
  EXPECT_EQ((*bob)->quota.max_concurrent_requests(), 2);
  EXPECT_EQ((*bob)->quota.max_stored_cache_bytes(), 1000);
  EXPECT_EQ((*bob)->quota.max_streamed_bytes_per_request(), int64_t{4} << 30);

  // Same user, same object every time: callers may compare pointers.
  EXPECT_EQ(*(*auth)->Authenticate("Bearer abc"), *alice);
}

TEST(Authenticator, MissingFileIsNotFound) {
  auto auth = Authenticator::FromUsersFile(TempPath("no_such_users.textproto"));
  EXPECT_EQ(auth.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(auth.status().message().find("no_such_users.textproto"), std::string::npos);
}

TEST(Authenticator, UnparsableFileNamesFileAndLine) {
  const std::string path =
      WriteTempFile("bad_syntax.textproto", "users { name: \"alice\"\n  api_key: \"x\" }\n");
  auto auth = Authenticator::FromUsersFile(path);
  ASSERT_EQ(auth.status().code(), absl::StatusCode::kInvalidArgument) << auth.status();
  EXPECT_NE(auth.status().message().find(path), std::string::npos) << auth.status();
  EXPECT_NE(auth.status().message().find("line 2"), std::string::npos) << auth.status();
}

TEST(Authenticator, ParseErrorNeverQuotesTheFile) {
  // A key pasted unquoted where the hash belongs: protobuf's own message quotes that token.
  const std::string key = "sklive7f3a9c0d1e2b";
  const std::string path = WriteTempFile(
      "pasted_key.textproto", "users { name: \"alice\" api_key_sha256: " + key + " }\n");
  auto auth = Authenticator::FromUsersFile(path);
  ASSERT_EQ(auth.status().code(), absl::StatusCode::kInvalidArgument) << auth.status();
  EXPECT_EQ(auth.status().message().find("sklive"), std::string::npos) << auth.status();
  EXPECT_EQ(auth.status().message().find("7f3a9c0d1e2b"), std::string::npos) << auth.status();
  EXPECT_NE(auth.status().message().find("line 1, column"), std::string::npos) << auth.status();
}

TEST(Authenticator, AcceptsBearerCaseInsensitivelyWithExtraSpaces) {
  auto auth = Authenticator::FromUsersProto(ParseUsers(TwoUsersText()), "users.textproto");
  ASSERT_TRUE(auth.ok()) << auth.status();
  for (const char* header : {"Bearer abc", "bearer abc", "BEARER abc", "  Bearer    abc  ",
                             "Bearer\tabc", "bEaReR abc\t"}) {
    auto user = (*auth)->Authenticate(header);
    ASSERT_TRUE(user.ok()) << "'" << header << "': " << user.status();
    EXPECT_EQ((*user)->name, "alice") << header;
  }
}

TEST(Authenticator, RejectsMissingMalformedAndWrongKeysWithoutEchoingThem) {
  auto auth = Authenticator::FromUsersProto(ParseUsers(TwoUsersText()), "users.textproto");
  ASSERT_TRUE(auth.ok()) << auth.status();
  const std::string missing = "missing API key: send metadata 'authorization: Bearer <key>'";
  struct Case {
    std::string header;
    std::string expected_message_start;
    std::string secret;  // must not appear in the message
  };
  const std::vector<Case> cases = {
      {"", missing, ""},
      {"   ", missing, ""},
      {"Bearer", missing, ""},
      {"Bearer   ", missing, ""},
      {"Bearer wrong-key-123", "invalid API key", "wrong-key-123"},
      {"Bearer ab", "invalid API key", ""},
      {"bob-secret-key", "malformed authorization metadata", "bob-secret-key"},
      {"Basic c2VjcmV0LXNhdWNl", "malformed authorization metadata", "c2VjcmV0LXNhdWNl"},
      {"Bearer bob-secret-key extra-part", "malformed authorization metadata", "bob-secret-key"},
      {"Token abc", "malformed authorization metadata", ""},
  };
  for (const Case& c : cases) {
    auto user = (*auth)->Authenticate(c.header);
    ASSERT_FALSE(user.ok()) << "'" << c.header << "' was accepted";
    EXPECT_EQ(user.status().code(), absl::StatusCode::kUnauthenticated) << c.header;
    const std::string message(user.status().message());
    EXPECT_EQ(message.rfind(c.expected_message_start, 0), 0u)
        << "'" << c.header << "' -> " << message;
    if (!c.secret.empty()) {
      EXPECT_EQ(message.find(c.secret), std::string::npos) << message;
      EXPECT_EQ(user.status().ToString().find(c.secret), std::string::npos);
    }
  }
  EXPECT_EQ((*auth)->Authenticate("").status().message(), missing);
  EXPECT_EQ((*auth)->Authenticate("Bearer nope").status().message(), "invalid API key");
}

TEST(Authenticator, RejectsInvalidUsersFiles) {
  const std::string good_hash = kSha256OfAbc;
  struct Case {
    std::string text;
    std::vector<std::string> message_parts;  // each must appear in the error
  };
  const std::vector<Case> cases = {
      {"", {"cfg/users.textproto", "defines no users"}},
      {absl::StrCat("users { api_key_sha256: \"", good_hash, "\" }"),
       {"cfg/users.textproto", "user #1", "has no name"}},
      {"users { name: \"carol\" api_key_sha256: \"abc123\" }",
       {"cfg/users.textproto", "'carol'", "64 lowercase hex", "got 6 characters"}},
      {"users { name: \"carol\" }", {"'carol'", "64 lowercase hex", "got 0 characters"}},
      {absl::StrCat("users { name: \"carol\" api_key_sha256: \"",
                    "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD", "\" }"),
       {"'carol'", "64 lowercase hex"}},
      {absl::StrCat("users { name: \"carol\" api_key_sha256: \"", std::string(63, 'a'), "g\" }"),
       {"'carol'", "64 lowercase hex"}},
      {absl::StrCat("users { name: \"carol\" api_key_sha256: \"", good_hash, "\" }",
                    "users { name: \"carol\" api_key_sha256: \"", Sha256Hex("other"), "\" }"),
       {"cfg/users.textproto", "'carol'", "#1 and #2"}},
      {absl::StrCat("users { name: \"carol\" api_key_sha256: \"", good_hash, "\" }",
                    "users { name: \"dave\" api_key_sha256: \"", good_hash, "\" }"),
       {"cfg/users.textproto", "'carol'", "'dave'", "same api_key_sha256"}},
      {absl::StrCat("users { name: \"carol\" api_key_sha256: \"", good_hash, "\" role: \"root\" }"),
       {"cfg/users.textproto", "'carol'", "role 'root'"}},
      {absl::StrCat("users { name: \"carol\" api_key_sha256: \"", good_hash,
                    "\" role: \"Admin\" }"),
       {"'carol'", "role 'Admin'"}},
      {absl::StrCat("users { name: \"carol\" api_key_sha256: \"", good_hash,
                    "\" quota { max_concurrent_requests: -1 } }"),
       {"cfg/users.textproto", "'carol'", "max_concurrent_requests", "-1"}},
      {absl::StrCat("users { name: \"carol\" api_key_sha256: \"", good_hash,
                    "\" quota { max_tokens_per_request: -5 } }"),
       {"'carol'", "max_tokens_per_request", "-5"}},
      {absl::StrCat("users { name: \"carol\" api_key_sha256: \"", good_hash,
                    "\" quota { max_streamed_bytes_per_request: -2 } }"),
       {"'carol'", "max_streamed_bytes_per_request"}},
      {absl::StrCat("users { name: \"carol\" api_key_sha256: \"", good_hash,
                    "\" quota { max_stored_cache_bytes: -3 } }"),
       {"'carol'", "max_stored_cache_bytes"}},
  };
  for (const Case& c : cases) {
    auto auth = Authenticator::FromUsersProto(ParseUsers(c.text), "cfg/users.textproto");
    ASSERT_FALSE(auth.ok()) << "accepted: " << c.text;
    EXPECT_EQ(auth.status().code(), absl::StatusCode::kInvalidArgument) << auth.status();
    for (const std::string& part : c.message_parts) {
      EXPECT_NE(auth.status().message().find(part), std::string::npos)
          << "'" << part << "' not in: " << auth.status();
    }
  }
  // Roles "" and "user" are both plain users.
  auto ok = Authenticator::FromUsersProto(
      ParseUsers(absl::StrCat("users { name: \"u1\" api_key_sha256: \"", good_hash,
                              "\" role: \"user\" } users { name: \"u2\" api_key_sha256: \"",
                              kSha256OfEmpty, "\" }")),
      "cfg/users.textproto");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_FALSE((*(*ok)->Authenticate("Bearer abc"))->admin);
}

TEST(Authenticator, ShaInFileIsNeverEchoed) {
  // An operator who pasted the key itself into api_key_sha256 must not see it in the log.
  auto auth = Authenticator::FromUsersProto(
      ParseUsers("users { name: \"carol\" api_key_sha256: \"sk-live-very-secret\" }"), "f");
  ASSERT_FALSE(auth.ok());
  EXPECT_EQ(auth.status().message().find("sk-live-very-secret"), std::string::npos)
      << auth.status();
}

TEST(Authenticator, DisabledMakesEveryoneTheLocalUser) {
  std::unique_ptr<Authenticator> auth = Authenticator::Disabled();
  EXPECT_FALSE(auth->enabled());
  for (const char* header : {"", "Bearer whatever", "garbage"}) {
    auto user = auth->Authenticate(header);
    ASSERT_TRUE(user.ok()) << user.status();
    EXPECT_EQ((*user)->name, "local");
    EXPECT_FALSE((*user)->admin);
    EXPECT_EQ((*user)->quota.max_concurrent_requests(), 8);
    EXPECT_EQ((*user)->quota.max_streamed_bytes_per_request(), int64_t{4} << 30);
    EXPECT_EQ((*user)->quota.max_stored_cache_bytes(), int64_t{2} << 30);
  }
}

AuthUser UserWithConcurrency(const std::string& name, int max_concurrent) {
  AuthUser user;
  user.name = name;
  v1::Quota quota;
  quota.set_max_concurrent_requests(max_concurrent);
  user.quota = WithQuotaDefaults(quota);
  return user;
}

TEST(ConcurrencyLimiter, AcquiresUpToQuotaThenRefusesNamingTheUser) {
  ConcurrencyLimiter limiter;
  const AuthUser alice = UserWithConcurrency("alice", 3);
  const AuthUser bob = UserWithConcurrency("bob", 1);
  std::vector<ConcurrencyLimiter::Lease> leases;
  for (int i = 0; i < 3; ++i) {
    auto lease = limiter.Acquire(alice);
    ASSERT_TRUE(lease.ok()) << i << ": " << lease.status();
    EXPECT_TRUE(lease->held());
    leases.push_back(std::move(*lease));
  }
  EXPECT_EQ(limiter.InFlight("alice"), 3);
  auto refused = limiter.Acquire(alice);
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(refused.status().message(),
            "user 'alice' already has 3 requests in flight (quota max_concurrent_requests = 3)");
  EXPECT_EQ(limiter.InFlight("alice"), 3);

  // Another user's quota is separate.
  auto bob_lease = limiter.Acquire(bob);
  ASSERT_TRUE(bob_lease.ok()) << bob_lease.status();
  EXPECT_EQ(limiter.InFlight("bob"), 1);

  leases.pop_back();  // destroying a lease frees its slot
  EXPECT_EQ(limiter.InFlight("alice"), 2);
  EXPECT_TRUE(limiter.Acquire(alice).ok());  // temporary lease: released at end of statement
  EXPECT_EQ(limiter.InFlight("alice"), 2);
  leases.clear();
  EXPECT_EQ(limiter.InFlight("alice"), 0);
  EXPECT_EQ(limiter.InFlight("nobody"), 0);
}

TEST(ConcurrencyLimiter, DefaultQuotaIsEight) {
  ConcurrencyLimiter limiter;
  AuthUser user;  // quota all zero: the default applies
  user.name = "zero";
  std::vector<ConcurrencyLimiter::Lease> leases;
  for (int i = 0; i < 8; ++i) {
    auto lease = limiter.Acquire(user);
    ASSERT_TRUE(lease.ok()) << lease.status();
    leases.push_back(std::move(*lease));
  }
  EXPECT_EQ(limiter.Acquire(user).status().code(), absl::StatusCode::kResourceExhausted);
}

TEST(ConcurrencyLimiter, LeaseMovesOwnershipAndReleasesOnce) {
  ConcurrencyLimiter limiter;
  const AuthUser alice = UserWithConcurrency("alice", 2);
  auto first = limiter.Acquire(alice);
  ASSERT_TRUE(first.ok());
  ConcurrencyLimiter::Lease a = std::move(*first);
  EXPECT_FALSE(first->held());  // moved-from holds nothing
  EXPECT_TRUE(a.held());
  {
    ConcurrencyLimiter::Lease b(std::move(a));
    EXPECT_FALSE(a.held());
    EXPECT_TRUE(b.held());
    EXPECT_EQ(limiter.InFlight("alice"), 1);
  }
  EXPECT_EQ(limiter.InFlight("alice"), 0);  // released by b only, not again by a

  auto second = limiter.Acquire(alice);
  auto third = limiter.Acquire(alice);
  ASSERT_TRUE(second.ok() && third.ok());
  EXPECT_EQ(limiter.InFlight("alice"), 2);
  ConcurrencyLimiter::Lease c = std::move(*second);
  c = std::move(*third);  // move-assign releases what c held before
  EXPECT_EQ(limiter.InFlight("alice"), 1);
  c.Release();
  EXPECT_FALSE(c.held());
  EXPECT_EQ(limiter.InFlight("alice"), 0);
  c.Release();  // no-op, never negative
  EXPECT_EQ(limiter.InFlight("alice"), 0);
  ConcurrencyLimiter::Lease empty;
  EXPECT_FALSE(empty.held());
}

TEST(ConcurrencyLimiter, ConcurrentAcquireReleaseNeverExceedsQuotaAndEndsAtZero) {
  ConcurrencyLimiter limiter;
  const AuthUser alice = UserWithConcurrency("alice", 3);
  constexpr int kThreads = 8;
  constexpr int kIterations = 2000;
  std::atomic<int> holding{0};
  std::atomic<int> max_holding{0};
  std::atomic<int> granted{0};
  std::atomic<int> refused{0};
  std::atomic<int> bad_codes{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kIterations; ++i) {
        auto lease = limiter.Acquire(alice);
        if (!lease.ok()) {
          if (lease.status().code() != absl::StatusCode::kResourceExhausted) ++bad_codes;
          ++refused;
          continue;
        }
        ++granted;
        const int now = ++holding;
        int seen = max_holding.load();
        while (now > seen && !max_holding.compare_exchange_weak(seen, now)) {
        }
        std::this_thread::yield();
        --holding;  // before the lease is released at the end of this iteration
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(limiter.InFlight("alice"), 0);
  EXPECT_LE(max_holding.load(), 3);
  EXPECT_GT(granted.load(), 0);
  EXPECT_EQ(granted.load() + refused.load(), kThreads * kIterations);
  EXPECT_EQ(bad_codes.load(), 0);

  // With a quota as large as the thread count nobody is ever refused.
  const AuthUser bob = UserWithConcurrency("bob", kThreads);
  std::atomic<int> bob_refused{0};
  threads.clear();
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kIterations; ++i) {
        if (!limiter.Acquire(bob).ok()) ++bob_refused;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(bob_refused.load(), 0);
  EXPECT_EQ(limiter.InFlight("bob"), 0);
}

TEST(IsLoopbackAddress, AcceptsOnlyLoopbackHosts) {
  for (const char* address :
       {"127.0.0.1:50051", "localhost:1", "LocalHost:80", "[::1]:5", "127.1.2.3:9", "localhost",
        "127.0.0.1", "[::1]", "[::ffff:127.0.0.1]:5"}) {
    EXPECT_TRUE(IsLoopbackAddress(address)) << address;
  }
  for (const char* address : {"0.0.0.0:5",
                              "10.0.0.1:5",
                              ":50051",
                              "[::]:5",
                              "[::0]:5",
                              "",
                              "192.168.1.1:80",
                              "example.com:443",
                              "localhost.evil.com:1",
                              "128.0.0.1:5",
                              "[::2]:5",
                              "[::1:5",
                              "[::1]x",
                              "[::1]:",
                              "localhost:",
                              "localhost:ab",
                              "*:50051",
                              "unix:/tmp/sock",
                              "[::ffff:10.0.0.1]:5",
                              "::1:50051"}) {
    EXPECT_FALSE(IsLoopbackAddress(address)) << address;
  }
}

}  // namespace
}  // namespace remotelens
