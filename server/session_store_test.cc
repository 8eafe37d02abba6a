#include "server/session_store.h"

#include <ATen/ATen.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace remotelens {
namespace {

// No stored-bytes quota, for tests about other rules.
constexpr int64_t kAnyBytes = int64_t{1} << 40;

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr int64_t kMiB = 1 << 20;
constexpr int64_t kNoQuota = std::numeric_limits<int64_t>::max();

// A clock the test moves by hand; starts at an arbitrary fixed time.
struct FakeClock {
  absl::Time now = absl::FromUnixSeconds(1700000000);
  std::function<absl::Time()> Fn() {
    return [this] { return now; };
  }
};

v1::HookOp Op(const std::string& hook_name) {
  v1::HookOp op;
  op.set_hook_name(hook_name);
  op.mutable_zero();
  return op;
}

// Stored bytes of one Op("hook_embed") persistent hook.
int64_t EmbedHookBytes() { return static_cast<int64_t>(Op("hook_embed").ByteSizeLong()); }

// A cache of `bytes` bytes of float32 (bytes must be a multiple of 4).
StoredCache CacheOf(int64_t bytes, const std::string& name = "blocks.0.hook_resid_post") {
  StoredCache cache;
  cache.tensors.emplace_back(name, at::zeros({bytes / 4}, at::kFloat));
  return cache;
}

std::vector<int64_t> HookIds(SessionStore& store, const std::string& owner,
                             const std::string& id) {
  auto hooks = store.ListHooks(owner, id);
  EXPECT_TRUE(hooks.ok()) << hooks.status();
  std::vector<int64_t> ids;
  if (hooks.ok()) {
    for (const SessionHook& hook : *hooks) ids.push_back(hook.id);
  }
  return ids;
}

std::string MustCreate(SessionStore& store, const std::string& owner,
                       absl::Duration ttl = absl::ZeroDuration()) {
  absl::StatusOr<SessionSummary> session = store.Create(owner, ttl);
  EXPECT_TRUE(session.ok()) << session.status();
  return session.ok() ? session->id : "";
}

TEST(SessionStore, CreateListClose) {
  FakeClock clock;
  SessionStore store(SessionLimits{}, clock.Fn());
  absl::StatusOr<SessionSummary> a = store.Create("alice", absl::ZeroDuration());
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->owner, "alice");
  EXPECT_EQ(a->ttl, absl::Hours(1));
  EXPECT_EQ(a->expires, clock.now + absl::Hours(1));
  EXPECT_EQ(a->num_hooks, 0);
  EXPECT_EQ(a->num_caches, 0);
  const std::string a2 = MustCreate(store, "alice");
  const std::string b = MustCreate(store, "bob");
  EXPECT_EQ(store.NumSessions(), 3);

  std::vector<SessionSummary> alices = store.List("alice");
  ASSERT_EQ(alices.size(), 2u);
  EXPECT_EQ(alices[0].id, a->id);  // oldest first
  EXPECT_EQ(alices[1].id, a2);
  ASSERT_EQ(store.List("bob").size(), 1u);
  EXPECT_EQ(store.List("bob")[0].id, b);
  EXPECT_THAT(store.List("carol"), IsEmpty());
  EXPECT_EQ(store.ListAll().size(), 3u);

  ASSERT_TRUE(store.Close("alice", a->id).ok());
  EXPECT_EQ(store.NumSessions(), 2);
  ASSERT_EQ(store.List("alice").size(), 1u);
  EXPECT_EQ(store.List("alice")[0].id, a2);
  EXPECT_EQ(store.Close("alice", a->id).code(), absl::StatusCode::kNotFound);
}

TEST(SessionStore, SummaryCountsHooksAndCaches) {
  SessionStore store(SessionLimits{});
  const std::string id = MustCreate(store, "alice");
  ASSERT_TRUE(store.AddHook("alice", id, Op("hook_embed"), false, kAnyBytes).ok());
  ASSERT_TRUE(store.StoreCache("alice", id, CacheOf(64), kNoQuota).ok());
  std::vector<SessionSummary> sessions = store.List("alice");
  ASSERT_EQ(sessions.size(), 1u);
  EXPECT_EQ(sessions[0].num_hooks, 1);
  EXPECT_EQ(sessions[0].num_caches, 1);
  // Hook values count as stored bytes too.
  EXPECT_EQ(sessions[0].stored_bytes, 64 + EmbedHookBytes());
}

