#include "runner.hpp"

#include <chrono>
#include <cstdio>

#include "contract_generated.hpp"
#include "errors.hpp"

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

}  // namespace

FaceCrop WholeImageFrontEnd::process(const Rgb& rgb, bool landmarks, const std::string& name) {
    if (landmarks) {
        throw Error("landmarks from the face mesh need the bundle's front-end graphs, which the native runner does not "
                    "run yet: give --landmarks NPY or --no-landmarks");
    }
    auto start = Clock::now();
    check_image(rgb, name);
    FaceCrop crop;
    crop.crop = expand2square(rgb);
    crop.detect_ms = ms_since(start);
    return crop;
}

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

void check_request(const std::string& question, const Request& request, bool has_face_front_end) {
    check_question(question);
    if (request.max_tokens < 1) throw Error("max_tokens must be at least 1, got " + std::to_string(request.max_tokens));
    check_sampling(request.sampling);
    if (request.image.empty() == request.video.empty()) throw Error("give exactly one of an image or a video");
    if (request.no_landmarks && !request.landmarks.empty()) throw Error("give landmarks or ask for none, not both");
    if (!request.no_face_crop && !has_face_front_end) {
        throw Error("face detection needs the bundle's front-end graphs, which the native runner does not run yet: add "
               "--no-face-crop (the whole image, with --landmarks NPY or --no-landmarks), or use `facellava run`");
    }
    if (request.landmarks.empty() && !request.no_landmarks && !has_face_front_end) {
        throw Error("landmarks from the face mesh need the bundle's front-end graphs, which the native runner does "
                    "not run yet: give --landmarks NPY or --no-landmarks");
    }
}

std::vector<float> prepare_pixels(const Request& request) {
    if (request.image.empty() == request.video.empty()) throw Error("give exactly one of an image or a video");
    if (!request.no_face_crop) throw Error("face detection needs the bundle's front-end graphs: add --no-face-crop");
    WholeImageFrontEnd whole;
    if (!request.image.empty()) return preprocess_image(whole.process(load_image(request.image), false, request.image).crop);
    Video video = read_video(request.video);
    std::vector<Rgb> frames;
    for (std::size_t i = 0; i < video.frames.size(); ++i)
        frames.push_back(whole.process(video.frames[i], false, "frame " + std::to_string(i) + " of " + request.video).crop);
    return preprocess_video(frames);
}

Runner::Runner(const std::string& bundle, const RunnerOptions& options) : bundle_(Bundle::open(bundle)) {
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
    vision_ = std::make_unique<OnnxVision>(bundle_, options.vision_precision);
    llm_ = std::make_unique<LlamaModel>(bundle_.path_of(types[type]).string(), options.llm);
}

Answer Runner::ask(const std::string& question, const Request& request,
                   const std::function<bool(const std::string&)>& on_piece) {
    check_request(question, request, face_front_end_ != nullptr);
    auto start = Clock::now();
    FrontEnd& front_end = request.no_face_crop ? static_cast<FrontEnd&>(whole_image_) : *face_front_end_;
    bool run_mesh = !request.no_landmarks && request.landmarks.empty();

    Answer answer;
    Modality modality = request.image.empty() ? Modality::video : Modality::image;
    answer.modality = modality_name(modality);
    std::vector<FaceCrop> crops;
    int num_frames = 0;
    if (modality == Modality::image) {
        Rgb rgb = load_image(request.image);
        crops.push_back(front_end.process(rgb, run_mesh, request.image));
    } else {
        Video video = read_video(request.video);
        num_frames = video.num_frames;
        for (std::size_t i = 0; i < video.frames.size(); ++i)
            check_image(video.frames[i], "frame " + std::to_string(i) + " of " + request.video);
        for (std::size_t i = 0; i < video.frames.size(); ++i)
            crops.push_back(front_end.process(video.frames[i], run_mesh, "frame " + std::to_string(i) + " of " + request.video));
    }
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
    answer.generation = facellava::answer(*llm_, question, tokens.blocks, tokens.tokens,
                                          [&](int i) { return tokens.block(i); }, request.max_tokens, request.sampling,
                                          on_piece);
    answer.timings.time_to_first_token_ms = answer.generation.prefill_ms;
    answer.timings.decode_tokens_per_s = answer.generation.decode_tokens_per_s();
    answer.timings.total_ms = ms_since(start);
    return answer;
}

}  // namespace facellava
