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
#include "front_end_generated.hpp"

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

std::vector<std::int64_t> shape_of(const nvinfer1::Dims& dims) {
    std::vector<std::int64_t> shape;
    for (int d = 0; d < dims.nbDims; ++d) shape.push_back(dims.d[d]);
    return shape;
}

nvinfer1::Dims dims_of(const std::vector<std::int64_t>& shape) {
    nvinfer1::Dims dims{};
    dims.nbDims = static_cast<int32_t>(shape.size());
    for (int d = 0; d < dims.nbDims; ++d) dims.d[d] = shape[d];
    return dims;
}

}  // namespace

std::vector<std::string> tensorrt_engines_for_this_device(const Bundle& bundle, const std::string& kind,
                                                          std::string* why) {
    std::string reason;
    if (why == nullptr) why = &reason;
    int count = 0;
    cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess || count < 1) {
        *why = "no CUDA device (" + (status != cudaSuccess ? cuda_error(status) : std::string("none found")) + ")";
        return {};
    }
    cudaDeviceProp properties{};
    status = cudaGetDeviceProperties(&properties, 0);
    if (status != cudaSuccess) {
        *why = "CUDA device 0 cannot be queried (" + cuda_error(status) + ")";
        return {};
    }
    // runtime/tensorrt_runner.py's gpu_info: the name with its whitespace stripped
    std::string gpu = properties.name;
    const char* space = " \t\n\r\f\v";
    gpu.erase(gpu.find_last_not_of(space) + 1);
    gpu.erase(0, std::min(gpu.size(), gpu.find_first_not_of(space)));
    std::string version = tensorrt_version();
    std::vector<std::string> names;
    for (const auto& name : bundle.find(kind)) {
        const auto& entry = bundle.files().at(name);
        if (entry.value("gpu", "") == gpu && same_version(entry.value("tensorrt", ""), version)) names.push_back(name);
    }
    if (names.empty()) {
        *why = "none built for " + gpu + " with TensorRT " + version +
               "; build them with `facellava build-engine BUNDLE`";
    }
    return names;
}

std::map<std::pair<int, bool>, std::string> tensorrt_engines_here(const Bundle& bundle, const std::string& precision,
                                                                  std::string* why) {
    std::string reason;
    if (why == nullptr) why = &reason;
    std::map<std::pair<int, bool>, std::string> engines;
    for (const auto& name : tensorrt_engines_for_this_device(bundle, "engine", why)) {
        const auto& entry = bundle.files().at(name);
        if (entry.value("precision", "") != precision) continue;
        int modality = entry.value("modality", "") == "video" ? static_cast<int>(Modality::video)
                                                               : static_cast<int>(Modality::image);
        engines[{modality, entry.value("landmarks", false)}] = name;
    }
    if (engines.empty() && why->empty()) *why = "none of precision " + precision + "; build them with "
                                                "`facellava build-engine BUNDLE --precision " + precision + "`";
    if (why->rfind("no CUDA device", 0) == 0 || why->rfind("CUDA device 0", 0) == 0) *why += "; give --vision onnxruntime";
    return engines;
}

// TensorRT 10 objects are deleted with `delete` (their destructors are public), the context before the engine, the
// engine before the runtime: the members are destroyed in the reverse order of their declaration.
struct TensorRtEngine::State {
    std::string name;
    std::vector<Io> io;
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

    ~State() {
        if (stream != nullptr) cudaStreamSynchronize(stream);  // nothing may still use the buffers
        for (auto& item : buffers)
            if (item.second.first != nullptr) cudaFree(item.second.first);
        if (stream != nullptr) cudaStreamDestroy(stream);
    }
};

