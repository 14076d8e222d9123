// The face front end on the bundle's graphs, statement by statement as runtime/face_graphs.py (MediaPipe's
// processing around the networks) and runtime/face.py (the detection search, the face choice, the official crop,
// the 478 -> 68 mapping) state it, with the same OpenCV functions. Where numpy computes in float32 this does too
// (the detections' decoding, suppression and projection), in the same order, so that the pixel boxes, and so the
// crops, come out the same; numpy's pairwise summation is reproduced where its sums are.
#include "front_end.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <numeric>

#include <opencv2/imgproc.hpp>

#include "contract_generated.hpp"
#include "errors.hpp"
#include "front_end_generated.hpp"
#include "onnx_session.hpp"

namespace facellava {

namespace fe = front_end;

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point start) { return std::chrono::duration<double, std::milli>(Clock::now() - start).count(); }

cv::Mat as_mat(const Rgb& rgb) {
    return cv::Mat(rgb.height, rgb.width, CV_8UC3, const_cast<std::uint8_t*>(rgb.data.data()));
}

Rgb to_rgb(const cv::Mat& mat) {
    cv::Mat contiguous = mat.isContinuous() ? mat : mat.clone();
    Rgb rgb;
    rgb.height = contiguous.rows;
    rgb.width = contiguous.cols;
    rgb.data.assign(contiguous.data, contiguous.data + static_cast<std::size_t>(rgb.height) * rgb.width * 3);
    return rgb;
}

// Python's round(): halves to even (the default rounding mode)
long py_round(double value) { return std::lrint(value); }

// a rotated rectangle in pixels (face_graphs.Roi)
struct Roi {
    double center_x, center_y, width, height, rotation = 0.0;
};

const fe::DetectorSpec& spec_of(const std::string& model) {
    if (model == fe::SHORT_RANGE.name) return fe::SHORT_RANGE;
    if (model == fe::FULL_RANGE.name) return fe::FULL_RANGE;
    throw std::invalid_argument("unknown detector " + model);
}

// face_graphs.ssd_anchors: anchor centres (x, y), float32 of the doubles
std::vector<std::array<float, 2>> ssd_anchors(const fe::DetectorSpec& spec) {
    std::vector<std::array<float, 2>> centres;
    int layer = 0;
    while (layer < spec.num_strides) {
        int stride = spec.strides[layer];
        int same = 1;
        while (layer + same < spec.num_strides && spec.strides[layer + same] == stride) ++same;
        int per_cell = same * (spec.interpolated ? 2 : 1);
        int cells = (spec.side + stride - 1) / stride;
        for (int y = 0; y < cells; ++y)
            for (int x = 0; x < cells; ++x)
                for (int k = 0; k < per_cell; ++k)
                    centres.push_back({static_cast<float>((x + 0.5) / cells), static_cast<float>((y + 0.5) / cells)});
        layer += same;
    }
    return centres;
}

// face_graphs.image_to_tensor: the rectangle warped onto a side x side tensor (cv2.boxPoints corners to the
// tensor's corners, getPerspectiveTransform, warpPerspective bilinear), uint8 scaled to [low, high]; NHWC float32
std::vector<float> image_to_tensor(const Rgb& rgb, const Roi& roi, int side, double low, double high, int border) {
    // cv2.boxPoints(((cx, cy), (w, h), math.degrees(rotation))): the RotatedRect holds floats
    cv::RotatedRect rect(cv::Point2f(static_cast<float>(roi.center_x), static_cast<float>(roi.center_y)),
                         cv::Size2f(static_cast<float>(roi.width), static_cast<float>(roi.height)),
                         static_cast<float>(roi.rotation * (180.0 / M_PI)));
    cv::Point2f corners[4];
    rect.points(corners);
    float s = static_cast<float>(side);
    cv::Point2f target[4] = {{0, s}, {0, 0}, {s, 0}, {s, s}};
    cv::Mat matrix = cv::getPerspectiveTransform(corners, target);
    cv::Mat warped;
    cv::warpPerspective(as_mat(rgb), warped, matrix, cv::Size(side, side), cv::INTER_LINEAR, border, cv::Scalar(0));
    float scale = static_cast<float>((high - low) / 255.0);
    float offset = static_cast<float>(low);
    std::vector<float> tensor(static_cast<std::size_t>(side) * side * 3);
    const std::uint8_t* pixels = warped.ptr<std::uint8_t>(0);
    for (std::size_t i = 0; i < tensor.size(); ++i) tensor[i] = static_cast<float>(pixels[i]) * scale + offset;
    return tensor;
}

