#include "runner.hpp"

#include <chrono>
#include <cstdio>
#include <set>

#include "contract_generated.hpp"
#include "errors.hpp"
#ifdef FACELLAVA_HAVE_TENSORRT
#include "tensorrt_vision.hpp"
#endif

namespace facellava {

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point start) { return std::chrono::duration<double, std::milli>(Clock::now() - start).count(); }

bool valid_utf8(const std::string& text, std::size_t& bad_at) {
    Utf8Decoder decoder;
    std::string decoded = decoder.decode(text, true);
    if (decoded == text) return true;
    std::size_t i = 0;
    while (i < text.size() && i < decoded.size() && text[i] == decoded[i]) ++i;
    bad_at = i;
    return false;
}

void check_medium(const Request& request) {
    if (int(!request.image.empty()) + int(!request.video.empty()) + int(request.camera.has_value()) != 1)
        throw Error("give exactly one of an image, a video or a camera");
    if (request.camera && *request.camera < 0)
        throw Error("a camera index is 0 or more, got " + std::to_string(*request.camera));
}

// the request's image: its file, or one frame of its camera
Rgb image_of(const Request& request) {
    return request.camera ? camera_frame(*request.camera) : load_image(request.image);
}

}  // namespace

std::string Timings::line() const {
    char buffer[512];
    std::snprintf(buffer, sizeof buffer,
                  "face %.1f ms | landmarks %.1f ms | preprocessing %.1f ms | vision %.1f ms | time to first token "
                  "%.1f ms | decode %.1f tokens/s | total %.1f ms",
                  face_detection_ms, landmarks_ms, preprocessing_ms, vision_ms, time_to_first_token_ms,
                  decode_tokens_per_s, total_ms);
    return buffer;
}

nlohmann::ordered_json Answer::to_json(const std::string& vision_backend) const {
    nlohmann::ordered_json out;
    out["text"] = generation.text;
    out["tokens"] = generation.tokens;
    out["finish_reason"] = generation.finish_reason;
    out["modality"] = modality;
    out["landmarks"] = landmarks;
    out["prompt_positions"] = generation.prompt_positions;
    out["reused_prefix_positions"] = generation.reused_prefix;
    out["timings"] = {{"face_detection_ms", timings.face_detection_ms}, {"landmarks_ms", timings.landmarks_ms},
                      {"preprocessing_ms", timings.preprocessing_ms}, {"vision_ms", timings.vision_ms},
                      {"time_to_first_token_ms", timings.time_to_first_token_ms},
                      {"decode_tokens_per_s", timings.decode_tokens_per_s}, {"total_ms", timings.total_ms}};
    out["vision_backend"] = vision_backend;
    return out;
}

void check_question(const std::string& question) {
    if (question.find_first_not_of(" \t\n\r\f\v") == std::string::npos) throw Error("the question is empty");
    std::size_t bad_at = 0;
    if (!valid_utf8(question, bad_at)) {
        char byte[8];
        std::snprintf(byte, sizeof byte, "0x%02x", static_cast<unsigned char>(question[bad_at]));
        throw Error(std::string("the question is not valid UTF-8 text (the byte ") + byte + " at byte " +
                    std::to_string(bad_at) + "); give it as UTF-8");
    }
}

const tasks::Task& get_task(const std::string& name) {
    std::string names;
    for (const auto& task : tasks::TASKS) {
        if (name == task.name) return task;
        names += (names.empty() ? "" : ", ") + std::string(task.name);
    }
    throw Error("unknown task '" + name + "'; expected one of " + names);
}

void check_min_face(int min_face) {
    if (min_face < 1) throw Error("min_face must be at least 1 pixel, got " + std::to_string(min_face));
}

void check_request(const std::string& question, const Request& request) {
    check_question(question);
    if (request.max_tokens < 1) throw Error("max_tokens must be at least 1, got " + std::to_string(request.max_tokens));
    check_sampling(request.sampling);
    if (!request.task.empty()) get_task(request.task);
    check_medium(request);
    if (request.no_landmarks && !request.landmarks.empty()) throw Error("give landmarks or ask for none, not both");
}

