#include "tensorrt_vision.hpp"

#include <cuda_runtime_api.h>
#include <NvInferRuntime.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <set>
#include <stdexcept>
#include <vector>

#include "contract_generated.hpp"
#include "errors.hpp"

namespace facellava {

namespace {

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

// TensorRT's messages: the last error kept for the one-line message, the rest dropped. TensorRT calls log() from its
// own threads and through noexcept: nothing here may throw.
class Logger : public nvinfer1::ILogger {
  public:
    void log(Severity severity, const char* message) noexcept override {
        if (severity > Severity::kERROR || message == nullptr) return;
        try {
            last_error = first_line(message);
        } catch (...) {
        }
    }
    std::string last_error;
};

Logger& logger() {
    static Logger instance;
    return instance;
}

std::string cuda_error(cudaError_t status) {
    return std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
}

void cuda_check(cudaError_t status, const std::string& what) {
    if (status != cudaSuccess) throw Error(what + " failed on the GPU (" + cuda_error(status) + ")");
}

// tensorrt.__version__ as the manifest records it, e.g. "10.3.0" (a pip wheel's adds the build: "10.9.0.34")
std::string tensorrt_version() {
    int version = getInferLibVersion();  // (MAJOR * 100 + MINOR) * 100 + PATCH since TensorRT 10
    return std::to_string(version / 10000) + "." + std::to_string(version / 100 % 100) + "." +
           std::to_string(version % 100);
}

bool same_version(const std::string& recorded, const std::string& ours) {
    return recorded == ours || recorded.rfind(ours + ".", 0) == 0;  // a build number after it
}

std::string type_name(nvinfer1::DataType type) {
    switch (type) {
        case nvinfer1::DataType::kFLOAT: return "float32";
        case nvinfer1::DataType::kHALF: return "float16";
        case nvinfer1::DataType::kBF16: return "bfloat16";
        case nvinfer1::DataType::kINT8: return "int8";
        case nvinfer1::DataType::kUINT8: return "uint8";
        case nvinfer1::DataType::kINT32: return "int32";
        case nvinfer1::DataType::kINT64: return "int64";
        case nvinfer1::DataType::kBOOL: return "bool";
        default: return "TensorRT type " + std::to_string(static_cast<int>(type));
    }
}

std::string shape_text(const nvinfer1::Dims& dims) {
    std::string text = "[";
    for (int d = 0; d < dims.nbDims; ++d)
        text += (d ? "," : "") + (dims.d[d] < 0 ? std::string("?") : std::to_string(dims.d[d]));
    return text + "]";
}

std::string names_text(const std::set<std::string>& names) {
    std::string text = "[";
    for (const auto& name : names) text += (text.size() > 1 ? ", " : "") + name;
    return text + "]";
}

}  // namespace

std::map<std::pair<int, bool>, std::string> tensorrt_engines_here(const Bundle& bundle, const std::string& precision,
                                                                  std::string* why) {
    std::string reason;
    if (why == nullptr) why = &reason;
    int count = 0;
    cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess || count < 1) {
        *why = "no CUDA device (" + (status != cudaSuccess ? cuda_error(status) : std::string("none found")) +
               "); give --vision onnxruntime";
        return {};
    }
    cudaDeviceProp properties{};
    status = cudaGetDeviceProperties(&properties, 0);
    if (status != cudaSuccess) {
        *why = "CUDA device 0 cannot be queried (" + cuda_error(status) + "); give --vision onnxruntime";
        return {};
    }
    // runtime/tensorrt_runner.py's gpu_info: the name with its whitespace stripped
    std::string gpu = properties.name;
    const char* space = " \t\n\r\f\v";
    gpu.erase(gpu.find_last_not_of(space) + 1);
    gpu.erase(0, std::min(gpu.size(), gpu.find_first_not_of(space)));
    std::string version = tensorrt_version();
    std::map<std::pair<int, bool>, std::string> engines;
    for (const auto& name : bundle.find("engine", {{"precision", precision}})) {
        const auto& entry = bundle.files().at(name);
        if (entry.value("gpu", "") != gpu || !same_version(entry.value("tensorrt", ""), version)) continue;
        int modality = entry.value("modality", "") == "video" ? static_cast<int>(Modality::video)
                                                               : static_cast<int>(Modality::image);
        engines[{modality, entry.value("landmarks", false)}] = name;
    }
    if (engines.empty()) {
        *why = "none built for " + gpu + " with TensorRT " + version +
               "; build them with `facellava build-engine BUNDLE`";
    }
    return engines;
}

