#include "vision.hpp"

#include <set>

#include "contract_generated.hpp"
#include "errors.hpp"
#include "onnx_session.hpp"

namespace facellava {

namespace {

// contract.vision_graph_io: {name: shape}, -1 where the contract leaves the dimension open (batch, width)
std::map<std::string, std::vector<std::int64_t>> contract_io(Modality modality, bool landmarks, bool inputs) {
    std::vector<std::int64_t> frames;
    std::int64_t tokens = contract::IMAGE_TOKENS;
    if (modality == Modality::video) {
        frames = {contract::NUM_FRAMES};
        tokens = contract::VIDEO_FRAME_TOKENS;
    }
    std::map<std::string, std::vector<std::int64_t>> io;
    if (inputs) {
        std::vector<std::int64_t> pixels = {-1, 3};
        pixels.insert(pixels.end(), frames.begin(), frames.end());
        pixels.insert(pixels.end(), {contract::IMAGE_SIZE, contract::IMAGE_SIZE});
        io[contract::VISION_INPUTS[0]] = pixels;
        if (landmarks) {
            std::vector<std::int64_t> points = {-1};
            points.insert(points.end(), frames.begin(), frames.end());
            points.insert(points.end(), {contract::NUM_LANDMARKS, 2});
            io[contract::VISION_INPUTS[1]] = points;
        }
    } else {
        std::vector<std::int64_t> out = {-1};
        out.insert(out.end(), frames.begin(), frames.end());
        out.insert(out.end(), {tokens, -1});
        io[contract::VISION_OUTPUT] = out;
    }
    return io;
}

std::string vision_file(const Bundle& bundle, Modality modality, const std::string& precision, bool landmarks) {
    auto names = bundle.find("vision", {{"modality", modality_name(modality)}, {"precision", precision},
                                        {"landmarks", landmarks}});
    if (!names.empty()) return names.front();
    std::set<std::string> have;
    for (const auto& [name, entry] : bundle.files().items()) {
        if (entry.value("kind", "") != "vision") continue;
        have.insert(entry.value("modality", "?") + "/" + entry.value("precision", "?") + "/" +
                    (entry.value("landmarks", false) ? "landmarks" : "no landmarks"));
    }
    std::string listed;
    for (const auto& item : have) listed += (listed.empty() ? "" : ", ") + item;
    std::string m = modality_name(modality);
    throw Error(bundle.root().string() + " has no " + precision + " " + m + " vision graph " +
                (landmarks ? "with" : "without") + " landmarks (it has: " + (listed.empty() ? "none" : listed) +
                "); export one with `facellava export vision --modalities " + m + " --precision " + precision + "`");
}

}  // namespace

OnnxVision::OnnxVision(const Bundle& bundle, std::string precision, std::string device)
    : bundle_(bundle), precision_(std::move(precision)), device_(std::move(device)) {
    execution_providers(device_);  // an unknown or missing one refused before the LLM loads
}

OnnxVision::~OnnxVision() = default;

OnnxGraph& OnnxVision::graph(Modality modality, bool landmarks) {
    auto key = std::make_pair(static_cast<int>(modality), landmarks);
    auto found = graphs_.find(key);
    if (found != graphs_.end()) return *found->second;
    auto graph = OnnxGraph::open(bundle_, vision_file(bundle_, modality, precision_, landmarks), 0,
                                 "export the bundle again", device_);
    // the graph's inputs and outputs against the contract (runtime/vision.py's check_vision_io)
    std::string variant = std::string("the contract's ") + modality_name(modality) + " vision graph " +
                          (landmarks ? "with" : "without") + " landmarks";
    std::vector<std::string> problems;
    for (bool inputs : {true, false}) {
        auto want = contract_io(modality, landmarks, inputs);
        std::map<std::string, std::pair<std::vector<std::int64_t>, ONNXTensorElementDataType>> have;
        for (const auto& io : inputs ? graph->inputs : graph->outputs) have[io.name] = {io.shape, io.type};
        std::set<std::string> want_names, have_names;
        for (const auto& item : want) want_names.insert(item.first);
        for (const auto& item : have) have_names.insert(item.first);
        if (want_names != have_names) {
            problems.push_back(std::string(inputs ? "inputs" : "outputs") + " differ from the contract's");
            continue;
        }
        for (const auto& [name, shape] : want) {
            const auto& [have_shape, type] = have[name];
            bool same = have_shape.size() == shape.size();
            for (std::size_t d = 0; same && d < shape.size(); ++d)
                if (shape[d] >= 0 && have_shape[d] >= 0 && shape[d] != have_shape[d]) same = false;
            if (!same) problems.push_back(name + " " + shape_text(have_shape) + ", expected " + shape_text(shape));
            else if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) problems.push_back(name + " is not float32");
        }
    }
    if (!problems.empty()) {
        std::string joined;
        for (const auto& p : problems) joined += (joined.empty() ? "" : "; ") + p;
        throw Error(graph->name + " is not " + variant + " (" + joined + "); export the bundle again");
    }
    return *graphs_.emplace(key, std::move(graph)).first->second;
}

