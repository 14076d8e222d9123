#include "onnx_session.hpp"

#include "errors.hpp"

namespace facellava {

namespace {

// One environment per process (ONNX Runtime's logging and thread state live there), made on first use.
Ort::Env& environment() {
    static Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "facellava");
    return env;
}

}  // namespace

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
                                           const std::string& remedy) {
    auto graph = std::make_unique<OnnxGraph>();
    graph->name = name;
    graph->remedy_ = remedy;
    std::string path = bundle.path_of(name).string();
    Ort::SessionOptions options;
    options.SetLogSeverityLevel(3);
    if (threads > 0) options.SetIntraOpNumThreads(threads);
    // ORT's worker threads otherwise spin after each run and take the cores llama.cpp decodes on
    options.AddConfigEntry("session.intra_op.allow_spinning", "0");
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