// numpy's float32 exp as the Python reference computes the scores: on x86-64 with AVX2 and FMA (or AVX-512), numpy
// 1.26 (the runtime's) runs its own kernel (Cody-Waite reduction, a 5/2 rational polynomial with fused multiply-adds,
// scaling by 2^k), which differs from libm's expf in the last bit for about 40 % of inputs; elsewhere it calls expf.
// Equal to numpy 1.26's on 2,000,000 values in [-100, 100] and [-1, 1] here. The scores weight the suppression's
// averages, so a bit there moves a box (and the mesh's region) by a hair.
bool numpy_exp_kernel() {
#if defined(__x86_64__) && defined(__GNUC__)
    static const bool simd = (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ||
                             __builtin_cpu_supports("avx512f");
    return simd;
#else
    return false;
#endif
}

float numpy_expf(float x) {
    if (!numpy_exp_kernel() || std::isnan(x)) return std::exp(x);
    if (x >= 88.72283935546875f) return INFINITY;
    if (x <= -103.97208404541015625f) return 0.0f;
    const float log2e = 1.442695040888963407359924681001892137f, magic = 0x1.800000p+23f;
    float quadrant = x * log2e;
    quadrant = quadrant + magic;  // round to the nearest integer
    quadrant = quadrant - magic;
    float r = std::fma(quadrant, -6.93145752e-1f, x);
    r = std::fma(quadrant, -1.42860677e-6f, r);
    r = std::fma(quadrant, 0.0f, r);
    float num = std::fma(5.082762527590693718096e-04f, r, 6.757896990527504603057e-03f);
    num = std::fma(num, r, 5.114512081637298353406e-02f);
    num = std::fma(num, r, 2.473615434895520810817e-01f);
    num = std::fma(num, r, 7.257664613233124478488e-01f);
    num = std::fma(num, r, 9.999999999980870924916e-01f);
    float den = std::fma(2.159509375685829852307e-02f, r, -2.742335390411667452936e-01f);
    den = std::fma(den, r, 1.0f);
    return std::ldexp(num / den, static_cast<int>(quadrant));
}

// numpy's pairwise summation of float32 values (np.add.reduce over a contiguous axis): blocks of 8 partial sums
float pairwise_sum(const float* a, std::size_t n) {
    if (n < 8) {
        float sum = 0.0f;  // numpy's -0.0 start only matters for a sum of negative zeros
        for (std::size_t i = 0; i < n; ++i) sum += a[i];
        return sum;
    }
    if (n <= 128) {
        float r[8];
        for (int j = 0; j < 8; ++j) r[j] = a[j];
        std::size_t i = 8;
        for (; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; ++j) r[j] += a[i + j];
        float sum = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; ++i) sum += a[i];
        return sum;
    }
    std::size_t half = n / 2;
    half -= half % 8;
    return pairwise_sum(a, half) + pairwise_sum(a + half, n - half);
}

struct Decoded {
    std::array<float, 4> box;  // xmin, ymin, width, height
    std::array<float, 12> keypoints;
    float score;
};

// face_graphs.decode_detections: the anchors scoring min_score or more, in anchor order, in tensor units
std::vector<Decoded> decode_detections(const float* raw, int values, const float* logits,
                                       const std::vector<std::array<float, 2>>& anchors, int side, float min_score) {
    std::vector<Decoded> out;
    float scale = static_cast<float>(side);
    for (std::size_t a = 0; a < anchors.size(); ++a) {
        float logit = std::min(std::max(logits[a], -fe::SCORE_CLIP), fe::SCORE_CLIP);
        float score = 1.0f / (1.0f + numpy_expf(-logit));
        if (!(score >= min_score)) continue;
        const float* r = raw + a * values;
        Decoded d;
        float centre_x = r[0] / scale + anchors[a][0], centre_y = r[1] / scale + anchors[a][1];
        float size_x = r[2] / scale, size_y = r[3] / scale;
        float left = centre_x - size_x / 2.0f, top = centre_y - size_y / 2.0f;
        float right = centre_x + size_x / 2.0f, bottom = centre_y + size_y / 2.0f;
        d.box = {left, top, right - left, bottom - top};
        for (int k = 0; k < fe::NUM_KEYPOINTS; ++k) {
            d.keypoints[2 * k] = r[4 + 2 * k] / scale + anchors[a][0];
            d.keypoints[2 * k + 1] = r[5 + 2 * k] / scale + anchors[a][1];
        }
        d.score = score;
        out.push_back(d);
    }
    return out;
}

// face_graphs._iou, float32
float iou(const std::array<float, 4>& a, const std::array<float, 4>& b) {
    float left = std::max(a[0], b[0]), top = std::max(a[1], b[1]);
    float right = std::min(a[0] + a[2], b[0] + b[2]), bottom = std::min(a[1] + a[3], b[1] + b[3]);
    float inter = (right > left && bottom > top) ? (right - left) * (bottom - top) : 0.0f;
    float uni = a[2] * a[3] + b[2] * b[3] - inter;
    return uni > 0 ? inter / uni : 0.0f;
}