std::vector<float> prepare_pixels(const Request& request) {
    check_medium(request);
    if (!request.no_face_crop) throw Error("face detection needs the bundle's front-end graphs: add --no-face-crop");
    WholeImageFrontEnd whole;
    FaceOptions options;
    options.no_face_crop = true;
    if (request.video.empty())
        return preprocess_image(whole.process_image(image_of(request), options, request.image).crop);
    Video video = read_video(request.video);
    std::vector<Rgb> frames;
    for (const auto& crop : whole.process_video(video.frames, options, request.video)) frames.push_back(crop.crop);
    return preprocess_video(frames);
}

namespace {

// The medium read and through a front end (runtime/medium.py's prepare_medium, the crops): the video's decoded
// frame count in `num_frames`.
std::vector<FaceCrop> crops_of(FrontEnd& front_end, const Request& request, bool run_mesh, int& num_frames) {
    FaceOptions options;
    options.face_index = request.face_index;
    options.no_face_crop = request.no_face_crop;
    options.landmarks = run_mesh;
    num_frames = 0;
    if (request.video.empty()) return {front_end.process_image(image_of(request), options, "the image")};
    Video video = read_video(request.video);
    num_frames = video.num_frames;
    for (std::size_t i = 0; i < video.frames.size(); ++i)
        check_image(video.frames[i], "frame " + std::to_string(i) + " of " + request.video);
    return front_end.process_video(video.frames, options, "the video");
}

}  // namespace

std::vector<FaceCrop> face_crops(const std::string& bundle, int min_face, const Request& request,
                                 const std::string& device) {
    check_medium(request);
    check_min_face(min_face);
    Bundle opened = Bundle::open(bundle);
    GraphsFrontEnd front_end(opened, min_face, device);
    int num_frames = 0;
    return crops_of(front_end, request, !request.no_landmarks && request.landmarks.empty(), num_frames);
}

Runner::Runner(const std::string& bundle, const RunnerOptions& options)
    : bundle_((check_min_face(options.min_face), Bundle::open(bundle))), min_face_(options.min_face),
      device_(options.device) {
    if (options.llm.n_ctx < 1) throw Error("n_ctx must be at least 1, got " + std::to_string(options.llm.n_ctx));
    std::map<std::string, std::string> types;
    for (const auto& name : bundle_.find("llm")) types[bundle_.files()[name]["type"].get<std::string>()] = name;
    if (types.empty()) throw Error(bundle_.root().string() + " has no GGUF; export one with `facellava export llm`");
    std::string type = options.llm_type;
    if (type.empty()) {
        type = types.begin()->first;
        for (const char* preferred : contract::LLM_PREFERENCE)
            if (types.count(preferred)) {
                type = preferred;
                break;
            }
    }
    if (!types.count(type)) {
        std::string have;
        for (const auto& item : types) have += (have.empty() ? "" : ", ") + item.first;
        throw Error(bundle_.root().string() + " has no " + type + " GGUF (it has: " + have + ")");
    }
    // runtime/vision.py's open_vision: TensorRT where this device has engines for the bundle, else ONNX Runtime
    if (options.vision != "auto" && options.vision != "onnxruntime" && options.vision != "tensorrt")
        throw Error("unknown vision backend '" + options.vision + "'; expected one of auto, onnxruntime, tensorrt");
#ifdef FACELLAVA_HAVE_TENSORRT
    if (options.vision != "onnxruntime") {
        std::string why;
        auto engines = tensorrt_engines_here(bundle_, options.vision_precision, &why);
        if (!engines.empty()) {
            vision_ = std::make_unique<TensorRtVision>(bundle_, options.vision_precision, std::move(engines));
        } else if (options.vision == "tensorrt") {
            throw Error("no " + options.vision_precision + " TensorRT engines for this device in " +
                        bundle_.root().string() + ": " + why);
        }
    }
#else
    if (options.vision == "tensorrt")
        throw Error("this libfacellava was built without TensorRT (its CMake found no NvInferRuntime.h and "
                    "libnvinfer); rebuild with TensorRT installed (-DFACELLAVA_TENSORRT=ON), or give --vision "
                    "onnxruntime");
#endif
    if (vision_ == nullptr) vision_ = std::make_unique<OnnxVision>(bundle_, options.vision_precision, options.device);
    llm_ = std::make_unique<LlamaModel>(bundle_.path_of(types[type]).string(), options.llm);
}

