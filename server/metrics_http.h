// MetricsHttpServer: serves a prometheus-cpp registry as Prometheus text at GET /metrics.
//
// prometheus-cpp's own Exposer (civetweb) cannot start in this process: with Debian's packages,
// civetweb's mg_start fails ("null context when constructing CivetServer") whenever LibTorch is
// linked into the same binary, while the identical program without LibTorch works. So the
// registry and text format stay prometheus-cpp's, and this small HTTP/1.1 responder replaces
// only the transport. It answers one request per connection, bounds request size, and serves
// nothing but /metrics (404 otherwise).
//
// Connections are served concurrently by one poll loop, so idle or trickling clients cannot
// delay a scrape: at most kMaxConnections are open (a new one closes the oldest), and each is
// closed kConnectionDeadline after it was accepted, finished or not.
//
//   MetricsHttpServer http(registry);
//   ASSIGN_OR_RETURN(int port, http.Start("127.0.0.1:9464"));
#ifndef REMOTELENS_SERVER_METRICS_HTTP_H_
#define REMOTELENS_SERVER_METRICS_HTTP_H_

#include <prometheus/registry.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"

namespace remotelens {

class MetricsHttpServer {
 public:
  static constexpr size_t kMaxConnections = 16;
  static constexpr std::chrono::seconds kConnectionDeadline{5};

  explicit MetricsHttpServer(std::shared_ptr<prometheus::Registry> registry);
  ~MetricsHttpServer();  // Stop()
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // Binds host:port (port 0: any free port) and starts serving. Returns the bound port.
  absl::StatusOr<int> Start(const std::string& host_port);
  void Stop();

 private:
  struct Connection {
    int fd = -1;
    std::chrono::steady_clock::time_point deadline;
    std::string request;   // bytes read so far
    std::string response;  // set once the request is complete
    size_t sent = 0;
  };

  void Loop();
  // Reads what is available; prepares the response once the request head is complete. False:
  // the connection is done (closed by the peer, or an error).
  bool OnReadable(Connection& c);
  // Sends what the socket takes. False: the connection is done (all sent, or an error).
  bool OnWritable(Connection& c);
  std::string Respond(const std::string& request) const;

  std::shared_ptr<prometheus::Registry> registry_;
  int listen_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace remotelens

#endif  // REMOTELENS_SERVER_METRICS_HTTP_H_
