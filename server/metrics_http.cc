#include "server/metrics_http.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <prometheus/text_serializer.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace remotelens {
namespace {

constexpr size_t kMaxRequestBytes = 8192;

std::string Response(const char* status, const char* content_type, const std::string& body) {
  return absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", content_type,
                      "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n", body);
}

}  // namespace

MetricsHttpServer::MetricsHttpServer(std::shared_ptr<prometheus::Registry> registry)
    : registry_(std::move(registry)) {}

MetricsHttpServer::~MetricsHttpServer() { Stop(); }

absl::StatusOr<int> MetricsHttpServer::Start(const std::string& host_port) {
  const size_t colon = host_port.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(host_port.substr(colon + 1), &port) ||
      port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("metrics address \"", host_port, "\" is not host:port"));
  }
  std::string host = host_port.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* info = nullptr;
  if (getaddrinfo(host.empty() ? nullptr : host.c_str(), std::to_string(port).c_str(), &hints, &info) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("cannot resolve metrics host \"", host, "\""));
  }
  int fd = -1;
  for (addrinfo* a = info; a != nullptr && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) != 0 || ::listen(fd, 64) != 0) {
      ::close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(info);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for metrics on ", host_port, ": ",
                                               std::strerror(errno)));
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  const int bound_port = ntohs(bound.ss_family == AF_INET6
                                   ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                   : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  listen_fd_ = fd;
  thread_ = std::thread([this] { Loop(); });
  return bound_port;
}

void MetricsHttpServer::Stop() {
  if (!thread_.joinable()) return;
  stop_ = true;
  thread_.join();
  ::close(listen_fd_);
  listen_fd_ = -1;
}

void MetricsHttpServer::Loop() {
  std::vector<Connection> connections;
  std::vector<pollfd> polled;
  while (!stop_) {
    polled.clear();
    polled.push_back({listen_fd_, POLLIN, 0});
    for (const Connection& c : connections) {
      polled.push_back({c.fd, static_cast<short>(c.response.empty() ? POLLIN : POLLOUT), 0});
    }
    // Wakes up regularly to notice Stop() and deadlines.
    if (::poll(polled.data(), polled.size(), 200) < 0 && errno != EINTR) continue;
    const auto now = std::chrono::steady_clock::now();
    std::vector<Connection> open;
    open.reserve(connections.size() + 1);
    for (size_t i = 0; i < connections.size(); ++i) {
      Connection& c = connections[i];
      const short events = polled[i + 1].revents;
      bool keep = now < c.deadline;
      if (keep && (events & (POLLERR | POLLHUP | POLLNVAL)) && !(events & POLLIN)) keep = false;
      if (keep && (events & POLLIN)) keep = OnReadable(c);
      if (keep && (events & POLLOUT)) keep = OnWritable(c);
      if (keep) {
        open.push_back(std::move(c));
      } else {
        ::close(c.fd);
      }
    }
    connections = std::move(open);
    if (polled[0].revents & POLLIN) {
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd >= 0) {
        // Full: the oldest connection makes room, so idle clients cannot lock a scraper out.
        if (connections.size() >= kMaxConnections) {
          ::close(connections.front().fd);
          connections.erase(connections.begin());
        }
        Connection c;
        c.fd = fd;
        c.deadline = now + kConnectionDeadline;
        connections.push_back(std::move(c));
      }
    }
  }
  for (const Connection& c : connections) ::close(c.fd);
}

bool MetricsHttpServer::OnReadable(Connection& c) {
  char buffer[1024];
  const ssize_t n = ::recv(c.fd, buffer, sizeof(buffer), 0);
  if (n == 0) return false;
  if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
  c.request.append(buffer, static_cast<size_t>(n));
  if (c.request.find("\r\n\r\n") != std::string::npos || c.request.size() >= kMaxRequestBytes) {
    c.response = Respond(c.request);
    return OnWritable(c);  // usually all of it fits the socket buffer at once
  }
  return true;
}

bool MetricsHttpServer::OnWritable(Connection& c) {
  while (c.sent < c.response.size()) {
    const ssize_t n = ::send(c.fd, c.response.data() + c.sent, c.response.size() - c.sent,
                             MSG_NOSIGNAL);
    if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
    c.sent += static_cast<size_t>(n);
  }
  return false;  // everything sent: close
}

std::string MetricsHttpServer::Respond(const std::string& request) const {
  if (absl::StartsWith(request, "GET /metrics ") || absl::StartsWith(request, "GET /metrics?")) {
    const std::string body = prometheus::TextSerializer().Serialize(registry_->Collect());
    return Response("200 OK", "text/plain; version=0.0.4; charset=utf-8", body);
  }
  if (absl::StartsWith(request, "GET ")) {
    return Response("404 Not Found", "text/plain", "only /metrics is served here\n");
  }
  return Response("405 Method Not Allowed", "text/plain", "GET /metrics\n");
}

}  // namespace remotelens
