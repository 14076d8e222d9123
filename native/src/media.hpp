// From a file to what the vision graph takes, as the Python runtime does it (runtime/face.py, runtime/preprocess.py):
// decoding (OpenCV), the official 8 frames of a video, LLaVA's expand2square, the official image and video
// preprocessing, and landmarks from an official-format .npy.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace facellava {

enum class Modality { image, video };
const char* modality_name(Modality modality);

// An RGB uint8 image, rows of width * 3 bytes.
struct Rgb {
    int height = 0;
    int width = 0;
    std::vector<std::uint8_t> data;
};

// The smallest side of an image that can hold a face (runtime/face.py's MIN_IMAGE_SIDE).
inline constexpr int MIN_IMAGE_SIDE = 32;

// An image file as RGB, upright (EXIF orientation applied). Throws Error for a missing path, a file that is not an
// image, and an image smaller than MIN_IMAGE_SIDE on a side.
// 16-bit images as Pillow makes them 8-bit (runtime/face.py): grey levels rint(v / 257), colour its high bytes.
Rgb load_image(const std::string& path);

// One frame of an OpenCV camera (runtime/cli.py's camera_frame) as RGB. Throws Error when it cannot be opened or
// gives no frame, or the frame is too small for a face.
// A frame read earlier by capture_camera_frame(index) is taken instead of a new one.
Rgb camera_frame(int index);

// Read one frame of camera `index` now and keep it for the next camera_frame(index): runtime/cli.py reads its frame
// before it opens the bundle, so a busy or missing camera is reported before the model loads. Throws Error when the
// camera cannot be opened or gives no frame.
void capture_camera_frame(int index);

// Throws Error when `rgb` is smaller than MIN_IMAGE_SIDE on a side; `name` names it.
void check_image(const Rgb& rgb, const std::string& name);

// The official frame choice, np.linspace(0, n - 1, 8, dtype=int) (contract.video_frame_indices).
std::vector<int> video_frame_indices(int num_video_frames);

// The 8 frames the official processor uses (decoded in order, no seeking) and the decoded frame count.
struct Video {
    std::vector<Rgb> frames;
    std::vector<int> frame_indices;
    int num_frames = 0;
};
Video read_video(const std::string& path);

// LLaVA's expand2square: the image centred on a square of SQUARE_FILL at its own size (no resampling).
Rgb expand2square(const Rgb& image);

// The official image preprocessing: ToTensor, Resize(224, bicubic with antialias: Pillow's float BICUBIC, the
// kernel runtime/preprocess.py uses), CenterCrop(224), Normalize(CLIP). Returns float32 [3, 224, 224].
std::vector<float> preprocess_image(const Rgb& image);

// The official video preprocessing of 8 frames: /255, Normalize, short side to 224 (bilinear, OpenCV's
// INTER_LINEAR as runtime/preprocess.py), CenterCrop(224). Returns float32 [3, 8, 224, 224].
std::vector<float> preprocess_video(const std::vector<Rgb>& frames);

// Pillow's resize of a single-channel float ('F') image with BICUBIC (a = -0.5, the kernel stretched when
// shrinking), computed the same way: coefficients and sums in double, two passes, horizontal first.
std::vector<float> resize_bicubic_pillow(const std::vector<float>& in, int in_height, int in_width, int out_height,
                                         int out_width);

// Landmarks from an official-format .npy (crop pixels, x before y), divided by 256 (runtime/face.py's
// load_landmarks): image (68, 2) or (136,) -> [68 * 2]; video (frames, 68, 2) or (frames, 136), one row per decoded
// frame -> the rows at the official frame indices, [8 * 68 * 2]. Throws Error for a missing or unreadable file, a
// wrong shape, a frame count that does not match, non-finite values, and values that look already divided.
std::vector<float> load_landmarks(const std::string& path, Modality modality, int num_video_frames);

}  // namespace facellava
