#include "server/echo.h"

#include <string>

#include "gtest/gtest.h"

namespace remotelens {
namespace {

TEST(Echo, ShortTextIsUnchanged) {
  EXPECT_EQ(Echo("c1"), "c1");
  const std::string exact(kMaxEchoBytes, 'x');
  EXPECT_EQ(Echo(exact), exact);
}

TEST(Echo, LongTextIsCutAndSaysHowLong) {
  const std::string id(8192, 'a');
  const std::string echoed = Echo(id);
  EXPECT_EQ(echoed, std::string(kMaxEchoBytes, 'a') + "...(8192 bytes)");
}

TEST(Echo, CutsAtACharacterBoundary) {
  // 63 ASCII bytes then a 2-byte character straddling the cut at 64.
  const std::string text = std::string(kMaxEchoBytes - 1, 'a') + "\xc3\xa9" + std::string(100, 'b');
  EXPECT_EQ(Echo(text), std::string(kMaxEchoBytes - 1, 'a') + "...(" +
                            std::to_string(text.size()) + " bytes)");
}

}  // namespace
}  // namespace remotelens