TensorRtEngine::TensorRtEngine(const Bundle& bundle, const std::string& name) : state_(std::make_unique<State>()) {
    State& s = *state_;
    s.name = name;
    std::ifstream in(bundle.path_of(name), std::ios::binary);  // verified first, as every file used
    if (!in) throw Error("cannot open " + name + " in " + bundle.root().string());
    std::string blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    cuda_check(cudaSetDevice(0), "selecting GPU 0");
    logger().last_error.clear();
    s.runtime.reset(nvinfer1::createInferRuntime(logger()));
    if (s.runtime == nullptr)
        throw Error("TensorRT " + tensorrt_version() + " cannot start (" + logger().last_error + ")");
    s.engine.reset(s.runtime->deserializeCudaEngine(blob.data(), blob.size()));
    if (s.engine == nullptr) {
        throw Error("TensorRT " + tensorrt_version() + " cannot load " + name + " (" + logger().last_error +
                    "): engines only run with the TensorRT version and GPU they were built with; rebuild it here "
                    "with `facellava build-engine`");
    }
    for (int i = 0; i < s.engine->getNbIOTensors(); ++i) {
        Io io;
        io.name = s.engine->getIOTensorName(i);
        io.input = s.engine->getTensorIOMode(io.name.c_str()) == nvinfer1::TensorIOMode::kINPUT;
        io.shape = shape_of(s.engine->getTensorShape(io.name.c_str()));
        io.type = type_name(s.engine->getTensorDataType(io.name.c_str()));
        s.io.push_back(std::move(io));
    }
    s.context.reset(s.engine->createExecutionContext());
    if (s.context == nullptr) {
        throw Error("TensorRT cannot create an execution context for " + name + " (" + logger().last_error +
                    "); free GPU memory or rebuild the engine");
    }
    cuda_check(cudaStreamCreate(&s.stream), "creating a CUDA stream");
}

TensorRtEngine::~TensorRtEngine() = default;

const std::string& TensorRtEngine::name() const { return state_->name; }

const std::vector<TensorRtEngine::Io>& TensorRtEngine::io() const { return state_->io; }

std::map<std::string, TensorRtEngine::Output> TensorRtEngine::run(const std::vector<std::string>& names,
                                                                  const std::vector<const float*>& data,
                                                                  const std::vector<std::vector<std::int64_t>>& shapes) {
    State& s = *state_;
    if (names.size() != data.size() || names.size() != shapes.size())
        throw std::invalid_argument("TensorRtEngine::run: names, data and shapes differ in length");
    for (const auto& io : s.io) {
        if (io.type != "float32") {
            throw Error(s.name + "'s " + (io.input ? "input " : "output ") + io.name + " is " + io.type +
                        ", not float32; rebuild it from the bundle's graph with `facellava build-engine`");
        }
        if (io.input && std::find(names.begin(), names.end(), io.name) == names.end())
            throw std::invalid_argument(s.name + " needs the input " + io.name);  // the callers give them all: a bug
    }
    for (std::size_t i = 0; i < names.size(); ++i) {
        const std::string& tensor = names[i];
        auto io = std::find_if(s.io.begin(), s.io.end(), [&](const Io& x) { return x.input && x.name == tensor; });
        if (io == s.io.end()) throw std::invalid_argument(s.name + " has no input " + tensor);
        nvinfer1::Dims dims = dims_of(shapes[i]);
        bool dynamic = std::any_of(io->shape.begin(), io->shape.end(), [](std::int64_t d) { return d < 0; });
        logger().last_error.clear();
        if (dynamic ? !s.context->setInputShape(tensor.c_str(), dims) : io->shape != shapes[i]) {
            throw Error(s.name + " refuses " + tensor + " of shape " + shape_text(dims) + " (it takes " +
                        shape_text(dims_of(io->shape)) + (logger().last_error.empty() ? "" : "; " + logger().last_error) +
                        "); rebuild it with `facellava build-engine`");
        }
        std::size_t count = 1;
        for (std::int64_t d : shapes[i]) count *= static_cast<std::size_t>(d);
        void* device = s.buffer(tensor, count * sizeof(float));
        cuda_check(cudaMemcpyAsync(device, data[i], count * sizeof(float), cudaMemcpyHostToDevice, s.stream),
                   "copying " + tensor + " to the GPU");
        if (!s.context->setTensorAddress(tensor.c_str(), device))
            throw Error("TensorRT refuses the GPU buffer of " + tensor + " (" + logger().last_error + ")");
    }
    std::map<std::string, Output> outputs;
    for (const auto& io : s.io) {
        if (io.input) continue;
        nvinfer1::Dims dims = s.context->getTensorShape(io.name.c_str());  // resolved from the input shapes
        Output& out = outputs[io.name];
        out.shape = shape_of(dims);
        std::size_t count = 1;
        for (std::int64_t d : out.shape) {
            if (d < 0) throw Error(s.name + "'s output " + io.name + " has no shape (" + shape_text(dims) + ")");
            count *= static_cast<std::size_t>(d);
        }
        out.values.resize(count);
        void* device = s.buffer(io.name, std::max<std::size_t>(count, 1) * sizeof(float));
        if (!s.context->setTensorAddress(io.name.c_str(), device))
            throw Error("TensorRT refuses the GPU buffer of " + io.name + " (" + logger().last_error + ")");
    }
    if (!s.context->enqueueV3(s.stream)) throw Error("TensorRT failed to run " + s.name + " (" + logger().last_error + ")");
    for (auto& [tensor, out] : outputs) {
        cuda_check(cudaMemcpyAsync(out.values.data(), s.buffers.at(tensor).first, out.values.size() * sizeof(float),
                                   cudaMemcpyDeviceToHost, s.stream),
                   "copying " + tensor + " from the GPU");
    }
    cuda_check(cudaStreamSynchronize(s.stream), "running " + s.name);
    return outputs;
}

