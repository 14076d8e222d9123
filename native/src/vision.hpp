// The vision graph on ONNX Runtime (CPU): the bundle's graph for the modality, precision and landmark use that
// runtime/vision.py picks, checked against the contract's inputs and outputs, run on the preprocessed pixels.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bundle.hpp"
#include "media.hpp"

namespace facellava {

struct OnnxGraph;

// Visual tokens of one medium: `blocks` blocks (1 image, 8 video frames) of `tokens` rows of `width` floats.
struct VisualTokens {
    int blocks = 0;
    int tokens = 0;
    int width = 0;
    std::vector<float> values;
    const float* block(int i) const { return values.data() + static_cast<std::size_t>(i) * tokens * width; }
};

// The contract's tensors of one request (batch 1) of a modality, as every backend feeds and checks them.
struct VisionShapes {
    std::vector<std::int64_t> pixel_values;  // [1,3,224,224] or [1,3,8,224,224]
    std::vector<std::int64_t> landmarks;     // [1,68,2] or [1,8,68,2]
    std::vector<std::int64_t> tokens;        // [1,256,-1] or [1,8,256,-1]: the width (-1) is the graph's own
};
VisionShapes vision_shapes(Modality modality);
// Whether `shape` is `want` (VisionShapes::tokens) with a positive width in place of its -1.
bool matches_tokens(const std::vector<std::int64_t>& shape, const std::vector<std::int64_t>& want);

// A vision backend: visual tokens of the preprocessed pixels (runtime/vision.py's VisionBackend).
class VisionBackend {
  public:
    virtual ~VisionBackend() = default;
    // pixel values [1,3,224,224] or [1,3,8,224,224]; landmarks [1,68,2] or [1,8,68,2] (crop pixels / 256), or none
    virtual VisualTokens encode(Modality modality, const std::vector<float>& pixel_values,
                                const std::vector<float>* landmarks) = 0;
    virtual const char* name() const = 0;
};

class OnnxVision : public VisionBackend {
  public:
    // `device`: the execution providers (onnx_session.hpp's execution_providers), checked here
    OnnxVision(const Bundle& bundle, std::string precision = "fp32", std::string device = "cpu");
    ~OnnxVision() override;
    OnnxVision(const OnnxVision&) = delete;
    OnnxVision& operator=(const OnnxVision&) = delete;

    VisualTokens encode(Modality modality, const std::vector<float>& pixel_values,
                        const std::vector<float>* landmarks) override;
    const char* name() const override { return "onnxruntime"; }

  private:
    OnnxGraph& graph(Modality modality, bool landmarks);
    const Bundle& bundle_;
    std::string precision_;
    std::string device_;
    std::map<std::pair<int, bool>, std::unique_ptr<OnnxGraph>> graphs_;
};

}  // namespace facellava
