// MetricsHttpServer: serves a prometheus-cpp registry as Prometheus text at GET /metrics.
//
// prometheus-cpp's own Exposer (civetweb) cannot start in this process: with Debian's packages,
// civetweb's mg_start fails ("null context when constructing CivetServer") whenever LibTorch is
// linked into the same binary, while the identical program without LibTorch works. So the
// registry and text format stay prometheus-cpp's, and this small HTTP/1.1 responder replaces
// only the transport. It answers one request per connection, bounds request size, and serves
// nothing but /metrics (404 otherwise).
//
//   MetricsHttpServer http(registry);
//   ASSIGN_OR_RETURN(int port, http.Start("127.0.0.1:9464"));
#ifndef REMOTELENS_SERVER_METRICS_HTTP_H_
#define REMOTELENS_SERVER_METRICS_HTTP_H_

#include <prometheus/registry.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace remotelens {

class MetricsHttpServer {
 public:
  explicit MetricsHttpServer(std::shared_ptr<prometheus::Registry> registry);
  ~MetricsHttpServer();  // Stop()
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // Binds host:port (port 0: any free port) and starts serving. Returns the bound port.
  absl::StatusOr<int> Start(const std::string& host_port);
  void Stop();

 private:
  void Loop();
  void Handle(int fd);

  std::shared_ptr<prometheus::Registry> registry_;
  int listen_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace remotelens

#endif  // REMOTELENS_SERVER_METRICS_HTTP_H_
