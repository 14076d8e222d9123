#include "tensorrt_vision.hpp"

#include <cuda_runtime_api.h>
#include <NvInfer.h>

#include <fstream>
#include <iterator>

#include "contract_generated.hpp"
#include "errors.hpp"

namespace facellava {

namespace {

// TensorRT's messages: errors kept for the one-line message, the rest dropped
class Logger : public nvinfer1::ILogger {
  public:
    void log(Severity severity, const char* message) noexcept override {
        if (severity <= Severity::kERROR && message != nullptr) last_error = message;
    }
    std::string last_error;
};

Logger& logger() {
    static Logger instance;
    return instance;
}

void cuda_check(cudaError_t status, const std::string& what) {
    if (status != cudaSuccess) throw Error(what + " failed on the GPU (" + cudaGetErrorString(status) + ")");
}

// tensorrt.__version__ as the manifest records it, e.g. "10.3.0"
std::string tensorrt_version() {
    int version = getInferLibVersion();  // MAJOR * 10000 + MINOR * 100 + PATCH since TensorRT 10
    return std::to_string(version / 10000) + "." + std::to_string(version / 100 % 100) + "." +
           std::to_string(version % 100);
}

bool same_version(const std::string& recorded, const std::string& ours) {
    return recorded == ours || recorded.rfind(ours + ".", 0) == 0;  // a build number after it
}

}  // namespace

std::map<std::pair<int, bool>, std::string> tensorrt_engines_here(const Bundle& bundle, const std::string& precision) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count < 1) return {};
    cudaDeviceProp properties{};
    if (cudaGetDeviceProperties(&properties, 0) != cudaSuccess) return {};
    std::string gpu = properties.name;
    gpu.erase(gpu.find_last_not_of(" \t") + 1);
    std::string version = tensorrt_version();
    std::map<std::pair<int, bool>, std::string> engines;
    for (const auto& name : bundle.find("engine", {{"precision", precision}})) {
        const auto& entry = bundle.files()[name];
        if (entry.value("gpu", "") != gpu || !same_version(entry.value("tensorrt", ""), version)) continue;
        int modality = entry.value("modality", "") == "video" ? static_cast<int>(Modality::video)
                                                               : static_cast<int>(Modality::image);
        engines[{modality, entry.value("landmarks", false)}] = name;
    }
    return engines;
}

// One deserialized engine, its execution context, a stream and device buffers grown on demand.
struct TensorRtVision::Engine {
    std::string name;
    std::unique_ptr<nvinfer1::IRuntime> runtime;
    std::unique_ptr<nvinfer1::ICudaEngine> engine;
    std::unique_ptr<nvinfer1::IExecutionContext> context;
    cudaStream_t stream = nullptr;
    std::map<std::string, std::pair<void*, std::size_t>> buffers;  // device pointer, bytes

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
        for (auto& item : buffers)
            if (item.second.first != nullptr) cudaFree(item.second.first);
        if (stream != nullptr) cudaStreamDestroy(stream);
        context.reset();  // before the engine, the engine before the runtime
        engine.reset();
        runtime.reset();
    }
};

TensorRtVision::TensorRtVision(const Bundle& bundle, std::string precision,
                               std::map<std::pair<int, bool>, std::string> engines)
    : bundle_(bundle), precision_(std::move(precision)), files_(std::move(engines)) {}

TensorRtVision::~TensorRtVision() = default;

