// The whole answer from a bundle, as runtime/pipeline.py gives it: the medium through the front end and the
// official preprocessing, the vision graph, then the LLM with the visual blocks spliced in; timed per stage.
#pragma once
#include <functional>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "bundle.hpp"
#include "front_end.hpp"
#include "llm.hpp"
#include "vision.hpp"

namespace facellava {

struct RunnerOptions {
    std::string llm_type;  // the GGUF type; empty: the most precise in the bundle
    std::string vision_precision = "fp32";
    LlmOptions llm;
};

struct Request {
    std::string image, video;  // exactly one
    std::string landmarks;     // an official-format .npy, or empty
    bool no_landmarks = false;
    bool no_face_crop = false;
    int max_tokens = 256;
    Sampling sampling;
};

struct Timings {
    double face_detection_ms = 0, landmarks_ms = 0, preprocessing_ms = 0, vision_ms = 0, time_to_first_token_ms = 0,
           decode_tokens_per_s = 0, total_ms = 0;
    std::string line() const;  // the Python CLI's summary of the stages
};

struct Answer {
    Generation generation;
    std::string modality;
    std::string landmarks;  // where they came from: "file" or "none"
    Timings timings;
    // the Python CLI's --json object (Answer.to_json() plus vision_backend)
    nlohmann::ordered_json to_json(const std::string& vision_backend) const;
};

// Throws Error unless the question is non-empty (after whitespace) valid UTF-8 text.
void check_question(const std::string& question);

// The medium of a request through the whole-image front end (--no-face-crop) and the official preprocessing:
// the vision graph's pixel values. Throws Error.
std::vector<float> prepare_pixels(const Request& request);

class Runner {
  public:
    // Open a bundle: verify its manifest, pick the GGUF type (default: the most precise present) and load it.
    Runner(const std::string& bundle, const RunnerOptions& options);
    // Answer one question about one image or video; `on_piece` gets the text as it is generated (false: stop).
    Answer ask(const std::string& question, const Request& request,
               const std::function<bool(const std::string&)>& on_piece);
    const char* vision_backend() const { return vision_->name(); }
    // The front end used without --no-face-crop; none yet (face detection needs the bundle's front-end graphs).
    void set_front_end(std::unique_ptr<FrontEnd> front_end) { face_front_end_ = std::move(front_end); }

  private:
    Bundle bundle_;
    std::unique_ptr<OnnxVision> vision_;
    std::unique_ptr<LlamaModel> llm_;
    std::unique_ptr<FrontEnd> face_front_end_;
    WholeImageFrontEnd whole_image_;
};

// The checks of a question and request that need no bundle (runtime/cli.py makes them before opening one): the
// question, max_tokens, sampling, one medium, landmarks given or refused, and what cannot be served without a face
// front end (face detection, face-mesh landmarks). Throws Error.
void check_request(const std::string& question, const Request& request, bool has_face_front_end);

}  // namespace facellava
