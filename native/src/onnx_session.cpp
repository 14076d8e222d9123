#include "onnx_session.hpp"

#include <filesystem>
#include <set>

#include "errors.hpp"

namespace facellava {

namespace {

// One environment per process (ONNX Runtime's logging and thread state live there), made on first use.
Ort::Env& environment() {
    static Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "facellava");
    return env;
}

// runtime/ort_providers.py's _ORDER: what each device asks for, best first
std::vector<std::string> order_of(const std::string& device) {
    if (device == "tensorrt") return {"TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"};
    if (device == "cuda") return {"CUDAExecutionProvider", "CPUExecutionProvider"};
    return {"CPUExecutionProvider"};
}

// The providers after the first call to ONNX Runtime (a CPU-only library lists CPUExecutionProvider alone).
void append_provider(Ort::SessionOptions& options, const std::string& provider) {
    const OrtApi& api = Ort::GetApi();
    if (provider == "CUDAExecutionProvider") {
        OrtCUDAProviderOptionsV2* cuda = nullptr;
        Ort::ThrowOnError(api.CreateCUDAProviderOptions(&cuda));
        std::unique_ptr<OrtCUDAProviderOptionsV2, void (*)(OrtCUDAProviderOptionsV2*)> owned(
            cuda, api.ReleaseCUDAProviderOptions);
        options.AppendExecutionProvider_CUDA_V2(*cuda);
    } else if (provider == "TensorrtExecutionProvider") {
        // the engines and timing cache kept in the user's cache, as Python's provider keeps them: only the first
        // start builds them (minutes for a vision graph)
        std::filesystem::path cache = user_cache_dir() / TENSORRT_CACHE;
        std::error_code ignored;
        std::filesystem::create_directories(cache, ignored);
        std::string path = cache.string();
        const char* keys[] = {"trt_engine_cache_enable", "trt_engine_cache_path", "trt_timing_cache_enable",
                              "trt_timing_cache_path"};
        const char* values[] = {"1", path.c_str(), "1", path.c_str()};
        OrtTensorRTProviderOptionsV2* tensorrt = nullptr;
        Ort::ThrowOnError(api.CreateTensorRTProviderOptions(&tensorrt));
        std::unique_ptr<OrtTensorRTProviderOptionsV2, void (*)(OrtTensorRTProviderOptionsV2*)> owned(
            tensorrt, api.ReleaseTensorRTProviderOptions);
        Ort::ThrowOnError(api.UpdateTensorRTProviderOptions(tensorrt, keys, values, 4));
        options.AppendExecutionProvider_TensorRT_V2(*tensorrt);
    }  // the CPU provider is always there, last
}

}  // namespace

std::vector<std::string> execution_providers(const std::string& device) {
    std::string names;
    bool known = false;
    for (const char* d : DEVICES) {
        known = known || device == d;
        names += (names.empty() ? "" : ", ") + std::string(d);
    }
    if (!known) throw Error("unknown device '" + device + "'; choose from " + names);
    std::vector<std::string> listed = Ort::GetAvailableProviders();
    std::set<std::string> available(listed.begin(), listed.end());
    std::string chosen = device;
    if (device == "auto") {
        chosen = "cpu";
        for (const char* d : {"tensorrt", "cuda"})
            if (available.count(order_of(d).front())) {
                chosen = d;
                break;
            }
    } else if (!available.count(order_of(device).front())) {
        std::string have;
        for (const auto& name : available) have += (have.empty() ? "" : ", ") + name;
        throw Error("onnxruntime " + Ort::GetVersionString() + " has no " + order_of(device).front() + " (it has " +
                    have + "); install onnxruntime-gpu, with TensorRT for 'tensorrt'");
    }
    std::vector<std::string> providers;
    for (const auto& name : order_of(chosen))
        if (available.count(name)) providers.push_back(name);
    return providers;
}

std::string first_line(const std::string& text, std::size_t limit) {
    std::string line = text.substr(0, text.find('\n'));
    return line.size() <= limit ? line : line.substr(0, limit) + "...";
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
    std::string out = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) out += (i ? "," : "") + (shape[i] < 0 ? "?" : std::to_string(shape[i]));
    return out + "]";
}

std::unique_ptr<OnnxGraph> OnnxGraph::open(const Bundle& bundle, const std::string& name, int threads,
                                           const std::string& remedy, const std::string& device) {
    auto graph = std::make_unique<OnnxGraph>();
    graph->providers = execution_providers(device);
    graph->name = name;
    graph->remedy_ = remedy;
    std::string path = bundle.path_of(name).string();
    Ort::SessionOptions options;
    options.SetLogSeverityLevel(3);
    if (threads > 0) options.SetIntraOpNumThreads(threads);
    // ORT's worker threads otherwise spin after each run and take the cores llama.cpp decodes on
    options.AddConfigEntry("session.intra_op.allow_spinning", "0");
    for (const auto& provider : graph->providers) {
        try {
            append_provider(options, provider);
        } catch (const Ort::Exception& error) {
            throw Error("ONNX Runtime cannot start its " + provider + " (" + first_line(error.what()) +
                        "); check the GPU's driver and libraries, or give --device cpu");
        }
    }
    try {
        graph->session_ = Ort::Session(environment(), path.c_str(), options);
    } catch (const Ort::Exception& error) {
        throw Error("ONNX Runtime cannot load " + name + " from " + bundle.root().string() + " (" +
                    first_line(error.what()) + "); " + remedy);
    }
    Ort::AllocatorWithDefaultOptions allocator;
    for (bool inputs : {true, false}) {
        std::size_t count = inputs ? graph->session_.GetInputCount() : graph->session_.GetOutputCount();
        for (std::size_t i = 0; i < count; ++i) {
            Io io;
            io.name = (inputs ? graph->session_.GetInputNameAllocated(i, allocator)
                              : graph->session_.GetOutputNameAllocated(i, allocator)).get();
            auto info = inputs ? graph->session_.GetInputTypeInfo(i) : graph->session_.GetOutputTypeInfo(i);
            if (info.GetONNXType() == ONNX_TYPE_TENSOR) {
                auto tensor = info.GetTensorTypeAndShapeInfo();
                io.shape = tensor.GetShape();
                io.type = tensor.GetElementType();
            }
            (inputs ? graph->inputs : graph->outputs).push_back(std::move(io));
        }
    }
    return graph;
}

std::vector<Ort::Value> OnnxGraph::run(const std::vector<std::string>& names, const std::vector<const float*>& data,
                                       const std::vector<std::vector<std::int64_t>>& shapes,
                                       const std::vector<std::string>& wanted) {
    auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<Ort::Value> values;
    std::vector<const char*> input_names;
    for (std::size_t i = 0; i < data.size(); ++i) {
        std::size_t count = 1;
        for (auto d : shapes[i]) count *= static_cast<std::size_t>(d);
        values.push_back(Ort::Value::CreateTensor<float>(memory, const_cast<float*>(data[i]), count, shapes[i].data(),
                                                         shapes[i].size()));
        input_names.push_back(names.at(i).c_str());
    }
    std::vector<const char*> output_names;
    if (wanted.empty())
        for (const auto& output : outputs) output_names.push_back(output.name.c_str());
    else
        for (const auto& output : wanted) output_names.push_back(output.c_str());
    try {
        return session_.Run(Ort::RunOptions{nullptr}, input_names.data(), values.data(), values.size(),
                            output_names.data(), output_names.size());
    } catch (const Ort::Exception& error) {
        throw Error("ONNX Runtime failed to run " + name + " (" + first_line(error.what()) + "); " + remedy_);
    }
}

}  // namespace facellava