VisionShapes vision_shapes(Modality modality) {
    bool video = modality == Modality::video;
    VisionShapes shapes;
    shapes.pixel_values = {1, 3};
    shapes.landmarks = {1};
    shapes.tokens = {1};
    if (video) {
        for (auto* shape : {&shapes.pixel_values, &shapes.landmarks, &shapes.tokens})
            shape->push_back(contract::NUM_FRAMES);
    }
    shapes.pixel_values.insert(shapes.pixel_values.end(), {contract::IMAGE_SIZE, contract::IMAGE_SIZE});
    shapes.landmarks.insert(shapes.landmarks.end(), {contract::NUM_LANDMARKS, 2});
    shapes.tokens.insert(shapes.tokens.end(), {video ? contract::VIDEO_FRAME_TOKENS : contract::IMAGE_TOKENS, -1});
    return shapes;
}

bool matches_tokens(const std::vector<std::int64_t>& shape, const std::vector<std::int64_t>& want) {
    bool same = shape.size() == want.size() && shape.back() > 0;
    for (std::size_t d = 0; same && d + 1 < want.size(); ++d) same = shape[d] == want[d];
    return same;
}

VisualTokens OnnxVision::encode(Modality modality, const std::vector<float>& pixel_values,
                                const std::vector<float>* landmarks) {
    OnnxGraph& g = graph(modality, landmarks != nullptr);
    VisionShapes expected = vision_shapes(modality);
    std::vector<std::string> names = {contract::VISION_INPUTS[0]};
    std::vector<const float*> inputs = {pixel_values.data()};
    std::vector<std::vector<std::int64_t>> shapes = {expected.pixel_values};
    if (landmarks != nullptr) {
        names.push_back(contract::VISION_INPUTS[1]);
        inputs.push_back(landmarks->data());
        shapes.push_back(expected.landmarks);
    }
    std::vector<Ort::Value> outputs = g.run(names, inputs, shapes, {contract::VISION_OUTPUT});
    auto info = outputs[0].GetTensorTypeAndShapeInfo();
    std::vector<std::int64_t> shape = info.GetShape();
    if (!matches_tokens(shape, expected.tokens) || info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        throw Error(g.name + " returned visual tokens of shape " + shape_text(shape) + ", expected " +
                    shape_text(expected.tokens) + "; export the bundle again");
    }
    VisualTokens tokens;
    tokens.blocks = modality == Modality::video ? contract::NUM_FRAMES : 1;
    tokens.tokens = static_cast<int>(expected.tokens[expected.tokens.size() - 2]);
    tokens.width = static_cast<int>(shape.back());
    const float* data = outputs[0].GetTensorData<float>();
    tokens.values.assign(data, data + info.GetElementCount());
    return tokens;
}

}  // namespace facellava
