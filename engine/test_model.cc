#include "engine/test_model.h"

#include <cstdio>
#include <cstdlib>

#include "engine/model_dir.h"

namespace remotelens {

DemoModelSpec SmallSpec(int64_t d_model, int64_t n_layers, int64_t n_ctx) {
  DemoModelSpec spec;
  spec.d_model = d_model;
  spec.n_layers = n_layers;
  spec.n_heads = 4;
  spec.n_kv_heads = 2;
  spec.d_mlp = d_model * 3 / 2;
  spec.n_ctx = n_ctx;
  return spec;
}

TestModel MakeTestModel(const std::string& name, const DemoModelSpec& spec,
                        const LoadOptions& options) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  TestModel out;
  out.dir = std::string(tmp ? tmp : "/tmp") + "/" + name;
  absl::Status written = WriteDemoModel(out.dir, spec);
  auto model = written.ok() ? LoadModelDir(out.dir, options) : written;
  if (!model.ok()) {
    std::fprintf(stderr, "MakeTestModel(%s): %s\n", name.c_str(), model.status().ToString().c_str());
    std::abort();
  }
  out.model = std::move(*model);
  return out;
}

}  // namespace remotelens