TensorRtVision::TensorRtVision(const Bundle& bundle, std::string precision,
                               std::map<std::pair<int, bool>, std::string> engines)
    : bundle_(bundle), precision_(std::move(precision)), files_(std::move(engines)) {}

TensorRtVision::~TensorRtVision() = default;

TensorRtEngine& TensorRtVision::engine(Modality modality, bool landmarks) {
    auto key = std::make_pair(static_cast<int>(modality), landmarks);
    if (auto found = engines_.find(key); found != engines_.end()) return *found->second;
    auto file = files_.find(key);
    if (file == files_.end()) {
        throw Error("no " + precision_ + " TensorRT engine for " + modality_name(modality) + " " +
                    (landmarks ? "with" : "without") +
                    " landmarks on this device; run `facellava build-engine BUNDLE`");
    }
    auto loaded = std::make_unique<TensorRtEngine>(bundle_, file->second);
    // runtime/vision.py's check_vision_io: the contract's input and output names, all float32
    std::set<std::string> want_inputs = {contract::VISION_INPUTS[0]}, inputs, outputs;
    if (landmarks) want_inputs.insert(contract::VISION_INPUTS[1]);
    std::vector<std::string> problems;
    for (const auto& io : loaded->io()) {
        (io.input ? inputs : outputs).insert(io.name);
        if (io.type != "float32") problems.push_back(io.name + " of type " + io.type + ", expected float32");
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
    return *engines_.emplace(key, std::move(loaded)).first->second;
}

VisualTokens TensorRtVision::encode(Modality modality, const std::vector<float>& pixel_values,
                                    const std::vector<float>* landmarks) {
    TensorRtEngine& e = engine(modality, landmarks != nullptr);
    VisionShapes expected = vision_shapes(modality);
    std::vector<std::string> names = {contract::VISION_INPUTS[0]};
    std::vector<const float*> data = {pixel_values.data()};
    std::vector<std::vector<std::int64_t>> shapes = {expected.pixel_values};
    if (landmarks != nullptr) {
        names.push_back(contract::VISION_INPUTS[1]);
        data.push_back(landmarks->data());
        shapes.push_back(expected.landmarks);
    }
    for (std::size_t i = 0; i < names.size(); ++i) {
        std::size_t count = 1;
        for (std::int64_t d : shapes[i]) count *= static_cast<std::size_t>(d);
        const std::vector<float>& values = i == 0 ? pixel_values : *landmarks;
        if (values.size() != count)  // the caller's preprocessing gives exactly this: a bug otherwise
            throw std::invalid_argument(names[i] + " has " + std::to_string(values.size()) + " values, not " +
                                        std::to_string(count));
    }
    auto outputs = e.run(names, data, shapes);
    TensorRtEngine::Output& out = outputs.at(contract::VISION_OUTPUT);
    if (!matches_tokens(out.shape, expected.tokens)) {
        throw Error(e.name() + " gives visual tokens of shape " + shape_text(dims_of(out.shape)) + ", expected " +
                    shape_text(dims_of(expected.tokens)) + "; export the bundle again");
    }
    VisualTokens tokens;
    tokens.blocks = modality == Modality::video ? contract::NUM_FRAMES : 1;
    tokens.tokens = static_cast<int>(expected.tokens[expected.tokens.size() - 2]);
    tokens.width = static_cast<int>(out.shape.back());
    tokens.values = std::move(out.values);
    return tokens;
}

namespace {

// face_graphs.py's _EngineNetwork: a front-end engine as a network
class EngineNetwork : public FrontEndNetwork {
  public:
    EngineNetwork(const Bundle& bundle, const std::string& name) : engine_(bundle, name) {
        std::vector<std::string> problems;
        for (const auto& io : engine_.io()) {
            if (io.input) inputs_.push_back(io.name);
            else outputs_.push_back(io.name);
            if (io.type != "float32") problems.push_back(io.name + " is " + io.type);
        }
        if (inputs_.size() != 1) problems.insert(problems.begin(), std::to_string(inputs_.size()) + " inputs");
        if (!problems.empty()) {
            std::string joined;
            for (const auto& problem : problems) joined += (joined.empty() ? "" : "; ") + problem;
            throw Error(name + " is not a front-end graph's engine (one float32 NHWC input, float32 outputs: " +
                        joined + "); rebuild it with `facellava build-engine`");
        }
    }
    const std::string& name() const override { return engine_.name(); }
    std::vector<std::string> output_names() const override { return outputs_; }
    std::vector<NetworkOutput> run(const std::vector<float>& tensor, const std::vector<std::int64_t>& shape) override {
        std::size_t count = 1;
        for (std::int64_t d : shape) count *= static_cast<std::size_t>(d);
        if (tensor.size() != count)  // image_to_tensor gives exactly this: a bug otherwise
            throw std::invalid_argument(name() + "'s input has " + std::to_string(tensor.size()) + " values, not " +
                                        std::to_string(count));
        auto outputs = engine_.run({inputs_[0]}, {tensor.data()}, {shape});
        std::vector<NetworkOutput> ordered;
        for (const auto& output : outputs_) {
            NetworkOutput out;
            out.name = output;
            out.shape = std::move(outputs.at(output).shape);
            out.values = std::move(outputs.at(output).values);
            ordered.push_back(std::move(out));
        }
        return ordered;
    }

  private:
    TensorRtEngine engine_;
    std::vector<std::string> inputs_, outputs_;
};

}  // namespace

FrontEndNetworks tensorrt_front_end_networks(const Bundle& bundle, std::string* why) {
    std::string reason;
    if (why == nullptr) why = &reason;
    // FrontEndGraphs.from_bundle: {source graph: engine}, then the three or none
    std::map<std::string, std::string> engines;
    for (const auto& name : tensorrt_engines_for_this_device(bundle, front_end::FRONT_END_ENGINE_KIND, why))
        engines[bundle.files().at(name).value("source", "")] = name;
    const std::pair<const char*, const char*> models[] = {{"short_range", front_end::SHORT_RANGE_FILE},
                                                          {"full_range", front_end::FULL_RANGE_FILE},
                                                          {"mesh", front_end::MESH_FILE}};
    std::string missing;
    for (const auto& [model, graph] : models)
        if (!engines.count(graph)) missing += (missing.empty() ? "" : ", ") + std::string(graph);
    if (!missing.empty()) {
        if (why->empty()) *why = "no engine of " + missing + " for this device";
        return {};
    }
    FrontEndNetworks networks;
    for (const auto& [model, graph] : models) networks[model] = std::make_unique<EngineNetwork>(bundle, engines[graph]);
    return networks;
}

}  // namespace facellava