// face_graphs.weighted_nms: best first; every remaining detection overlapping the best by IoU > the threshold is
// averaged into it, weighted by score (sums in the order numpy makes them)
std::vector<Decoded> weighted_nms(const std::vector<Decoded>& found) {
    std::vector<std::size_t> order(found.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return -found[a].score < -found[b].score; });
    std::vector<Decoded> results;
    while (!order.empty()) {
        const Decoded& best = found[order[0]];
        std::vector<std::size_t> members, rest;
        for (std::size_t i : order) (iou(best.box, found[i].box) > fe::SUPPRESSION_IOU ? members : rest).push_back(i);
        if (members.empty() || members[0] != order[0]) {  // a degenerate best box: alone (numpy would loop forever)
            members.insert(members.begin(), order[0]);
            rest.erase(std::find(rest.begin(), rest.end(), order[0]));
        }
        std::vector<float> weights;
        for (std::size_t i : members) weights.push_back(found[i].score);
        float total = pairwise_sum(weights.data(), weights.size());
        float corners[4] = {0, 0, 0, 0};
        float points[12] = {0};
        for (std::size_t m = 0; m < members.size(); ++m) {
            const Decoded& d = found[members[m]];
            float c[4] = {d.box[0], d.box[1], d.box[0] + d.box[2], d.box[1] + d.box[3]};
            for (int j = 0; j < 4; ++j) corners[j] += c[j] * weights[m];
            for (int j = 0; j < 12; ++j) points[j] += d.keypoints[j] * weights[m];
        }
        Decoded merged;
        float mean[4];
        for (int j = 0; j < 4; ++j) mean[j] = corners[j] / total;
        merged.box = {mean[0], mean[1], mean[2] - mean[0], mean[3] - mean[1]};
        for (int j = 0; j < 12; ++j) merged.keypoints[j] = points[j] / total;
        merged.score = best.score;
        results.push_back(merged);
        order = rest;
    }
    return results;
}

double normalize_radians(double angle) { return angle - 2 * M_PI * std::floor((angle + M_PI) / (2 * M_PI)); }

// FaceFrontEnd._iou and _overlaps on pixel boxes
double box_iou(const FaceBox& a, const FaceBox& b) {
    long long width = std::min(a.x + a.width, b.x + b.width) - std::max(a.x, b.x);
    long long height = std::min(a.y + a.height, b.y + b.height) - std::max(a.y, b.y);
    long long inter = std::max(0LL, width) * std::max(0LL, height);
    return inter ? static_cast<double>(inter) / static_cast<double>(a.area() + b.area() - inter) : 0.0;
}

bool overlaps(const FaceBox& a, const FaceBox& b) {
    long long width = std::min(a.x + a.width, b.x + b.width) - std::max(a.x, b.x);
    long long height = std::min(a.y + a.height, b.y + b.height) - std::max(a.y, b.y);
    long long inter = std::max(0LL, width) * std::max(0LL, height);
    return box_iou(a, b) >= 0.3 || static_cast<double>(inter) >= 0.6 * static_cast<double>(std::min(a.area(), b.area()));
}

// FaceFrontEnd._merge: one box per face, the official one where the official rule applies
std::vector<FaceBox> merge(const std::vector<FaceBox>& candidates, const std::optional<FaceBox>& official,
                           double min_score) {
    std::vector<FaceBox> kept;
    if (official) {
        bool confirmed = official->score >= min_score;
        for (const auto& box : candidates) confirmed = confirmed || (box.score >= min_score && box_iou(box, *official) >= 0.5);
        if (confirmed) kept.push_back(*official);
    }
    std::vector<FaceBox> sorted = candidates;
    std::stable_sort(sorted.begin(), sorted.end(), [](const FaceBox& a, const FaceBox& b) { return -a.score < -b.score; });
    for (const auto& box : sorted) {
        if (box.score < min_score || box.official) continue;
        bool seen = false;
        for (const auto& other : kept) seen = seen || overlaps(box, other);
        if (!seen) kept.push_back(box);
    }
    return kept;
}

std::vector<FaceBox> left_to_right(std::vector<FaceBox> boxes) {
    std::stable_sort(boxes.begin(), boxes.end(), [](const FaceBox& a, const FaceBox& b) { return a.center_x() < b.center_x(); });
    return boxes;
}

// FaceFrontEnd._tile_starts
std::vector<int> tile_starts(int length, int side) {
    if (length <= side) return {0};
    int count = static_cast<int>(std::ceil((length - side) / ((1 - fe::TILE_OVERLAP) * side))) + 1;
    std::vector<int> starts;
    for (int i = 0; i < count; ++i)
        starts.push_back(static_cast<int>(py_round(static_cast<double>(static_cast<long long>(i) * (length - side)) / (count - 1))));
    return starts;
}

std::string face_text(const FaceBox& box) {
    char text[200];
    std::snprintf(text, sizeof text, "FaceBox(x=%d, y=%d, width=%d, height=%d, score=%.17g, official=%s)", box.x, box.y,
                  box.width, box.height, box.score, box.official ? "True" : "False");
    return text;
}

// FaceFrontEnd._pick_face
FaceBox pick_face(const std::vector<FaceBox>& faces, const std::optional<int>& face_index, const std::string& name) {
    if (faces.empty()) throw Error("no face found in " + name + "; use --no-face-crop to use the whole image");
    if (!face_index) {
        const FaceBox* largest = &faces[0];
        for (const auto& box : faces)
            if (box.area() > largest->area()) largest = &box;
        return *largest;
    }
    if (*face_index < 0 || *face_index >= static_cast<int>(faces.size())) {
        throw Error("face index " + std::to_string(*face_index) + " is out of range: " + std::to_string(faces.size()) +
                    " face(s) found in " + name + ", numbered 0 to " + std::to_string(faces.size() - 1) +
                    " from left to right");
    }
    return faces[*face_index];
}