TEST(SessionStore, OtherUserIsDeniedEverywhereAndChangesNothing) {
  SessionStore store(SessionLimits{});
  const std::string id = MustCreate(store, "alice");
  absl::StatusOr<int64_t> hook = store.AddHook("alice", id, Op("hook_embed"), false, kAnyBytes);
  ASSERT_TRUE(hook.ok());
  absl::StatusOr<std::string> handle = store.StoreCache("alice", id, CacheOf(16), kNoQuota);
  ASSERT_TRUE(handle.ok());

  const std::string denied = "session '" + id + "' belongs to another user";
  auto expect_denied = [&](const absl::Status& status) {
    EXPECT_EQ(status.code(), absl::StatusCode::kPermissionDenied) << status;
    EXPECT_EQ(status.message(), denied);
  };
  expect_denied(store.Close("mallory", id));
  expect_denied(store.AddHook("mallory", id, Op("hook_embed"), false, kAnyBytes).status());
  expect_denied(store.RemoveHook("mallory", id, *hook));
  expect_denied(store.ListHooks("mallory", id).status());
  expect_denied(store.ResetHooks("mallory", id).status());
  expect_denied(store.StoreCache("mallory", id, CacheOf(16), kNoQuota).status());
  expect_denied(store.GetCache("mallory", id, *handle).status());
  expect_denied(store.DeleteCache("mallory", id, *handle).status());
  EXPECT_THAT(store.List("mallory"), IsEmpty());

  EXPECT_EQ(store.NumSessions(), 1);
  EXPECT_THAT(HookIds(store, "alice", id), ElementsAre(*hook));
  EXPECT_TRUE(store.GetCache("alice", id, *handle).ok());
  EXPECT_EQ(store.StoredBytesOf("alice"), 16 + EmbedHookBytes());
  EXPECT_EQ(store.StoredBytesOf("mallory"), 0);
}

TEST(SessionStore, UnknownSessionIsNotFoundEverywhere) {
  SessionStore store(SessionLimits{});
  MustCreate(store, "alice");
  const std::string id = "0123456789abcdef0123456789abcdef";
  const std::string message = "session '" + id + "' not found or expired";
  auto expect_not_found = [&](const absl::Status& status) {
    EXPECT_EQ(status.code(), absl::StatusCode::kNotFound) << status;
    EXPECT_EQ(status.message(), message);
  };
  expect_not_found(store.Close("alice", id));
  expect_not_found(store.AddHook("alice", id, Op("hook_embed"), false, kAnyBytes).status());
  expect_not_found(store.RemoveHook("alice", id, 1));
  expect_not_found(store.ListHooks("alice", id).status());
  expect_not_found(store.ResetHooks("alice", id).status());
  expect_not_found(store.StoreCache("alice", id, CacheOf(16), kNoQuota).status());
  expect_not_found(store.GetCache("alice", id, "c1").status());
  expect_not_found(store.DeleteCache("alice", id, "c1").status());
}

TEST(SessionStore, IdleSessionsExpire) {
  FakeClock clock;
  SessionStore store(SessionLimits{}, clock.Fn());
  const std::string id = MustCreate(store, "alice", absl::Minutes(10));
  ASSERT_TRUE(store.StoreCache("alice", id, CacheOf(1024), kNoQuota).ok());
  const std::string other = MustCreate(store, "alice", absl::Hours(2));

  clock.now += absl::Minutes(9);
  EXPECT_EQ(store.ExpireIdle(), 0);
  EXPECT_EQ(store.List("alice").size(), 2u);

  clock.now += absl::Minutes(1);  // exactly the TTL since the last access
  // Unreachable at once, before the janitor runs.
  EXPECT_EQ(store.ListHooks("alice", id).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store.List("alice").size(), 1u);
  EXPECT_EQ(store.NumSessions(), 2);  // not freed yet
  EXPECT_EQ(store.ExpireIdle(), 1);
  EXPECT_EQ(store.NumSessions(), 1);
  EXPECT_EQ(store.StoredBytes(), 0);
  EXPECT_EQ(store.StoredBytesOf("alice"), 0);
  EXPECT_EQ(store.Close("alice", id).code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store.ListHooks("alice", other).ok());
}

