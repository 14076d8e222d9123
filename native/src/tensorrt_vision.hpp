// The vision graph on the bundle's TensorRT engines (runtime/vision.py's TensorRTVision): the engines `facellava
// build-engine` made for this GPU and TensorRT version (manifest kind "engine", fields gpu and tensorrt), run with
// TensorRT 10/11's name-based API and the CUDA runtime. Compiled only where CMake found TensorRT
// (FACELLAVA_TENSORRT); this machine has no TensorRT, so it was written against the API's documentation and has
// not been compiled or run here.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "bundle.hpp"
#include "vision.hpp"

namespace facellava {

// {(modality, landmarks): engine file} of `precision` built for GPU 0 with the TensorRT this build links (the GPU's
// name and TensorRT's version as the manifest records them); empty where there is no CUDA device.
std::map<std::pair<int, bool>, std::string> tensorrt_engines_here(const Bundle& bundle, const std::string& precision);

class TensorRtVision : public VisionBackend {
  public:
    TensorRtVision(const Bundle& bundle, std::string precision, std::map<std::pair<int, bool>, std::string> engines);
    ~TensorRtVision() override;
    VisualTokens encode(Modality modality, const std::vector<float>& pixel_values,
                        const std::vector<float>* landmarks) override;
    const char* name() const override { return "tensorrt"; }

  private:
    struct Engine;
    const Bundle& bundle_;
    std::string precision_;
    std::map<std::pair<int, bool>, std::string> files_;
    std::map<std::pair<int, bool>, std::unique_ptr<Engine>> engines_;
};

}  // namespace facellava
