// The face front end behind one small interface, so that the bundle's ONNX front-end graphs (face detection and
// landmarks, issue 13) slot in later beside the whole-image path that needs no model.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "media.hpp"

namespace facellava {

// What a front end makes of one image or video frame (runtime/face.py's FaceCrop).
struct FaceCrop {
    Rgb crop;                                 // the face crop, or the whole image padded to a square
    std::optional<std::vector<float>> landmarks;  // [68 * 2] in crop pixels / 256, when asked for and found
    double detect_ms = 0.0;
    double landmarks_ms = 0.0;
};

class FrontEnd {
  public:
    virtual ~FrontEnd() = default;
    // Crop the face of one image (or frame) and, with `landmarks`, find its 68 landmarks. Throws Error for no face.
    virtual FaceCrop process(const Rgb& rgb, bool landmarks, const std::string& name) = 0;
};

// `--no-face-crop`: the whole image padded to a square (expand2square, the official treatment of a non-square
// image), no model; landmarks come from a file or are not used.
class WholeImageFrontEnd : public FrontEnd {
  public:
    FaceCrop process(const Rgb& rgb, bool landmarks, const std::string& name) override;
};

}  // namespace facellava