Answer Runner::ask(const std::string& question, const Request& request,
                   const std::function<bool(const std::string&)>& on_piece) {
    check_request(question, request);
    auto start = Clock::now();
    bool run_mesh = !request.no_landmarks && request.landmarks.empty();
    // the bundle's front-end graphs for face detection or face-mesh landmarks (verified and opened once)
    if ((!request.no_face_crop || run_mesh) && graphs_ == nullptr) {
        // runtime/pipeline.py's front_end: it follows the vision backend, the bundle's engines of the three graphs
        // for this device beside TensorRT vision (all three or none), else ONNX Runtime on --device's providers
        FrontEndNetworks engines;
#ifdef FACELLAVA_HAVE_TENSORRT
        if (std::string(vision_->name()) == "tensorrt") engines = tensorrt_front_end_networks(bundle_);
#endif
        graphs_ = std::make_unique<GraphsFrontEnd>(bundle_, min_face_, device_, std::move(engines));
    }
    FrontEnd& front_end = (!request.no_face_crop || run_mesh) ? static_cast<FrontEnd&>(*graphs_) : whole_image_;

    Answer answer;
    Modality modality = request.video.empty() ? Modality::image : Modality::video;
    answer.modality = modality_name(modality);
    int num_frames = 0;
    std::vector<FaceCrop> crops = crops_of(front_end, request, run_mesh, num_frames);
    std::vector<float> points;
    bool have_points = false;
    if (request.no_landmarks) {
        answer.landmarks = "none";
    } else if (!request.landmarks.empty()) {
        points = load_landmarks(request.landmarks, modality, num_frames);
        have_points = true;
        answer.landmarks = "file";
    } else {
        bool all = true;
        for (const auto& crop : crops) all = all && crop.landmarks.has_value();
        if (all) {
            for (const auto& crop : crops) points.insert(points.end(), crop.landmarks->begin(), crop.landmarks->end());
            have_points = true;
            answer.landmarks = "face mesh";
        } else {
            answer.landmarks = "none (face mesh found none)";
        }
    }
    for (const auto& crop : crops) {
        answer.timings.face_detection_ms += crop.detect_ms;
        answer.timings.landmarks_ms += crop.landmarks_ms;
    }
    auto preprocessing = Clock::now();
    std::vector<float> pixels;
    if (modality == Modality::image) {
        pixels = preprocess_image(crops[0].crop);
    } else {
        std::vector<Rgb> frames;
        for (const auto& crop : crops) frames.push_back(crop.crop);
        pixels = preprocess_video(frames);
    }
    answer.timings.preprocessing_ms = ms_since(preprocessing);

    auto vision = Clock::now();
    VisualTokens tokens = vision_->encode(modality, pixels, have_points ? &points : nullptr);
    answer.timings.vision_ms = ms_since(vision);
    if (tokens.width != llm_->n_embd()) {
        throw Error("the vision graph gives " + std::to_string(tokens.width) + "-wide tokens but the LLM takes " +
                    std::to_string(llm_->n_embd()) + ": the bundle mixes two models; export it again");
    }
    Sampling sampling = request.sampling;
    if (!request.task.empty()) sampling.grammar = get_task(request.task).grammar;
    answer.generation = facellava::answer(*llm_, question, tokens.blocks, tokens.tokens,
                                          [&](int i) { return tokens.block(i); }, request.max_tokens, sampling,
                                          on_piece);
    if (!request.task.empty() && answer.generation.finish_reason != "length") {
        // the grammar guarantees the schema's JSON (runtime/cli.py checks it too): a miss is an error
        auto value = nlohmann::json::parse(answer.generation.text, nullptr, false);
        if (value.is_discarded()) throw Error("the answer is not complete JSON; raise max_tokens");
        auto schema = nlohmann::json::parse(get_task(request.task).schema_json);
        std::set<std::string> keys, required(schema["required"].begin(), schema["required"].end());
        if (value.is_object())
            for (const auto& item : value.items()) keys.insert(item.key());
        if (keys != required) throw Error("the answer does not match the task's JSON schema (its keys)");
    }
    answer.timings.time_to_first_token_ms = answer.generation.prefill_ms;
    answer.timings.decode_tokens_per_s = answer.generation.decode_tokens_per_s();
    answer.timings.total_ms = ms_since(start);
    return answer;
}

}  // namespace facellava
