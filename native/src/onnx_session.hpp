// One home for ONNX Runtime here: the process's environment, a bundle graph opened as a session (the file verified
// by the bundle first, one message when ONNX Runtime cannot load it), its inputs and outputs, and a run with
// failures turned into that same kind of message. The vision graph and the face front end's graphs both use it.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <onnxruntime_cxx_api.h>

#include "bundle.hpp"

namespace facellava {

// The first line of an ONNX Runtime message, cut at `limit` characters.
std::string first_line(const std::string& text, std::size_t limit = 300);

// The ONNX Runtime execution providers a device asks for, as runtime/ort_providers.py chooses them: "auto" the best
// installed (TensorRT, its engines and timing cache in the user's cache directory's onnxruntime-tensorrt, then
// CUDA, then the CPU), "tensorrt" or "cuda" insisting on it (the rest as fallback for ops it lacks), "cpu" the CPU
// alone. Throws Error for an unknown device or one this ONNX Runtime library lacks.
inline constexpr const char* DEVICES[] = {"auto", "cpu", "cuda", "tensorrt"};
inline constexpr const char* TENSORRT_CACHE = "onnxruntime-tensorrt";
std::vector<std::string> execution_providers(const std::string& device);

// "[1,3,?,224]"
std::string shape_text(const std::vector<std::int64_t>& shape);

struct OnnxGraph {
    struct Io {
        std::string name;
        std::vector<std::int64_t> shape;  // -1 where open
        ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // UNDEFINED: not a tensor
    };
    std::string name;  // the manifest's file name
    std::vector<Io> inputs, outputs;

    // Open the bundle's file `name` (verified: inside the bundle, its sha256) on `device`'s execution providers
    // (execution_providers) with `threads` intra-op threads (0: ONNX Runtime's default), idle workers not
    // spinning. `remedy` ends the message when ONNX Runtime cannot load it ("export the bundle again"). Throws Error.
    static std::unique_ptr<OnnxGraph> open(const Bundle& bundle, const std::string& name, int threads,
                                           const std::string& remedy, const std::string& device = "cpu");
    std::vector<std::string> providers;  // the execution providers asked for, best first
    // Run with float32 inputs (`names`, their data and shapes) and fetch the outputs `wanted` (empty: every output,
    // in `outputs`' order). Throws Error.
    std::vector<Ort::Value> run(const std::vector<std::string>& names, const std::vector<const float*>& data,
                                const std::vector<std::vector<std::int64_t>>& shapes,
                                const std::vector<std::string>& wanted = {});

  private:
    Ort::Session session_{nullptr};
    std::string remedy_;
};

}  // namespace facellava