// One deserialized engine, its execution context, a stream and device buffers grown on demand. TensorRT 10 objects
// are deleted with `delete` (their destructors are public), the context before the engine, the engine before the
// runtime: the members are destroyed in the reverse order of their declaration.
struct TensorRtVision::Engine {
    std::string name;
    std::unique_ptr<nvinfer1::IRuntime> runtime;
    std::unique_ptr<nvinfer1::ICudaEngine> engine;
    std::unique_ptr<nvinfer1::IExecutionContext> context;
    cudaStream_t stream = nullptr;
    std::map<std::string, std::pair<void*, std::size_t>> buffers;  // device pointer, bytes

    Engine() = default;
    Engine(const Engine&) = delete;
    Engine& operator=(const Engine&) = delete;

    void* buffer(const std::string& tensor, std::size_t bytes) {
        auto& [pointer, size] = buffers[tensor];
        if (size < bytes) {
            if (pointer != nullptr) cudaFree(pointer);
            pointer = nullptr;
            size = 0;
            cuda_check(cudaMalloc(&pointer, bytes), "allocating " + std::to_string(bytes) + " bytes for " + name);
            size = bytes;
        }
        return pointer;
    }

    ~Engine() {
        if (stream != nullptr) cudaStreamSynchronize(stream);  // nothing may still use the buffers
        for (auto& item : buffers)
            if (item.second.first != nullptr) cudaFree(item.second.first);
        if (stream != nullptr) cudaStreamDestroy(stream);
    }
};

TensorRtVision::TensorRtVision(const Bundle& bundle, std::string precision,
                               std::map<std::pair<int, bool>, std::string> engines)
    : bundle_(bundle), precision_(std::move(precision)), files_(std::move(engines)) {}

TensorRtVision::~TensorRtVision() = default;

TensorRtVision::Engine& TensorRtVision::engine(Modality modality, bool landmarks) {
    auto key = std::make_pair(static_cast<int>(modality), landmarks);
    if (auto found = engines_.find(key); found != engines_.end()) return *found->second;
    auto file = files_.find(key);
    if (file == files_.end()) {
        throw Error("no " + precision_ + " TensorRT engine for " + modality_name(modality) + " " +
                    (landmarks ? "with" : "without") +
                    " landmarks on this device; run `facellava build-engine BUNDLE`");
    }
    auto loaded = std::make_unique<Engine>();
    loaded->name = file->second;
    std::ifstream in(bundle_.path_of(file->second), std::ios::binary);  // verified first, as every file used
    if (!in) throw Error("cannot open " + file->second + " in " + bundle_.root().string());
    std::string blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    cuda_check(cudaSetDevice(0), "selecting GPU 0");
    logger().last_error.clear();
    loaded->runtime.reset(nvinfer1::createInferRuntime(logger()));
    if (loaded->runtime == nullptr)
        throw Error("TensorRT " + tensorrt_version() + " cannot start (" + logger().last_error + ")");
    loaded->engine.reset(loaded->runtime->deserializeCudaEngine(blob.data(), blob.size()));
    if (loaded->engine == nullptr) {
        throw Error("TensorRT " + tensorrt_version() + " cannot load " + file->second + " (" + logger().last_error +
                    "): engines only run with the TensorRT version and GPU they were built with; rebuild it here "
                    "with `facellava build-engine`");
    }
    // runtime/vision.py's check_vision_io: the contract's input and output names, all float32
    std::set<std::string> want_inputs = {contract::VISION_INPUTS[0]}, inputs, outputs;
    if (landmarks) want_inputs.insert(contract::VISION_INPUTS[1]);
    std::vector<std::string> problems;
    for (int i = 0; i < loaded->engine->getNbIOTensors(); ++i) {
        const char* tensor = loaded->engine->getIOTensorName(i);
        nvinfer1::TensorIOMode mode = loaded->engine->getTensorIOMode(tensor);
        (mode == nvinfer1::TensorIOMode::kINPUT ? inputs : outputs).insert(tensor);
        nvinfer1::DataType type = loaded->engine->getTensorDataType(tensor);
        if (type != nvinfer1::DataType::kFLOAT)
            problems.push_back(std::string(tensor) + " of type " + type_name(type) + ", expected float32");
    }
    if (inputs != want_inputs)
        problems.insert(problems.begin(), "inputs " + names_text(inputs) + ", expected " + names_text(want_inputs));
    if (outputs != std::set<std::string>{contract::VISION_OUTPUT}) {
        problems.insert(problems.begin(), "outputs " + names_text(outputs) + ", expected [" +
                                              contract::VISION_OUTPUT + "]");
    }
    if (!problems.empty()) {
        std::string joined;
        for (const auto& problem : problems) joined += (joined.empty() ? "" : "; ") + problem;
        throw Error(file->second + " is not the contract's " + modality_name(modality) + " vision graph " +
                    (landmarks ? "with" : "without") + " landmarks (" + joined + "); export the bundle again");
    }
    loaded->context.reset(loaded->engine->createExecutionContext());
    if (loaded->context == nullptr) {
        throw Error("TensorRT cannot create an execution context for " + file->second + " (" +
                    logger().last_error + "); free GPU memory or rebuild the engine");
    }
    cuda_check(cudaStreamCreate(&loaded->stream), "creating a CUDA stream");
    return *engines_.emplace(key, std::move(loaded)).first->second;
}

