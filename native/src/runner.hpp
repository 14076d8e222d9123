// The whole answer from a bundle, as runtime/pipeline.py gives it: the medium through the front end and the
// official preprocessing, the vision graph, then the LLM with the visual blocks spliced in; timed per stage.
#pragma once
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "bundle.hpp"
#include "front_end.hpp"
#include "front_end_generated.hpp"
#include "tasks_generated.hpp"
#include "llm.hpp"
#include "vision.hpp"

namespace facellava {

struct RunnerOptions {
    std::string llm_type;  // the GGUF type; empty: the most precise in the bundle
    std::string vision_precision = "fp32";
    int min_face = front_end::MIN_FACE_SIDE;  // the smallest face searched for, in pixels
    std::string device = "auto";  // the ONNX graphs' execution providers: auto, cpu, cuda or tensorrt
    std::string vision = "auto";  // the vision backend: auto, onnxruntime or tensorrt (runtime/vision.py's)
    LlmOptions llm;
};

// The built-in task called `name` (runtime/structured.py's TASKS, generated). Throws Error for any other name.
const tasks::Task& get_task(const std::string& name);

// Throws Error unless the smallest face searched for is at least 1 pixel (runtime/pipeline.py's check).
void check_min_face(int min_face);

struct Request {
    std::string image, video;  // exactly one of these or a camera
    std::optional<int> camera;  // one frame of this OpenCV camera
    std::string landmarks;     // an official-format .npy, or empty
    bool no_landmarks = false;
    bool no_face_crop = false;
    std::optional<int> face_index;  // which face, left to right; none: the largest
    std::string task;               // a built-in task (runtime/structured.py): the answer in its JSON schema
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

// The medium of a request (its image, or its video's 8 frames) through the bundle's front-end graphs: the crops,
// landmarks (unless the request gives or refuses them) and face boxes. Throws Error.
std::vector<FaceCrop> face_crops(const std::string& bundle, int min_face, const Request& request,
                                 const std::string& device = "auto");

class Runner {
  public:
    // Open a bundle: verify its manifest, pick the GGUF type (default: the most precise present) and load it.
    Runner(const std::string& bundle, const RunnerOptions& options);
    // Answer one question about one image or video; `on_piece` gets the text as it is generated (false: stop).
    Answer ask(const std::string& question, const Request& request,
               const std::function<bool(const std::string&)>& on_piece);
    const char* vision_backend() const { return vision_->name(); }

  private:
    Bundle bundle_;
    int min_face_;
    std::string device_;
    std::unique_ptr<VisionBackend> vision_;
    std::unique_ptr<LlamaModel> llm_;
    std::unique_ptr<GraphsFrontEnd> graphs_;  // opened on the first request that needs them
    WholeImageFrontEnd whole_image_;
};

// The checks of a question and request that need no bundle (runtime/cli.py makes them before opening one): the
// question, max_tokens, sampling, one medium, landmarks given or refused. Throws Error.
void check_request(const std::string& question, const Request& request);

}  // namespace facellava
