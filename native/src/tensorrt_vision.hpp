// The vision graph on the bundle's TensorRT engines (runtime/vision.py's TensorRTVision): the engines `facellava
// build-engine` made for this GPU and TensorRT version (manifest kind "engine", fields gpu and tensorrt), run with
// TensorRT 10/11's name-based runtime API (NvInferRuntime.h) and the CUDA runtime. Compiled only where CMake found
// TensorRT (FACELLAVA_TENSORRT). Checked by compiling against TensorRT 10.1's public runtime declarations and linking
// against the CUDA runtime without libnvinfer (native/README.md); it has not yet run an engine on a GPU.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "bundle.hpp"
#include "vision.hpp"

namespace facellava {

// {(modality, landmarks): engine file} of `precision` built for GPU 0 with the TensorRT this build links (the GPU's
// name and TensorRT's version as the manifest records them). Empty where there is no CUDA device or no such engine;
// then `why`, when given, says which in a phrase for a one-line error ("no CUDA device (...); ...").
std::map<std::pair<int, bool>, std::string> tensorrt_engines_here(const Bundle& bundle, const std::string& precision,
                                                                  std::string* why = nullptr);

class TensorRtVision : public VisionBackend {
  public:
    TensorRtVision(const Bundle& bundle, std::string precision, std::map<std::pair<int, bool>, std::string> engines);
    ~TensorRtVision() override;
    TensorRtVision(const TensorRtVision&) = delete;
    TensorRtVision& operator=(const TensorRtVision&) = delete;

    VisualTokens encode(Modality modality, const std::vector<float>& pixel_values,
                        const std::vector<float>* landmarks) override;
    const char* name() const override { return "tensorrt"; }

  private:
    struct Engine;
    Engine& engine(Modality modality, bool landmarks);
    const Bundle& bundle_;
    std::string precision_;
    std::map<std::pair<int, bool>, std::string> files_;
    std::map<std::pair<int, bool>, std::unique_ptr<Engine>> engines_;
};

}  // namespace facellava
