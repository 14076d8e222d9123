// The bundle's TensorRT engines (runtime/tensorrt_runner.py's TensorRTRunner and engines_for_this_device): one engine
// runner for the vision graph (runtime/vision.py's TensorRTVision) and the face front end's three graphs
// (runtime/face_graphs.py's tensorrt_networks), run with TensorRT 10/11's name-based runtime API (NvInferRuntime.h)
// and the CUDA runtime. Compiled only where CMake found TensorRT (FACELLAVA_TENSORRT). Checked by compiling against
// TensorRT 10.1's public runtime declarations and linking against the CUDA runtime without libnvinfer
// (native/README.md); it has not yet run an engine on a GPU.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "bundle.hpp"
#include "front_end.hpp"
#include "vision.hpp"

namespace facellava {

// The manifest's entries of `kind` ("engine", "front_end_engine") built for GPU 0 with the TensorRT this build links
// (the GPU's name and TensorRT's version as the manifest records them), in manifest order. Empty where there is no
// CUDA device or no such engine; then `why`, when given, says which in a phrase for a one-line error.
std::vector<std::string> tensorrt_engines_for_this_device(const Bundle& bundle, const std::string& kind,
                                                          std::string* why = nullptr);

// {(modality, landmarks): engine file} of the vision engines of `precision` for this device (see above).
std::map<std::pair<int, bool>, std::string> tensorrt_engines_here(const Bundle& bundle, const std::string& precision,
                                                                  std::string* why = nullptr);

// One deserialized engine of the bundle (verified first), its execution context, its own CUDA stream and device
// buffers grown on demand: float32 inputs by name in, every output by name out (TensorRTRunner.run).
class TensorRtEngine {
  public:
    struct Io {
        std::string name;
        bool input = false;
        std::vector<std::int64_t> shape;  // as the engine declares it, -1 where dynamic
        std::string type;                 // "float32", "float16", ...
    };
    struct Output {
        std::vector<std::int64_t> shape;
        std::vector<float> values;
    };
    // Throws Error when the engine cannot be read, deserialized or given a context (another TensorRT or GPU).
    TensorRtEngine(const Bundle& bundle, const std::string& name);
    ~TensorRtEngine();
    TensorRtEngine(const TensorRtEngine&) = delete;
    TensorRtEngine& operator=(const TensorRtEngine&) = delete;

    const std::string& name() const;
    const std::vector<Io>& io() const;
    // Run on the inputs `names` (float32 `data` of `shapes`; every input of the engine given): the outputs by name.
    // A dynamic input's shape is set, a static one must equal the engine's. Throws Error (a shape the engine
    // refuses, a tensor that is not float32, a CUDA or TensorRT failure).
    std::map<std::string, Output> run(const std::vector<std::string>& names, const std::vector<const float*>& data,
                                      const std::vector<std::vector<std::int64_t>>& shapes);

  private:
    struct State;
    std::unique_ptr<State> state_;
};

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
    TensorRtEngine& engine(Modality modality, bool landmarks);
    const Bundle& bundle_;
    std::string precision_;
    std::map<std::pair<int, bool>, std::string> files_;
    std::map<std::pair<int, bool>, std::unique_ptr<TensorRtEngine>> engines_;
};

// The front end's three networks on the bundle's engines of them (manifest kind "front_end_engine", matched to the
// graphs by their "source") built for this device, as runtime/face_graphs.py's FrontEndGraphs.from_bundle takes them:
// all three or none (empty; `why`, when given, says why). Throws Error when an engine present cannot be loaded or is
// not a front-end graph (one float32 input, float32 outputs).
FrontEndNetworks tensorrt_front_end_networks(const Bundle& bundle, std::string* why = nullptr);

}  // namespace facellava