// FaceFrontEnd._nearest: the face whose centre is nearest to the previous one's (the first on a tie)
FaceBox nearest(const std::vector<FaceBox>& faces, const FaceBox& previous) {
    const FaceBox* best = nullptr;
    double best_distance = 0;
    for (const auto& box : faces) {
        double dx = box.center_x() - previous.center_x(), dy = box.center_y() - previous.center_y();
        double distance = dx * dx + dy * dy;
        if (best == nullptr || distance < best_distance) best = &box, best_distance = distance;
    }
    return *best;
}

// FaceFrontEnd._nearest_present: the index nearest to i whose item is present (earlier on a tie)
template <typename T>
std::size_t nearest_present(const std::vector<std::optional<T>>& items, std::size_t i) {
    std::size_t best = items.size();
    for (std::size_t j = 0; j < items.size(); ++j) {
        if (!items[j]) continue;
        auto distance = [&](std::size_t k) { return k > i ? k - i : i - k; };
        if (best == items.size() || distance(j) < distance(best)) best = j;
    }
    return best;
}

// runtime/face.py's mesh_to_ibug68 and correct_landmarks, on points in crop pixels (x, y interleaved)
std::vector<double> mesh_to_ibug68(const std::vector<double>& mesh) {
    std::vector<double> points(2 * contract::NUM_LANDMARKS);
    for (int i = 0; i < contract::NUM_LANDMARKS; ++i) {
        int a = fe::MESH_TO_IBUG68[i][0], b = fe::MESH_TO_IBUG68[i][1];
        for (int c = 0; c < 2; ++c)
            points[2 * i + c] = b < 0 ? mesh[2 * a + c] : (mesh[2 * a + c] + mesh[2 * b + c]) / 2.0;
    }
    return points;
}

std::vector<double> correct_landmarks(const std::vector<double>& points) {
    double axis_x = points[2 * 45] - points[2 * 36], axis_y = points[2 * 45 + 1] - points[2 * 36 + 1];
    double distance = std::hypot(axis_x, axis_y);
    double cos = axis_x / distance, sin = axis_y / distance;
    std::vector<double> out(points.size());
    for (int i = 0; i < contract::NUM_LANDMARKS; ++i) {
        double ox = fe::IBUG68_OFFSETS[i][0] * distance, oy = fe::IBUG68_OFFSETS[i][1] * distance;
        out[2 * i] = points[2 * i] + (ox * cos + oy * -sin);
        out[2 * i + 1] = points[2 * i + 1] + (ox * sin + oy * cos);
    }
    return out;
}

}  // namespace

// --- the whole image ------------------------------------------------------------------------------------------

FaceCrop WholeImageFrontEnd::process_image(const Rgb& rgb, const FaceOptions& options, const std::string& name) {
    if (options.landmarks) {
        throw Error("landmarks from the face mesh need the bundle's front-end graphs: give --landmarks NPY or "
                    "--no-landmarks, or add the graphs with `facellava export front-end --bundle DIR`");
    }
    if (!options.no_face_crop) {
        throw Error("face detection needs the bundle's front-end graphs: add them with `facellava export front-end "
                    "--bundle DIR`, or give --no-face-crop");
    }
    auto start = Clock::now();
    check_image(rgb, name);
    FaceCrop crop;
    crop.crop = expand2square(rgb);
    crop.detect_ms = ms_since(start);
    return crop;
}

std::vector<FaceCrop> WholeImageFrontEnd::process_video(const std::vector<Rgb>& frames, const FaceOptions& options,
                                                        const std::string& name) {
    std::vector<FaceCrop> crops;
    for (std::size_t i = 0; i < frames.size(); ++i)
        crops.push_back(process_image(frames[i], options, "frame " + std::to_string(i) + " of " + name));
    return crops;
}

bool has_front_end_graphs(const Bundle& bundle) {
    auto present = bundle.find(fe::FRONT_END_KIND);
    for (const char* name : {fe::SHORT_RANGE_FILE, fe::FULL_RANGE_FILE, fe::MESH_FILE})
        if (std::find(present.begin(), present.end(), name) == present.end()) return false;
    return true;
}

// --- the graphs -----------------------------------------------------------------------------------------------

namespace {

// face_graphs.py's onnx_networks: one graph on ONNX Runtime as a network
class OnnxNetwork : public FrontEndNetwork {
  public:
    explicit OnnxNetwork(std::unique_ptr<OnnxGraph> graph) : graph_(std::move(graph)) {}
    const std::string& name() const override { return graph_->name; }
    std::vector<std::string> output_names() const override {
        std::vector<std::string> names;
        for (const auto& output : graph_->outputs) names.push_back(output.name);
        return names;
    }
    std::vector<NetworkOutput> run(const std::vector<float>& tensor, const std::vector<std::int64_t>& shape) override {
        auto values = graph_->run({graph_->inputs[0].name}, {tensor.data()}, {shape});
        std::vector<NetworkOutput> outputs;
        for (std::size_t i = 0; i < values.size(); ++i) {
            NetworkOutput out;
            out.name = graph_->outputs[i].name;
            auto info = values[i].GetTensorTypeAndShapeInfo();
            out.shape = info.GetShape();
            out.float32 = info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
            if (out.float32) {
                const float* data = values[i].GetTensorData<float>();
                out.values.assign(data, data + info.GetElementCount());
            }
            outputs.push_back(std::move(out));
        }
        return outputs;
    }

