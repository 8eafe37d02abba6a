#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include "gtest/gtest.h"
#include "absl/status/statusor.h"
#include "engine/status_macros.h"
absl::StatusOr<int> F(bool ok) { if (!ok) return absl::InvalidArgumentError("x"); return 3; }
absl::Status G(bool ok) { ASSIGN_OR_RETURN(int v, F(ok)); return v == 3 ? absl::OkStatus() : absl::InternalError("v"); }
TEST(Smoke, Torch) { auto t = at::ones({2, 3}); EXPECT_EQ(t.sum().item<float>(), 6.f); EXPECT_TRUE(G(true).ok()); EXPECT_FALSE(G(false).ok()); printf("threads %d\n", at::get_num_threads()); }