VisualTokens TensorRtVision::encode(Modality modality, const std::vector<float>& pixel_values,
                                    const std::vector<float>* landmarks) {
    Engine& e = engine(modality, landmarks != nullptr);
    bool video = modality == Modality::video;
    std::vector<std::int64_t> pixel_shape = {1, 3};
    if (video) pixel_shape.push_back(contract::NUM_FRAMES);
    pixel_shape.insert(pixel_shape.end(), {contract::IMAGE_SIZE, contract::IMAGE_SIZE});
    std::vector<std::pair<std::string, std::pair<const std::vector<float>*, std::vector<std::int64_t>>>> inputs = {
        {contract::VISION_INPUTS[0], {&pixel_values, pixel_shape}}};
    if (landmarks != nullptr) {
        std::vector<std::int64_t> shape = {1};
        if (video) shape.push_back(contract::NUM_FRAMES);
        shape.insert(shape.end(), {contract::NUM_LANDMARKS, 2});
        inputs.push_back({contract::VISION_INPUTS[1], {landmarks, shape}});
    }
    for (const auto& [tensor, input] : inputs) {
        const auto& [values, shape] = input;
        nvinfer1::Dims dims{};
        dims.nbDims = static_cast<int32_t>(shape.size());
        std::size_t count = 1;
        for (int d = 0; d < dims.nbDims; ++d) {
            dims.d[d] = shape[d];
            count *= static_cast<std::size_t>(shape[d]);
        }
        if (values->size() != count)  // the caller's preprocessing gives exactly this: a bug otherwise
            throw std::invalid_argument(tensor + " has " + std::to_string(values->size()) + " values, not " +
                                        std::to_string(count));
        logger().last_error.clear();
        if (!e.context->setInputShape(tensor.c_str(), dims)) {
            throw Error(e.name + " refuses " + tensor + " of shape " + shape_text(dims) + " (" + logger().last_error +
                        "); rebuild it with `facellava build-engine`");
        }
        void* device = e.buffer(tensor, count * sizeof(float));
        cuda_check(cudaMemcpyAsync(device, values->data(), count * sizeof(float), cudaMemcpyHostToDevice, e.stream),
                   "copying " + tensor + " to the GPU");
        if (!e.context->setTensorAddress(tensor.c_str(), device))
            throw Error("TensorRT refuses the GPU buffer of " + tensor + " (" + logger().last_error + ")");
    }
    const char* output = contract::VISION_OUTPUT;
    nvinfer1::Dims out = e.context->getTensorShape(output);  // resolved from the input shapes
    std::vector<std::int64_t> want = {1};
    if (video) want.push_back(contract::NUM_FRAMES);
    want.push_back(video ? contract::VIDEO_FRAME_TOKENS : contract::IMAGE_TOKENS);
    bool same = out.nbDims == static_cast<int32_t>(want.size()) + 1 && out.d[out.nbDims - 1] > 0;
    for (std::size_t d = 0; same && d < want.size(); ++d) same = out.d[d] == want[d];
    if (!same) {
        nvinfer1::Dims expected{};
        expected.nbDims = static_cast<int32_t>(want.size()) + 1;
        for (std::size_t d = 0; d < want.size(); ++d) expected.d[d] = want[d];
        expected.d[want.size()] = -1;
        throw Error(e.name + " gives visual tokens of shape " + shape_text(out) + ", expected " +
                    shape_text(expected) + "; export the bundle again");
    }
    VisualTokens tokens;
    tokens.blocks = video ? contract::NUM_FRAMES : 1;
    tokens.tokens = static_cast<int>(want.back());
    tokens.width = static_cast<int>(out.d[out.nbDims - 1]);
    tokens.values.resize(static_cast<std::size_t>(tokens.blocks) * tokens.tokens * tokens.width);
    std::size_t bytes = tokens.values.size() * sizeof(float);
    void* device = e.buffer(output, bytes);
    logger().last_error.clear();
    if (!e.context->setTensorAddress(output, device))
        throw Error("TensorRT refuses the GPU buffer of " + std::string(output) + " (" + logger().last_error + ")");
    if (!e.context->enqueueV3(e.stream))
        throw Error("TensorRT failed to run " + e.name + " (" + logger().last_error + ")");
    cuda_check(cudaMemcpyAsync(tokens.values.data(), device, bytes, cudaMemcpyDeviceToHost, e.stream),
               "copying the visual tokens from the GPU");
    cuda_check(cudaStreamSynchronize(e.stream), "running " + e.name);
    return tokens;
}

}  // namespace facellava