  private:
    std::unique_ptr<OnnxGraph> graph_;
};

}  // namespace

struct GraphsFrontEnd::Graphs {
    FrontEndNetworks networks;
    std::map<std::string, std::vector<std::array<float, 2>>> anchors;
};

GraphsFrontEnd::GraphsFrontEnd(const Bundle& bundle, int min_face_side, const std::string& device,
                               FrontEndNetworks networks)
    : graphs_(std::make_unique<Graphs>()), min_face_side_(min_face_side) {
    if (!has_front_end_graphs(bundle)) {
        throw Error(bundle.root().string() + " has no front-end graphs; add them with `facellava export front-end "
                    "--bundle DIR`, or give --no-face-crop with --landmarks NPY or --no-landmarks");
    }
    for (const auto* spec : {&fe::SHORT_RANGE, &fe::FULL_RANGE}) graphs_->anchors[spec->name] = ssd_anchors(*spec);
    if (networks.count("short_range") && networks.count("full_range") && networks.count("mesh")) {
        graphs_->networks = std::move(networks);  // the TensorRT engines, checked where they were opened
        return;
    }
    const std::string remedy = "export it again with `facellava export front-end`";
    // one thread each, as runtime/face_graphs.py's onnx_networks: the networks are small
    const std::pair<const char*, const char*> files[] = {
        {"short_range", fe::SHORT_RANGE_FILE}, {"full_range", fe::FULL_RANGE_FILE}, {"mesh", fe::MESH_FILE}};
    for (const auto& [model, file] : files) {
        auto graph = OnnxGraph::open(bundle, file, 1, remedy, device);
        if (graph->inputs.size() != 1 || graph->inputs[0].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
            throw Error(graph->name + " is not a front-end graph (one float32 NHWC input); " + remedy);
        graphs_->networks[model] = std::make_unique<OnnxNetwork>(std::move(graph));
    }
}

GraphsFrontEnd::~GraphsFrontEnd() = default;

std::vector<Detection> GraphsFrontEnd::detections(const Rgb& rgb, const std::string& model,
                                                  std::optional<float> min_score) {
    const fe::DetectorSpec& spec = spec_of(model);
    int width = rgb.width, height = rgb.height;
    double long_side = std::max(width, height);
    Roi roi{width / 2.0, height / 2.0, long_side, long_side};  // letterbox_roi
    std::vector<float> tensor = image_to_tensor(rgb, roi, spec.side, fe::DETECTOR_RANGE[0], fe::DETECTOR_RANGE[1],
                                                 cv::BORDER_CONSTANT);
    FrontEndNetwork& graph = *graphs_->networks.at(model);
    auto outputs = graph.run(tensor, {1, spec.side, spec.side, 3});
    const auto& anchors = graphs_->anchors.at(model);
    const float *raw = nullptr, *logits = nullptr;
    int values = 4 + 2 * fe::NUM_KEYPOINTS;
    for (const auto& output : outputs) {
        const auto& shape = output.shape;
        if (shape.empty() || !output.float32) continue;
        std::size_t count = output.values.size();
        if (shape.back() == values && raw == nullptr && count == anchors.size() * values) raw = output.values.data();
        else if (shape.back() == 1 && logits == nullptr && count == anchors.size()) logits = output.values.data();
    }
    if (raw == nullptr || logits == nullptr) {
        throw Error(graph.name() + " does not give " + std::to_string(anchors.size()) + " detections of " +
                    std::to_string(values) + " values and scores; export it again with `facellava export front-end`");
    }
    auto decoded = decode_detections(raw, values, logits, anchors, spec.side, min_score.value_or(spec.min_score));
    // letterbox removal: tensor [0, 1] -> image [0, 1]
    float scale[2] = {static_cast<float>(roi.width / width), static_cast<float>(roi.height / height)};
    float offset[2] = {static_cast<float>(roi.center_x / width) - scale[0] / 2.0f,
                       static_cast<float>(roi.center_y / height) - scale[1] / 2.0f};
    std::vector<Detection> found;
    for (const auto& d : weighted_nms(decoded)) {
        Detection out;
        float left = d.box[0] * scale[0] + offset[0], top = d.box[1] * scale[1] + offset[1];
        float right = (d.box[0] + d.box[2]) * scale[0] + offset[0];
        float bottom = (d.box[1] + d.box[3]) * scale[1] + offset[1];
        out.box[0] = left;
        out.box[1] = top;
        out.box[2] = right - left;
        out.box[3] = bottom - top;
        for (int k = 0; k < fe::NUM_KEYPOINTS; ++k)
            for (int c = 0; c < 2; ++c) out.keypoints[k][c] = d.keypoints[2 * k + c] * scale[c] + offset[c];
        out.score = d.score;
        found.push_back(out);
    }
    return found;
}

std::optional<std::vector<double>> GraphsFrontEnd::mesh(const Rgb& rgb) {
    auto found = detections(rgb, "short_range");
    if (found.empty()) return std::nullopt;
    int width = rgb.width, height = rgb.height;
    // mesh_roi: the eyes' rotation, squared on the long side, scaled by 1.5 (doubles of the float32 values)
    const Detection& d = found[0];
    double xmin = d.box[0], ymin = d.box[1], box_width = d.box[2], box_height = d.box[3];
    double dy = static_cast<float>(d.keypoints[1][1] - d.keypoints[0][1]);
    double dx = static_cast<float>(d.keypoints[1][0] - d.keypoints[0][0]);
    double rotation = normalize_radians(-std::atan2(-dy * height, dx * width));
    double long_side = std::max(box_width * width, box_height * height) * fe::MESH_SCALE;
    Roi roi{(xmin + box_width / 2) * width, (ymin + box_height / 2) * height, long_side, long_side, rotation};
    std::vector<float> tensor = image_to_tensor(rgb, roi, fe::MESH_SIDE, fe::MESH_RANGE[0], fe::MESH_RANGE[1], fe::MESH_BORDER);
    FrontEndNetwork& graph = *graphs_->networks.at("mesh");
    std::vector<std::string> wanted = {"output_mesh_identity", "conv_faceflag"};
    for (const auto& refinement : fe::MESH_REFINEMENTS) wanted.push_back(refinement.output);
    std::vector<std::string> names = graph.output_names();
    for (const auto& name : wanted) {
        if (std::find(names.begin(), names.end(), name) == names.end())
            throw Error(graph.name() + " has no output " + name + " (the attention face mesh's); export it again "
                        "with `facellava export front-end`");
    }
    auto outputs = graph.run(tensor, {1, fe::MESH_SIDE, fe::MESH_SIDE, 3});
    auto values = [&](std::size_t i, std::size_t count) {
        const NetworkOutput* output = nullptr;
        for (const auto& candidate : outputs)
            if (candidate.name == wanted[i]) output = &candidate;
        if (output == nullptr || !output->float32 || output->values.size() != count)
            throw Error(graph.name() + "'s " + wanted[i] + " does not hold " + std::to_string(count) + " float32 values; "
                        "export it again with `facellava export front-end`");
        return output->values.data();
    };
    // _mesh_points: the mesh's x, y with the refinements' points written over theirs (irises appended)
    std::vector<double> points(2 * fe::REFINED_MESH_POINTS, 0.0);
    const float* identity = values(0, 3 * fe::MESH_POINTS);
    for (int i = 0; i < fe::MESH_POINTS; ++i)
        for (int c = 0; c < 2; ++c) points[2 * i + c] = identity[3 * i + c];
    for (std::size_t r = 0; r < std::size(fe::MESH_REFINEMENTS); ++r) {
        const auto& refinement = fe::MESH_REFINEMENTS[r];
        const float* refined = values(2 + r, 2 * refinement.count);
        for (int k = 0; k < refinement.count; ++k)
            for (int c = 0; c < 2; ++c) points[2 * refinement.indices[k] + c] = refined[2 * k + c];
    }
    double flag = values(1, 1)[0];
    if (1.0 / (1.0 + std::exp(-flag)) <= fe::MESH_PRESENCE) return std::nullopt;
    // LandmarkProjectionCalculator: about the rectangle's centre, rotated, scaled by its size; relative to the image
    double cos = std::cos(roi.rotation), sin = std::sin(roi.rotation);
    for (int i = 0; i < fe::REFINED_MESH_POINTS; ++i) {
        double cx = points[2 * i] / fe::MESH_SIDE - 0.5, cy = points[2 * i + 1] / fe::MESH_SIDE - 0.5;
        double x = (cos * cx - sin * cy) * roi.width + roi.center_x;
        double y = (sin * cx + cos * cy) * roi.height + roi.center_y;
        points[2 * i] = x / width;
        points[2 * i + 1] = y / height;
    }
    return points;
}

std::pair<std::optional<FaceBox>, std::vector<FaceBox>> GraphsFrontEnd::official_detections(const Rgb& rgb) {
    // FrontEndGraphs.official_detections: the task API's pixel boxes (float32 products truncated, clamped)
    int width = rgb.width, height = rgb.height;
    auto clamp = [](float value, int side) {
        long truncated = static_cast<long>(value);
        return static_cast<int>(std::min(std::max(truncated, 0L), static_cast<long>(side)));
    };
    std::vector<FaceBox> boxes;
    for (const auto& found : detections(rgb, "short_range", fe::TASK_API_MIN_SCORE)) {
        FaceBox box;
        box.x = clamp(found.box[0] * static_cast<float>(width), width);
        box.y = clamp(found.box[1] * static_cast<float>(height), height);
        box.width = clamp(found.box[2] * static_cast<float>(width), width);
        box.height = clamp(found.box[3] * static_cast<float>(height), height);
        box.score = found.score;
        boxes.push_back(box);
    }
    for (auto& box : boxes) box.official = boxes.size() == 1;
    std::optional<FaceBox> official;
    if (boxes.size() == 1) official = boxes[0];
    return {official, boxes};
}

std::vector<int> GraphsFrontEnd::tile_sides(int height, int width) const {
    double long_side = std::max(height, width);
    double smallest = std::max(static_cast<double>(min_face_side_), fe::MIN_FACE_FRACTION * long_side);
    std::vector<int> sides;
    double side = smallest / fe::TILE_FACE_FRACTION;
    while (side < long_side) {
        sides.push_back(static_cast<int>(py_round(side)));
        if (fe::TILE_OVERLAP * side >= fe::FULL_RANGE_MIN_FRACTION * long_side) break;
        side *= fe::TILE_LEVEL_RATIO;
    }
    return sides;
}

std::vector<FaceBox> GraphsFrontEnd::look(const std::string& detector, const Rgb& rgb, int left, int top, int width,
                                          int height, int border, bool tile) {
    cv::Mat view = as_mat(rgb)(cv::Rect(left, top, width, height));
    if (border) {
        cv::Mat bordered;
        cv::copyMakeBorder(view, bordered, border, border, border, border, cv::BORDER_CONSTANT,
                           cv::Scalar(contract::SQUARE_FILL[0], contract::SQUARE_FILL[1], contract::SQUARE_FILL[2]));
        view = bordered;
    }
    int view_height = view.rows, view_width = view.cols;
    double scale = static_cast<double>(fe::VIEW_SIDE) / std::max(view_height, view_width);
    if (scale < 1) {
        cv::Mat shrunk;
        cv::Size size(static_cast<int>(std::max(1L, py_round(view_width * scale))),
                      static_cast<int>(std::max(1L, py_round(view_height * scale))));
        cv::resize(view, shrunk, size, 0, 0, cv::INTER_AREA);
        view = shrunk;
    }
    Rgb seen = to_rgb(view);
    double edge = 0.02 * std::max(width, height);
    std::vector<FaceBox> boxes;
    for (const auto& detection : detections(seen, detector)) {
        double x = (left - border) + static_cast<double>(detection.box[0]) * view_width;
        double y = (top - border) + static_cast<double>(detection.box[1]) * view_height;
        double box_width = static_cast<double>(detection.box[2]) * view_width;
        double box_height = static_cast<double>(detection.box[3]) * view_height;
        if (tile && ((left > 0 && x < left + edge) || (top > 0 && y < top + edge) ||
                     (left + width < rgb.width && x + box_width > left + width - edge) ||
                     (top + height < rgb.height && y + box_height > top + height - edge)))
            continue;
        FaceBox box;
        box.x = std::max(0, static_cast<int>(x));
        box.y = std::max(0, static_cast<int>(y));
        box.width = static_cast<int>(box_width);
        box.height = static_cast<int>(box_height);
        box.score = detection.score;
        boxes.push_back(box);
    }
    return boxes;
}

std::vector<FaceBox> GraphsFrontEnd::detect(const Rgb& rgb) {
    check_image(rgb, "the image");
    int height = rgb.height, width = rgb.width;
    auto [official, candidates] = official_detections(rgb);
    auto add = [&](std::vector<FaceBox> boxes) { candidates.insert(candidates.end(), boxes.begin(), boxes.end()); };
    add(look("full_range", rgb, 0, 0, width, height));
    add(look("short_range", rgb, 0, 0, width, height, std::max(height, width) / 4));
    for (int side : tile_sides(height, width))
        for (int top : tile_starts(height, side))
            for (int left : tile_starts(width, side))
                add(look("full_range", rgb, left, top, std::min(side, width - left), std::min(side, height - top), 0, true));
    return left_to_right(merge(candidates, official, fe::MIN_FACE_SCORE));
}

std::vector<FaceBox> GraphsFrontEnd::detect_near(const Rgb& rgb, const FaceBox& box) {
    check_image(rgb, "the image");
    int height = rgb.height, width = rgb.width;
    auto [official, candidates] = official_detections(rgb);
    int side = 3 * std::max(box.width, box.height);
    double cx = box.center_x(), cy = box.center_y();
    int left = std::max(0, static_cast<int>(cx - side / 2.0)), top = std::max(0, static_cast<int>(cy - side / 2.0));
    int right = std::min(width, static_cast<int>(cx + side / 2.0));
    int bottom = std::min(height, static_cast<int>(cy + side / 2.0));
    if (right > left && bottom > top) {
        for (const char* detector : {"short_range", "full_range"}) {
            auto boxes = look(detector, rgb, left, top, right - left, bottom - top, 0, true);
            candidates.insert(candidates.end(), boxes.begin(), boxes.end());
        }
    }
    return left_to_right(merge(candidates, official, fe::MIN_FACE_SCORE));
}

std::optional<std::vector<float>> GraphsFrontEnd::landmarks(const Rgb& crop) {
    int crop_side = crop.height;
    for (int border : {0, crop_side / 4}) {
        Rgb image = crop;
        if (border) {
            cv::Mat bordered;
            cv::copyMakeBorder(as_mat(crop), bordered, border, border, border, border, cv::BORDER_CONSTANT, cv::Scalar(0));
            image = to_rgb(bordered);
        }
        auto mesh_points = mesh(image);
        if (!mesh_points) continue;
        // relative to the image the mesh saw -> the crop's pixels
        for (double& value : *mesh_points) value = value * image.height - border;
        std::vector<double> points = correct_landmarks(mesh_to_ibug68(*mesh_points));
        std::vector<float> out(points.size());
        for (std::size_t i = 0; i < points.size(); ++i) out[i] = static_cast<float>(points[i] / crop_side);
        return out;
    }
    return std::nullopt;
}

FaceCrop GraphsFrontEnd::process_image(const Rgb& rgb, const FaceOptions& options, const std::string& name) {
    check_image(rgb, name);
    auto start = Clock::now();
    FaceCrop result;
    if (options.no_face_crop) {
        result.crop = expand2square(rgb);
    } else {
        FaceBox box = pick_face(detect(rgb), options.face_index, name);
        result.crop = official_crop(rgb, box);
        result.box = box;
    }
    result.detect_ms = ms_since(start);
    if (options.landmarks) {
        auto mesh_start = Clock::now();
        result.landmarks = landmarks(result.crop);
        result.landmarks_ms = ms_since(mesh_start);
    }
    return result;
}

std::vector<FaceCrop> GraphsFrontEnd::process_video(const std::vector<Rgb>& frames, const FaceOptions& options,
                                                    const std::string& name) {
    for (std::size_t i = 0; i < frames.size(); ++i) check_image(frames[i], "frame " + std::to_string(i) + " of " + name);
    std::vector<FaceCrop> results;
    if (options.no_face_crop) {
        for (const auto& frame : frames) results.push_back(process_image(frame, options, "the image"));
        return results;
    }
    // the face chosen in the first frame that has faces, then followed (only around it) from frame to frame
    std::vector<double> detect_ms;
    std::vector<std::vector<FaceBox>> found;
    std::optional<FaceBox> followed;
    for (const auto& frame : frames) {
        auto start = Clock::now();
        auto faces = followed ? detect_near(frame, *followed) : detect(frame);
        if (!faces.empty()) followed = followed ? nearest(faces, *followed) : pick_face(faces, options.face_index, name);
        found.push_back(std::move(faces));
        detect_ms.push_back(ms_since(start));
    }
    // _follow_face
    std::size_t first = 0;
    while (first < found.size() && found[first].empty()) ++first;
    if (first == found.size())
        throw Error("no face found in any frame of " + name + "; use --no-face-crop to use the whole frames");
    std::vector<std::optional<FaceBox>> chosen(found.size());
    FaceBox previous = pick_face(found[first], options.face_index, name);
    chosen[first] = previous;
    for (std::size_t i = first + 1; i < found.size(); ++i)
        if (!found[i].empty()) chosen[i] = previous = nearest(found[i], previous);
    for (std::size_t i = 0; i < frames.size(); ++i) {
        FaceBox box = *chosen[nearest_present(chosen, i)];
        auto start = Clock::now();
        FaceCrop result;
        result.crop = official_crop(frames[i], box);
        result.box = box;
        result.detect_ms = detect_ms[i] + ms_since(start);
        if (options.landmarks) {
            auto mesh_start = Clock::now();
            result.landmarks = landmarks(result.crop);
            result.landmarks_ms = ms_since(mesh_start);
        }
        results.push_back(std::move(result));
    }
    if (options.landmarks) {  // _fill_from_nearest
        std::vector<std::optional<std::vector<float>>> present;
        for (const auto& result : results) present.push_back(result.landmarks);
        bool any = false, missing = false;
        for (const auto& points : present) (points ? any : missing) = true;
        if (any && missing)
            for (std::size_t i = 0; i < results.size(); ++i)
                if (!results[i].landmarks) results[i].landmarks = present[nearest_present(present, i)];
    }
    return results;
}

Rgb official_crop(const Rgb& rgb, const FaceBox& box) {
    int height = rgb.height, width = rgb.width;
    int margin = std::min({0, box.x, width - box.x - box.width, box.y, height - box.y - box.height});
    double side = (box.width + box.height) / 2.0;
    int left = static_cast<int>(std::max(0, box.x - margin)), top = static_cast<int>(std::max(0, box.y - margin));
    int right = static_cast<int>(std::min(box.x + side + margin, static_cast<double>(width - 1)));
    int bottom = static_cast<int>(std::min(box.y + side + margin, static_cast<double>(height - 1)));
    if (right <= left || bottom <= top) {
        throw Error("the face box " + face_text(box) + " leaves nothing of the " + std::to_string(width) + "x" +
                    std::to_string(height) + " image to crop");
    }
    cv::Mat crop;
    cv::resize(as_mat(rgb)(cv::Rect(left, top, right - left, bottom - top)), crop,
               cv::Size(contract::FACE_CROP_SIZE, contract::FACE_CROP_SIZE));
    return to_rgb(crop);
}

}  // namespace facellava
