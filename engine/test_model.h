// Test-only: small generated models for unit tests (written under $TEST_TMPDIR).
//
//   static TestModel* m = new TestModel(MakeTestModel("my_test", SmallSpec(64, 2, 32)));
//   m->model->Forward(...);
//
// or, for a suite whose tests share one model made before the first of them:
//
//   struct FooTestModel {
//     static constexpr char kName[] = "foo_test";
//     static DemoModelSpec Spec() { return SmallSpec(64, 2, 32); }
//   };
//   using FooTest = SharedModelTest<FooTestModel>;
//   TEST_F(FooTest, ...) { model_->Forward(...); }
#ifndef REMOTELENS_ENGINE_TEST_MODEL_H_
#define REMOTELENS_ENGINE_TEST_MODEL_H_

#include <memory>
#include <string>

#include "engine/demo_model.h"
#include "engine/llama_model.h"
#include "gtest/gtest.h"

namespace remotelens {

// A small model with grouped-query attention (4 query heads, 2 key/value heads) and llama3 rope
// scaling, d_mlp = 1.5 d_model, the demo tokenizer's 512-token vocabulary.
DemoModelSpec SmallSpec(int64_t d_model, int64_t n_layers, int64_t n_ctx);

struct TestModel {
  std::string dir;
  std::unique_ptr<LlamaModel> model;
};

// Writes `spec` to $TEST_TMPDIR/`name` and loads it; aborts (failing the test binary) if either
// step fails, since nothing in the suite can run without it.
TestModel MakeTestModel(const std::string& name, const DemoModelSpec& spec,
                        const LoadOptions& options = LoadOptions());

// A gtest fixture whose tests share the model `Model` describes (Model::kName, Model::Spec()).
template <typename Model>
class SharedModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    test_model_ = new TestModel(MakeTestModel(Model::kName, Model::Spec()));
    model_ = test_model_->model.get();
  }
  static void TearDownTestSuite() {
    delete test_model_;
    test_model_ = nullptr;
    model_ = nullptr;
  }
  static inline TestModel* test_model_ = nullptr;
  static inline LlamaModel* model_ = nullptr;
};

}  // namespace remotelens

#endif  // REMOTELENS_ENGINE_TEST_MODEL_H_