VisualTokens TensorRtVision::encode(Modality modality, const std::vector<float>& pixel_values,
                                    const std::vector<float>* landmarks) {
    auto key = std::make_pair(static_cast<int>(modality), landmarks != nullptr);
    auto file = files_.find(key);
    if (file == files_.end()) {
        throw Error("no " + precision_ + " TensorRT engine for " + modality_name(modality) + " " +
                    (landmarks ? "with" : "without") + " landmarks on this device; run `facellava build-engine BUNDLE`");
    }
    auto& slot = engines_[key];
    if (slot == nullptr) {
        auto loaded = std::make_unique<Engine>();
        loaded->name = file->second;
        std::ifstream in(bundle_.path_of(file->second), std::ios::binary);  // verified first, as every file used
        std::string blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        cuda_check(cudaSetDevice(0), "selecting GPU 0");
        logger().last_error.clear();
        loaded->runtime.reset(nvinfer1::createInferRuntime(logger()));
        if (loaded->runtime != nullptr)
            loaded->engine.reset(loaded->runtime->deserializeCudaEngine(blob.data(), blob.size()));
        if (loaded->engine == nullptr) {
            throw Error("TensorRT " + tensorrt_version() + " cannot load " + file->second + " (" + logger().last_error +
                        "): engines only run with the TensorRT version and GPU they were built with; rebuild it here "
                        "with `facellava build-engine`");
        }
        loaded->context.reset(loaded->engine->createExecutionContext());
        if (loaded->context == nullptr) {
            throw Error("TensorRT cannot create an execution context for " + file->second + " (" +
                        logger().last_error + "); free GPU memory or rebuild the engine");
        }
        cuda_check(cudaStreamCreate(&loaded->stream), "creating a CUDA stream");
        slot = std::move(loaded);
    }
    Engine& e = *slot;
    bool video = modality == Modality::video;
    std::map<std::string, std::pair<const float*, std::vector<std::int64_t>>> inputs;
    std::vector<std::int64_t> pixel_shape = {1, 3};
    if (video) pixel_shape.push_back(contract::NUM_FRAMES);
    pixel_shape.insert(pixel_shape.end(), {contract::IMAGE_SIZE, contract::IMAGE_SIZE});
    inputs[contract::VISION_INPUTS[0]] = {pixel_values.data(), pixel_shape};
    if (landmarks != nullptr) {
        std::vector<std::int64_t> shape = {1};
        if (video) shape.push_back(contract::NUM_FRAMES);
        shape.insert(shape.end(), {contract::NUM_LANDMARKS, 2});
        inputs[contract::VISION_INPUTS[1]] = {landmarks->data(), shape};
    }
    std::string output;
    for (int i = 0; i < e.engine->getNbIOTensors(); ++i) {
        const char* tensor = e.engine->getIOTensorName(i);
        if (e.engine->getTensorDataType(tensor) != nvinfer1::DataType::kFLOAT)
            throw Error(e.name + "'s tensor " + tensor + " is not float32; rebuild the engine");
        if (e.engine->getTensorIOMode(tensor) == nvinfer1::TensorIOMode::kOUTPUT) {
            output = tensor;
            continue;
        }
        auto found = inputs.find(tensor);
        if (found == inputs.end()) throw Error(e.name + " takes an input " + tensor + " the contract lacks; rebuild it");
        nvinfer1::Dims dims{};
        dims.nbDims = static_cast<int32_t>(found->second.second.size());
        std::size_t count = 1;
        for (int d = 0; d < dims.nbDims; ++d) {
            dims.d[d] = found->second.second[d];
            count *= static_cast<std::size_t>(found->second.second[d]);
        }
        if (!e.context->setInputShape(tensor, dims))
            throw Error(e.name + " refuses the input shape of " + tensor + " (" + logger().last_error + ")");
        void* device = e.buffer(tensor, count * sizeof(float));
        cuda_check(cudaMemcpyAsync(device, found->second.first, count * sizeof(float), cudaMemcpyHostToDevice,
                                   e.stream), "copying " + std::string(tensor) + " to the GPU");
        e.context->setTensorAddress(tensor, device);
    }
    if (output != contract::VISION_OUTPUT)
        throw Error(e.name + " does not give " + contract::VISION_OUTPUT + "; rebuild the engine");
    nvinfer1::Dims out = e.context->getTensorShape(output.c_str());  // resolved from the input shapes
    std::vector<std::int64_t> want = {1};
    if (video) want.push_back(contract::NUM_FRAMES);
    want.push_back(video ? contract::VIDEO_FRAME_TOKENS : contract::IMAGE_TOKENS);
    bool same = out.nbDims == static_cast<int32_t>(want.size()) + 1 && out.d[out.nbDims - 1] > 0;
    for (std::size_t d = 0; same && d < want.size(); ++d) same = out.d[d] == want[d];
    if (!same) throw Error(e.name + " gives visual tokens of another shape than the contract's; rebuild the engine");
    VisualTokens tokens;
    tokens.blocks = video ? contract::NUM_FRAMES : 1;
    tokens.tokens = static_cast<int>(want.back());
    tokens.width = static_cast<int>(out.d[out.nbDims - 1]);
    tokens.values.resize(static_cast<std::size_t>(tokens.blocks) * tokens.tokens * tokens.width);
    std::size_t bytes = tokens.values.size() * sizeof(float);
    void* device = e.buffer(output, bytes);
    e.context->setTensorAddress(output.c_str(), device);
    logger().last_error.clear();
    if (!e.context->enqueueV3(e.stream))
        throw Error("TensorRT failed to run " + e.name + " (" + logger().last_error + ")");
    cuda_check(cudaMemcpyAsync(tokens.values.data(), device, bytes, cudaMemcpyDeviceToHost, e.stream),
               "copying the visual tokens from the GPU");
    cuda_check(cudaStreamSynchronize(e.stream), "running " + e.name);
    return tokens;
}

}  // namespace facellava
