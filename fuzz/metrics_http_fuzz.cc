// Fuzzes the /metrics HTTP request reader: one MetricsHttpServer on a loopback port for the
// whole run; each input is sent on a fresh connection, the write side is closed, and the reply is
// read. Invariant: every reply is empty (the reader gave up on an incomplete request) or a
// complete HTTP/1.1 response with status 200, 404 or 405.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <prometheus/counter.h>
#include <prometheus/registry.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>

#include "fuzz/fuzz_util.h"
#include "server/metrics_http.h"

namespace {

int Port() {
  static const int port = [] {
    auto registry = std::make_shared<prometheus::Registry>();
    prometheus::BuildCounter().Name("fuzz_total").Help("fuzz").Register(*registry).Add({}).Increment();
    auto* server = new remotelens::MetricsHttpServer(registry);  // lives for the whole run
    absl::StatusOr<int> bound = server->Start("127.0.0.1:0");
    if (!bound.ok()) std::abort();
    return *bound;
  }();
  return port;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const int port = Port();
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {  // the backlog may be full a moment
    fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    FUZZ_CHECK(fd >= 0);
    // Close with a reset: at ~15k connections a second, TIME_WAIT would use up the ephemeral
    // ports within seconds and connect() would fail with EADDRNOTAVAIL.
    const linger reset{1, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      ::close(fd);
      fd = -1;
      ::usleep(1000);
    }
  }
  FUZZ_CHECK(fd >= 0);
  size_t sent = 0;
  while (sent < size) {
    const ssize_t n = ::send(fd, data + sent, size - sent, MSG_NOSIGNAL);
    if (n <= 0) break;  // the server may stop reading at its request size bound
    sent += static_cast<size_t>(n);
  }
  ::shutdown(fd, SHUT_WR);
  std::string reply;
  char buffer[4096];
  for (int reads = 0; reads < 1024; ++reads) {
    const ssize_t n = ::recv(fd, buffer, sizeof(buffer), 0);
    if (n <= 0) break;
    reply.append(buffer, static_cast<size_t>(n));
  }
  ::close(fd);
  if (!reply.empty()) {
    FUZZ_CHECK(reply.rfind("HTTP/1.1 200 ", 0) == 0 || reply.rfind("HTTP/1.1 404 ", 0) == 0 ||
               reply.rfind("HTTP/1.1 405 ", 0) == 0);
    FUZZ_CHECK(reply.find("\r\n\r\n") != std::string::npos);
  }
  return 0;
}