TEST(SessionStore, EveryAccessRestartsTheIdleTimer) {
  FakeClock clock;
  SessionStore store(SessionLimits{}, clock.Fn());
  const std::string id = MustCreate(store, "alice", absl::Minutes(10));
  for (int i = 0; i < 5; ++i) {
    clock.now += absl::Minutes(8);
    ASSERT_TRUE(store.ListHooks("alice", id).ok()) << "access " << i;
    EXPECT_EQ(store.ExpireIdle(), 0);
  }
  EXPECT_EQ(store.List("alice")[0].expires, clock.now + absl::Minutes(10));
  // A denied access is not an access: it must not keep the session alive.
  clock.now += absl::Minutes(8);
  EXPECT_FALSE(store.ListHooks("mallory", id).ok());
  EXPECT_TRUE(store.List("alice").size() == 1);  // listing is not an access either
  clock.now += absl::Minutes(2);
  EXPECT_EQ(store.ExpireIdle(), 1);
}

TEST(SessionStore, TtlDefaultsAndClamps) {
  SessionLimits limits;
  limits.default_ttl = absl::Minutes(30);
  limits.max_ttl = absl::Hours(2);
  SessionStore store(limits);
  absl::StatusOr<SessionSummary> zero = store.Create("alice", absl::ZeroDuration());
  ASSERT_TRUE(zero.ok());
  EXPECT_EQ(zero->ttl, absl::Minutes(30));
  absl::StatusOr<SessionSummary> within = store.Create("alice", absl::Minutes(90));
  ASSERT_TRUE(within.ok());
  EXPECT_EQ(within->ttl, absl::Minutes(90));
  absl::StatusOr<SessionSummary> above = store.Create("alice", absl::Hours(100));
  ASSERT_TRUE(above.ok());
  EXPECT_EQ(above->ttl, absl::Hours(2));
  EXPECT_EQ(store.Create("alice", absl::Seconds(-1)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SessionStore, PerUserSessionLimit) {
  FakeClock clock;
  SessionLimits limits;
  limits.max_sessions_per_user = 3;
  SessionStore store(limits, clock.Fn());
  std::vector<std::string> ids;
  for (int i = 0; i < 3; ++i) ids.push_back(MustCreate(store, "bob", absl::Minutes(5 + i)));
  absl::StatusOr<SessionSummary> fourth = store.Create("bob", absl::ZeroDuration());
  EXPECT_EQ(fourth.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(fourth.status().message(), "user 'bob' already has 3 sessions (max_sessions_per_user)");
  EXPECT_TRUE(store.Create("alice", absl::ZeroDuration()).ok());  // per user, not global

  ASSERT_TRUE(store.Close("bob", ids[0]).ok());
  EXPECT_TRUE(store.Create("bob", absl::ZeroDuration()).ok());
  EXPECT_FALSE(store.Create("bob", absl::ZeroDuration()).ok());
  // An expired session stops counting even before the janitor frees it.
  clock.now += absl::Minutes(6);
  EXPECT_TRUE(store.Create("bob", absl::ZeroDuration()).ok());
}

TEST(SessionStore, HookIdsOrderRemoveAndReset) {
  SessionStore store(SessionLimits{});
  const std::string id = MustCreate(store, "alice");
  absl::StatusOr<int64_t> first = store.AddHook("alice", id, Op("blocks.0.hook_resid_pre"), false, kAnyBytes);
  absl::StatusOr<int64_t> second = store.AddHook("alice", id, Op("blocks.1.hook_resid_pre"), false, kAnyBytes);
  absl::StatusOr<int64_t> front = store.AddHook("alice", id, Op("hook_embed"), /*prepend=*/true, kAnyBytes);
  ASSERT_TRUE(first.ok() && second.ok() && front.ok());
  EXPECT_EQ(*first, 1);
  EXPECT_EQ(*second, 2);
  EXPECT_EQ(*front, 3);
  EXPECT_THAT(HookIds(store, "alice", id), ElementsAre(3, 1, 2));
  auto hooks = store.ListHooks("alice", id);
  ASSERT_TRUE(hooks.ok());
  EXPECT_EQ((*hooks)[0].op.hook_name(), "hook_embed");
  EXPECT_TRUE((*hooks)[0].op.has_zero());
  EXPECT_EQ(store.NumHooks(), 3);

  ASSERT_TRUE(store.RemoveHook("alice", id, 1).ok());
  EXPECT_THAT(HookIds(store, "alice", id), ElementsAre(3, 2));
  absl::Status again = store.RemoveHook("alice", id, 1);
  EXPECT_EQ(again.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(again.message(), "hook 1 not found in session '" + id + "'");
  EXPECT_EQ(store.NumHooks(), 2);

  absl::StatusOr<int64_t> removed = store.ResetHooks("alice", id);
  ASSERT_TRUE(removed.ok());
  EXPECT_EQ(*removed, 2);
  EXPECT_THAT(HookIds(store, "alice", id), IsEmpty());
  EXPECT_EQ(store.NumHooks(), 0);
  EXPECT_EQ(*store.ResetHooks("alice", id), 0);
  // Ids are never reused, so a stale id cannot hit a newer hook.
  EXPECT_EQ(*store.AddHook("alice", id, Op("hook_embed"), false, kAnyBytes), 4);
  // Ids are per session.
  const std::string other = MustCreate(store, "alice");
  EXPECT_EQ(*store.AddHook("alice", other, Op("hook_embed"), false, kAnyBytes), 1);
  EXPECT_EQ(store.NumHooks(), 2);
}

TEST(SessionStore, MaxHooksPerSession) {
  SessionLimits limits;
  limits.max_hooks_per_session = 4;
  SessionStore store(limits);
  const std::string id = MustCreate(store, "alice");
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(store.AddHook("alice", id, Op("hook_embed"), false, kAnyBytes).ok());
  absl::StatusOr<int64_t> fifth = store.AddHook("alice", id, Op("hook_embed"), true, kAnyBytes);
  EXPECT_EQ(fifth.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(fifth.status().message()),
              ::testing::HasSubstr("already has 4 hooks (max_hooks_per_session)"));
  EXPECT_EQ(store.NumHooks(), 4);
  ASSERT_TRUE(store.RemoveHook("alice", id, 2).ok());
  EXPECT_TRUE(store.AddHook("alice", id, Op("hook_embed"), false, kAnyBytes).ok());
}

TEST(SessionStore, StoreGetDeleteCaches) {
  SessionStore store(SessionLimits{});
  const std::string id = MustCreate(store, "alice");
  StoredCache cache;
  cache.tensors.emplace_back("blocks.0.hook_resid_post", at::arange(6, at::kFloat).view({1, 2, 3}));
  cache.tensors.emplace_back("blocks.0.attn.hook_pattern", at::ones({1, 2, 2, 2}, at::kBFloat16));
  cache.bytes = 1;  // wrong on purpose: the store counts for itself
  absl::StatusOr<std::string> c1 = store.StoreCache("alice", id, std::move(cache), kNoQuota);
  ASSERT_TRUE(c1.ok()) << c1.status();
  EXPECT_EQ(*c1, "c1");
  absl::StatusOr<std::string> c2 = store.StoreCache("alice", id, CacheOf(400), kNoQuota);
  ASSERT_TRUE(c2.ok());
  EXPECT_EQ(*c2, "c2");
  EXPECT_EQ(store.StoredBytes(), 24 + 16 + 400);
  EXPECT_EQ(store.StoredBytesOf("alice"), 440);

  absl::StatusOr<std::shared_ptr<const StoredCache>> got = store.GetCache("alice", id, "c1");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ((*got)->bytes, 40);
  const at::Tensor* resid = (*got)->Find("blocks.0.hook_resid_post");
  ASSERT_NE(resid, nullptr);
  EXPECT_TRUE(at::equal(*resid, at::arange(6, at::kFloat).view({1, 2, 3})));
  EXPECT_EQ((*got)->Find("blocks.0.hook_z"), nullptr);
  EXPECT_EQ((*got)->tensors[1].first, "blocks.0.attn.hook_pattern");  // order kept

  absl::StatusOr<int64_t> freed = store.DeleteCache("alice", id, "c1");
  ASSERT_TRUE(freed.ok());
  EXPECT_EQ(*freed, 40);
  EXPECT_EQ(store.StoredBytesOf("alice"), 400);
  EXPECT_EQ(store.StoredBytes(), 400);
  // A reader holding the cache keeps it valid after deletion.
  EXPECT_TRUE(at::equal(*(*got)->Find("blocks.0.hook_resid_post"),
                        at::arange(6, at::kFloat).view({1, 2, 3})));

  absl::Status missing = store.GetCache("alice", id, "c1").status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(missing.message(), "cache 'c1' not found in session '" + id + "'");
  EXPECT_EQ(store.DeleteCache("alice", id, "c1").status().code(), absl::StatusCode::kNotFound);
  // Handles are never reused within a session.
  EXPECT_EQ(*store.StoreCache("alice", id, CacheOf(4), kNoQuota), "c3");
}

TEST(SessionStore, ReplaceCacheIsACompareAndSwapChargingTheDifference) {
  SessionStore store(SessionLimits{});
  const std::string id = MustCreate(store, "alice");
  const std::string handle = *store.StoreCache("alice", id, CacheOf(400, "kv.mask"), kNoQuota);
  std::shared_ptr<const StoredCache> v1 = *store.GetCache("alice", id, handle);

  // Growing: only the 600 extra bytes are checked against the quota (1000 total > 800 fails).
  absl::Status over = store.ReplaceCache("alice", id, handle, v1, CacheOf(1000, "kv.mask"), 800);
  EXPECT_EQ(over.code(), absl::StatusCode::kResourceExhausted) << over;
  EXPECT_THAT(std::string(over.message()), HasSubstr("growing cache 'c1' by 600 bytes would exceed"));
  EXPECT_EQ(*store.GetCache("alice", id, handle), v1);  // left as it was
  EXPECT_EQ(store.StoredBytesOf("alice"), 400);

  ASSERT_TRUE(store.ReplaceCache("alice", id, handle, v1, CacheOf(1000, "kv.mask"), 1000).ok());
  std::shared_ptr<const StoredCache> v2 = *store.GetCache("alice", id, handle);
  EXPECT_NE(v2, v1);
  EXPECT_EQ(v2->bytes, 1000);
  EXPECT_EQ(store.StoredBytesOf("alice"), 1000);
  EXPECT_EQ(store.StoredBytes(), 1000);
  EXPECT_EQ(v1->bytes, 400);  // a reader of the old contents keeps them

  // A second writer that read v1 loses: ABORTED, nothing changes.
  absl::Status stale = store.ReplaceCache("alice", id, handle, v1, CacheOf(2000, "kv.mask"), kNoQuota);
  EXPECT_EQ(stale.code(), absl::StatusCode::kAborted) << stale;
  EXPECT_THAT(std::string(stale.message()), HasSubstr("replaced by another run since this run read it"));
  EXPECT_EQ(*store.GetCache("alice", id, handle), v2);
  EXPECT_EQ(store.StoredBytesOf("alice"), 1000);

  // Shrinking refunds.
  ASSERT_TRUE(store.ReplaceCache("alice", id, handle, v2, CacheOf(100, "kv.mask"), kNoQuota).ok());
  EXPECT_EQ(store.StoredBytesOf("alice"), 100);
  EXPECT_EQ(store.StoredBytes(), 100);

  // Deleted meanwhile: NOT_FOUND; another user: PERMISSION_DENIED.
  std::shared_ptr<const StoredCache> v3 = *store.GetCache("alice", id, handle);
  EXPECT_EQ(store.ReplaceCache("bob", id, handle, v3, CacheOf(4), kNoQuota).code(),
            absl::StatusCode::kPermissionDenied);
  ASSERT_TRUE(store.DeleteCache("alice", id, handle).ok());
  EXPECT_EQ(store.ReplaceCache("alice", id, handle, v3, CacheOf(4), kNoQuota).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store.StoredBytes(), 0);
}

TEST(SessionStore, HookValuesCountAgainstTheStoredBytesQuota) {
  SessionLimits limits;
  limits.max_total_stored_bytes = 64 * kMiB;
  SessionStore store(limits);
  const std::string id = MustCreate(store, "dave");
  const int64_t quota = 8 * 1024;
  v1::HookOp big = Op("hook_embed");
  big.mutable_add()->mutable_value()->set_data(std::string(kMiB, '\0'));
  absl::StatusOr<int64_t> refused = store.AddHook("dave", id, big, false, quota);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.status().message(), HasSubstr("session hook values"));
  EXPECT_EQ(store.StoredBytesOf("dave"), 0);

  // A small hook fits and is counted; removing it gives the bytes back.
  v1::HookOp small = Op("hook_embed");
  small.mutable_add()->mutable_value()->set_data(std::string(4096, '\0'));
  absl::StatusOr<int64_t> hook = store.AddHook("dave", id, small, false, quota);
  ASSERT_TRUE(hook.ok()) << hook.status();
  EXPECT_EQ(store.StoredBytesOf("dave"), static_cast<int64_t>(small.ByteSizeLong()));
  EXPECT_FALSE(store.AddHook("dave", id, small, false, quota).ok());  // two would pass 8 KiB
  ASSERT_TRUE(store.RemoveHook("dave", id, *hook).ok());
  EXPECT_EQ(store.StoredBytesOf("dave"), 0);
  ASSERT_TRUE(store.AddHook("dave", id, small, false, quota).ok());
  ASSERT_TRUE(store.ResetHooks("dave", id).ok());
  EXPECT_EQ(store.StoredBytesOf("dave"), 0);
  EXPECT_EQ(store.StoredBytes(), 0);
}

TEST(SessionStore, QuotaCoversAllOfAUsersSessions) {
  SessionStore store(SessionLimits{});
  const std::string one = MustCreate(store, "bob");
  const std::string two = MustCreate(store, "bob");
  const std::string alices = MustCreate(store, "alice");
  const int64_t quota = 2 * kMiB;
  ASSERT_TRUE(store.StoreCache("bob", one, CacheOf(kMiB), quota).ok());
  ASSERT_TRUE(store.StoreCache("bob", two, CacheOf(kMiB / 2), quota).ok());
  EXPECT_EQ(store.StoredBytesOf("bob"), 3 * kMiB / 2);

  absl::StatusOr<std::string> over = store.StoreCache("bob", two, CacheOf(3 * kMiB), quota);
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(over.status().message(),
            "storing 3.0 MiB would exceed user 'bob''s stored cache quota "
            "(max_stored_cache_bytes: caches and session hook values) of 2.0 MiB (1.5 MiB in use)");
  // One byte past the quota fails; exactly up to it succeeds.
  EXPECT_FALSE(store.StoreCache("bob", one, CacheOf(kMiB / 2 + 4), quota).ok());
  EXPECT_TRUE(store.StoreCache("bob", one, CacheOf(kMiB / 2), quota).ok());
  EXPECT_EQ(store.StoredBytesOf("bob"), 2 * kMiB);
  // Another user's quota is separate.
  EXPECT_TRUE(store.StoreCache("alice", alices, CacheOf(2 * kMiB), quota).ok());
  EXPECT_EQ(store.StoredBytes(), 4 * kMiB);

  // Closing a session frees its bytes for the user's other sessions.
  ASSERT_TRUE(store.Close("bob", one).ok());
  EXPECT_EQ(store.StoredBytesOf("bob"), kMiB / 2);
  EXPECT_EQ(store.StoredBytes(), 2 * kMiB + kMiB / 2);
  EXPECT_TRUE(store.StoreCache("bob", two, CacheOf(kMiB), quota).ok());
  ASSERT_TRUE(store.Close("bob", two).ok());
  EXPECT_EQ(store.StoredBytesOf("bob"), 0);
  EXPECT_EQ(store.StoredBytes(), 2 * kMiB);
}

TEST(SessionStore, ExpiredSessionsGiveTheirQuotaBack) {
  FakeClock clock;
  SessionStore store(SessionLimits{}, clock.Fn());
  const std::string short_lived = MustCreate(store, "bob", absl::Minutes(1));
  const std::string long_lived = MustCreate(store, "bob", absl::Hours(1));
  ASSERT_TRUE(store.StoreCache("bob", short_lived, CacheOf(kMiB), kMiB).ok());
  EXPECT_FALSE(store.StoreCache("bob", long_lived, CacheOf(kMiB), kMiB).ok());
  clock.now += absl::Minutes(1);
  // No janitor pass in between: the expired session's bytes are reclaimed on the spot.
  EXPECT_TRUE(store.StoreCache("bob", long_lived, CacheOf(kMiB), kMiB).ok());
  EXPECT_EQ(store.StoredBytesOf("bob"), kMiB);
  EXPECT_EQ(store.StoredBytes(), kMiB);
  EXPECT_EQ(store.NumSessions(), 1);
}

TEST(SessionStore, ServerWideCapCoversEveryUser) {
  FakeClock clock;
  SessionLimits limits;
  limits.max_total_stored_bytes = 3 * kMiB;
  SessionStore store(limits, clock.Fn());
  const std::string alices = MustCreate(store, "alice", absl::Minutes(1));
  const std::string bobs = MustCreate(store, "bob", absl::Hours(1));
  ASSERT_TRUE(store.StoreCache("alice", alices, CacheOf(2 * kMiB), kNoQuota).ok());
  // Within bob's own quota, past the server's capacity: refused without naming alice's usage.
  absl::StatusOr<std::string> over = store.StoreCache("bob", bobs, CacheOf(2 * kMiB), kNoQuota);
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(over.status().message(),
            "storing 2.0 MiB would exceed the server's stored cache capacity of 3.0 MiB (all users "
            "together); delete caches you no longer need (DeleteCache) or retry later");
  EXPECT_TRUE(store.StoreCache("bob", bobs, CacheOf(kMiB), kNoQuota).ok());  // exactly full
  EXPECT_EQ(store.StoredBytes(), 3 * kMiB);
  // Alice's session expires: its bytes are freed on the spot for bob, no janitor pass needed.
  clock.now += absl::Minutes(1);
  EXPECT_TRUE(store.StoreCache("bob", bobs, CacheOf(2 * kMiB), kNoQuota).ok());
  EXPECT_EQ(store.StoredBytes(), 3 * kMiB);
  EXPECT_EQ(store.NumSessions(), 1);
}

TEST(SessionStore, IdsAreLongRandomHexAndDistinct) {
  SessionLimits limits;
  limits.max_sessions_per_user = 2000;
  SessionStore store(limits);
  absl::flat_hash_set<std::string> ids;
  for (int i = 0; i < 1000; ++i) {
    const std::string id = MustCreate(store, "alice");
    ASSERT_EQ(id.size(), 32u) << id;
    for (char c : id) {
      ASSERT_TRUE((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')) << id;
    }
    ids.insert(id);
  }
  EXPECT_EQ(ids.size(), 1000u);
  // Two stores do not share a sequence: random, not a counter seeded the same way.
  SessionStore other(limits);
  EXPECT_FALSE(ids.contains(MustCreate(other, "alice")));
}

TEST(SessionStore, ConcurrentUseKeepsCountsConsistent) {
  SessionLimits limits;
  limits.max_sessions_per_user = 10000;
  SessionStore store(limits);
  constexpr int kThreads = 8;
  constexpr int kRounds = 200;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Half the threads share one owner so per-user bookkeeping is contended too.
      const std::string owner = t % 2 == 0 ? "shared" : "user" + std::to_string(t);
      for (int round = 0; round < kRounds; ++round) {
        absl::StatusOr<SessionSummary> session = store.Create(owner, absl::ZeroDuration());
        if (!session.ok()) {
          ++failures;
          continue;
        }
        for (int h = 0; h < 3; ++h) {
          if (!store.AddHook(owner, session->id, Op("hook_embed"), h == 1, kAnyBytes).ok()) ++failures;
        }
        if (!store.StoreCache(owner, session->id, CacheOf(16), kNoQuota).ok()) ++failures;
        store.List(owner);
        store.ExpireIdle();
        // Close two of every three sessions; the rest stay with 3 hooks and 16 bytes each.
        if (round % 3 != 0 && !store.Close(owner, session->id).ok()) ++failures;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  const int64_t kept_per_thread = (kRounds + 2) / 3;  // rounds 0, 3, 6, ...
  EXPECT_EQ(store.NumSessions(), kThreads * kept_per_thread);
  EXPECT_EQ(store.NumHooks(), 3 * kThreads * kept_per_thread);
  const int64_t per_session = 16 + 3 * EmbedHookBytes();
  EXPECT_EQ(store.StoredBytes(), per_session * kThreads * kept_per_thread);
  EXPECT_EQ(store.StoredBytesOf("shared"), per_session * (kThreads / 2) * kept_per_thread);
  EXPECT_EQ(static_cast<int64_t>(store.List("shared").size()), (kThreads / 2) * kept_per_thread);
  EXPECT_EQ(static_cast<int64_t>(store.ListAll().size()), kThreads * kept_per_thread);
}

}  // namespace
}  // namespace remotelens
