// The face front end (runtime/face.py's FaceFrontEnd on runtime/face_graphs.py's FrontEndGraphs): face detection
// on the bundle's BlazeFace graphs, the official square crop, and the 68 landmarks from the face-mesh graph, with
// MediaPipe's processing around the networks restated as the Python reference states it; and the whole-image path
// (--no-face-crop) that needs no model.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bundle.hpp"
#include "media.hpp"

namespace facellava {

// One detected face in the official detector's convention (runtime/face.py's FaceBox): integer pixels of the
// original image, the top-left corner clamped into it, the size kept; `official`: the official detector's own box.
struct FaceBox {
    int x = 0, y = 0, width = 0, height = 0;
    double score = 0.0;
    bool official = false;
    long long area() const { return static_cast<long long>(width) * height; }
    double center_x() const { return x + width / 2.0; }
    double center_y() const { return y + height / 2.0; }
};

// What a front end makes of one image or video frame (runtime/face.py's FaceCrop).
struct FaceCrop {
    Rgb crop;                                     // the 256 x 256 face crop, or the whole image padded to a square
    std::optional<std::vector<float>> landmarks;  // [68 * 2] in crop pixels / crop side, when asked for and found
    std::optional<FaceBox> box;                   // the face the crop was cut around (none for the whole image)
    double detect_ms = 0.0;
    double landmarks_ms = 0.0;
};

struct FaceOptions {
    std::optional<int> face_index;  // which face, counted left to right; none: the largest
    bool no_face_crop = false;      // the whole image padded to a square, no detection
    bool landmarks = false;         // run the face mesh
};

class FrontEnd {
  public:
    virtual ~FrontEnd() = default;
    // One image: its face crop and, with `options.landmarks`, its 68 landmarks. Throws Error (no face, face index
    // out of range). `name` names the image in messages.
    virtual FaceCrop process_image(const Rgb& rgb, const FaceOptions& options, const std::string& name) = 0;
    // The 8 frames of a video: the face chosen in the first frame that has one and followed through the others.
    virtual std::vector<FaceCrop> process_video(const std::vector<Rgb>& frames, const FaceOptions& options,
                                                const std::string& name) = 0;
};

// `--no-face-crop` without the front-end graphs: the whole image padded to a square (expand2square, the official
// treatment of a non-square image), no model; landmarks come from a file or are not used.
class WholeImageFrontEnd : public FrontEnd {
  public:
    FaceCrop process_image(const Rgb& rgb, const FaceOptions& options, const std::string& name) override;
    std::vector<FaceCrop> process_video(const std::vector<Rgb>& frames, const FaceOptions& options,
                                        const std::string& name) override;
};

// Whether the bundle's manifest lists the three front-end graphs (face_graphs.has_front_end_graphs).
bool has_front_end_graphs(const Bundle& bundle);

// A face detection relative to the image the detector saw (face_graphs.Detection): box (xmin, ymin, width,
// height) and six keypoints in [0, 1] units of its width and height, float32 as numpy computes them.
struct Detection {
    float box[4];
    float keypoints[6][2];
    float score;
};

// One output of a front-end network, float32 (runtime/face_graphs.py's Network gives {name: array}).
struct NetworkOutput {
    std::string name;
    std::vector<std::int64_t> shape;
    std::vector<float> values;  // empty when the output is not float32
    bool float32 = true;
};

// One front-end network (face_graphs.py's Network): one float32 NHWC input in, every output by name. On ONNX
// Runtime here; on a TensorRT engine in tensorrt_vision.cpp (builds with TensorRT only).
class FrontEndNetwork {
  public:
    virtual ~FrontEndNetwork() = default;
    virtual const std::string& name() const = 0;  // the manifest's file name, for messages
    virtual std::vector<std::string> output_names() const = 0;
    // `tensor` of `shape` ([1, side, side, 3]) in; every output, in output_names' order. Throws Error.
    virtual std::vector<NetworkOutput> run(const std::vector<float>& tensor, const std::vector<std::int64_t>& shape) = 0;
};

// The three networks by model ("short_range", "full_range", "mesh"), as FrontEndGraphs holds them.
using FrontEndNetworks = std::map<std::string, std::unique_ptr<FrontEndNetwork>>;

class GraphsFrontEnd : public FrontEnd {
  public:
    // The bundle's three graphs on ONNX Runtime (one thread each, as runtime/face_graphs.py opens them) on
    // `device`'s execution providers (onnx_session.hpp's execution_providers), each verified by the bundle first;
    // or, when `networks` holds the three, those (the bundle's TensorRT engines of them). `min_face_side`: the
    // smallest face searched for, in pixels. Throws Error when the bundle lacks them or they cannot be loaded.
    GraphsFrontEnd(const Bundle& bundle, int min_face_side, const std::string& device = "cpu",
                   FrontEndNetworks networks = {});
    ~GraphsFrontEnd() override;

    FaceCrop process_image(const Rgb& rgb, const FaceOptions& options, const std::string& name) override;
    std::vector<FaceCrop> process_video(const std::vector<Rgb>& frames, const FaceOptions& options,
                                        const std::string& name) override;

    // FrontEndGraphs.detections: one detector ("short_range" or "full_range") on a whole image, best first.
    std::vector<Detection> detections(const Rgb& rgb, const std::string& model, std::optional<float> min_score = {});
    // FrontEndGraphs.mesh: the face mesh's 478 points relative to the image, or none.
    std::optional<std::vector<double>> mesh(const Rgb& rgb);
    // FaceFrontEnd.detect: every face, left to right.
    std::vector<FaceBox> detect(const Rgb& rgb);
    // FaceFrontEnd.landmarks: the 68 points of the face in a square crop (crop pixels / crop side), or none.
    std::optional<std::vector<float>> landmarks(const Rgb& crop);

  private:
    struct Graphs;
    std::vector<FaceBox> detect_near(const Rgb& rgb, const FaceBox& box);
    std::vector<FaceBox> look(const std::string& detector, const Rgb& rgb, int left, int top, int width, int height,
                              int border = 0, bool tile = false);
    std::pair<std::optional<FaceBox>, std::vector<FaceBox>> official_detections(const Rgb& rgb);
    std::vector<int> tile_sides(int height, int width) const;
    std::unique_ptr<Graphs> graphs_;
    int min_face_side_;
};

// The official tools/crop_face.py crop of one face (runtime/face.py's official_crop): uint8 RGB 256 x 256.
Rgb official_crop(const Rgb& rgb, const FaceBox& box);

}  // namespace facellava
