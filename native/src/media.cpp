#include "media.hpp"

#include <sys/stat.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <regex>

#include <opencv2/core.hpp>
#include <opencv2/core/utils/logger.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <opencv2/videoio.hpp>

#include "contract_generated.hpp"
#include "errors.hpp"

namespace facellava {

namespace {

using contract::IMAGE_SIZE;
using contract::NUM_FRAMES;

void quiet_opencv() {
    // OpenCV's own warnings (a file it cannot read) would add lines to the one-line errors
    static const bool done = [] {
        cv::utils::logging::setLogLevel(cv::utils::logging::LOG_LEVEL_SILENT);
        return true;
    }();
    (void)done;
}

bool is_file(const std::string& path, bool& is_directory) {
    struct stat st {};
    is_directory = false;
    if (::stat(path.c_str(), &st) != 0) return false;
    is_directory = S_ISDIR(st.st_mode);
    return S_ISREG(st.st_mode);
}

Rgb from_bgr(const cv::Mat& bgr) {
    cv::Mat rgb;
    cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
    Rgb out;
    out.height = rgb.rows;
    out.width = rgb.cols;
    out.data.resize(static_cast<std::size_t>(rgb.rows) * rgb.cols * 3);
    for (int y = 0; y < rgb.rows; ++y)
        std::memcpy(out.data.data() + static_cast<std::size_t>(y) * rgb.cols * 3, rgb.ptr(y),
                    static_cast<std::size_t>(rgb.cols) * 3);
    return out;
}

// torchvision's CenterCrop offsets: int(round((size - side) / 2.0)), Python's round (half to even)
int crop_offset(int size, int side) { return static_cast<int>(std::nearbyint((size - side) / 2.0)); }

float clip_mean(int c) { return static_cast<float>(contract::CLIP_MEAN[c]); }
float clip_std(int c) { return static_cast<float>(contract::CLIP_STD[c]); }

// --- Pillow's BICUBIC on float images ----------------------------------------------------------------------

double bicubic(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

struct Coefficients {
    int ksize = 0;
    std::vector<int> first;   // first input index of each output
    std::vector<int> count;   // how many inputs it uses
    std::vector<double> weights;  // ksize per output
};

Coefficients coefficients(int in_size, int out_size) {
    Coefficients c;
    // Pillow passes the box as floats: in1 - in0 is a float subtraction
    double scale = static_cast<double>(static_cast<float>(in_size) - 0.0f) / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 2.0 * filterscale;
    c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
    c.first.resize(out_size);
    c.count.resize(out_size);
    c.weights.assign(static_cast<std::size_t>(out_size) * c.ksize, 0.0);
    for (int xx = 0; xx < out_size; ++xx) {
        double center = 0.0 + (xx + 0.5) * scale;
        double total = 0.0;
        double ss = 1.0 / filterscale;
        int xmin = static_cast<int>(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = static_cast<int>(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        double* k = &c.weights[static_cast<std::size_t>(xx) * c.ksize];
        for (int x = 0; x < xmax; ++x) {
            double w = bicubic((x + xmin - center + 0.5) * ss);
            k[x] = w;
            total += w;
        }
        for (int x = 0; x < xmax; ++x)
            if (total != 0.0) k[x] /= total;
        c.first[xx] = xmin;
        c.count[xx] = xmax;
    }
    return c;
}

// The number of colour components of a JPEG file (its first frame header's), or 0 for a file that is not a JPEG or
// whose header cannot be read (OpenCV then decides).
int jpeg_components(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    unsigned char marker[4];
    if (!in.read(reinterpret_cast<char*>(marker), 2) || marker[0] != 0xFF || marker[1] != 0xD8) return 0;
    while (in.read(reinterpret_cast<char*>(marker), 2)) {
        if (marker[0] != 0xFF) return 0;
        if (marker[1] == 0xFF) {  // fill bytes before a marker
            in.seekg(-1, std::ios::cur);
            continue;
        }
        if (marker[1] == 0x01 || (marker[1] >= 0xD0 && marker[1] <= 0xD7)) continue;  // no length
        if (!in.read(reinterpret_cast<char*>(marker + 2), 2)) return 0;
        int length = (marker[2] << 8) | marker[3];
        bool frame = marker[1] >= 0xC0 && marker[1] <= 0xCF && marker[1] != 0xC4 && marker[1] != 0xC8 &&
                     marker[1] != 0xCC;  // SOF0..SOF15 but DHT, JPG and DAC
        if (frame) {
            unsigned char header[6];  // precision, height, width, components
            return in.read(reinterpret_cast<char*>(header), 6) ? header[5] : 0;
        }
        if (length < 2 || marker[1] == 0xDA) return 0;  // start of scan before a frame header: not a JPEG we know
        in.seekg(length - 2, std::ios::cur);
    }
    return 0;
}

// Whether a TIFF file's first image holds 8-bit samples with an unassociated alpha (ExtraSamples 2), or false when
// the file is not a classic TIFF or its header cannot be read.
bool tiff_unassociated_alpha(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    unsigned char header[8];
    if (!in.read(reinterpret_cast<char*>(header), 8)) return false;
    bool little = header[0] == 'I' && header[1] == 'I' && header[2] == 42 && header[3] == 0;
    bool big = header[0] == 'M' && header[1] == 'M' && header[2] == 0 && header[3] == 42;
    if (!little && !big) return false;
    auto number = [&](const unsigned char* bytes, int size) {
        std::uint32_t value = 0;
        for (int i = 0; i < size; ++i) value |= static_cast<std::uint32_t>(bytes[little ? i : size - 1 - i]) << (8 * i);
        return value;
    };
    // the first value of a SHORT field: in the entry itself (count <= 2) or at its offset
    auto first_short = [&](const unsigned char* entry) -> std::uint32_t {
        std::uint32_t count = number(entry + 4, 4);
        if (number(entry + 2, 2) != 3 || count == 0) return 0;
        if (count <= 2) return number(entry + 8, 2);
        unsigned char value[2];
        auto back = in.tellg();
        in.seekg(number(entry + 8, 4));
        bool read = static_cast<bool>(in.read(reinterpret_cast<char*>(value), 2));
        in.clear();
        in.seekg(back);
        return read ? number(value, 2) : 0;
    };
    in.seekg(number(header + 4, 4));
    unsigned char count_bytes[2];
    if (!in.read(reinterpret_cast<char*>(count_bytes), 2)) return false;
    std::uint32_t entries = number(count_bytes, 2), bits = 1, extra = 0;
    for (std::uint32_t i = 0; i < entries; ++i) {
        unsigned char entry[12];
        if (!in.read(reinterpret_cast<char*>(entry), 12)) return false;
        std::uint32_t tag = number(entry, 2);
        if (tag == 258) bits = first_short(entry);   // BitsPerSample
        if (tag == 338) extra = first_short(entry);  // ExtraSamples: 1 associated alpha, 2 unassociated
    }
    return extra == 2 && bits == 8;
}

}  // namespace

const char* modality_name(Modality modality) { return modality == Modality::image ? "image" : "video"; }

void check_image(const Rgb& rgb, const std::string& name) {
    if (std::min(rgb.height, rgb.width) < MIN_IMAGE_SIDE) {
        throw Error(name + " is " + std::to_string(rgb.width) + "x" + std::to_string(rgb.height) +
                    " pixels, too small to hold a face; give an image at least " + std::to_string(MIN_IMAGE_SIDE) +
                    " pixels on each side");
    }
}

Rgb load_image(const std::string& path) {
    quiet_opencv();
    bool directory = false;
    if (!is_file(path, directory)) throw Error("image not found: " + path + (directory ? " is a directory" : ""));
    if (jpeg_components(path) == 4) {
        // Pillow (runtime/face.py) converts CMYK with rounded products, OpenCV with truncated ones (>> 8): one grey
        // level apart on most pixels. Refused rather than answered from other pixels than the Python runtime's.
        throw Error(path + " is a CMYK JPEG, which this runner cannot decode as the Python runtime does; save it as "
                    "RGB first, or answer with `facellava run`");
    }
    if (tiff_unassociated_alpha(path)) {
        // OpenCV reads 8-bit TIFFs through libtiff's RGBA interface, which multiplies the colours by an unassociated
        // alpha; Pillow keeps them and drops the alpha
        throw Error(path + " is a TIFF with an unassociated alpha channel, which this runner cannot decode as the "
                    "Python runtime does; save it without alpha first, or answer with `facellava run`");
    }
    cv::Mat bgr;
    try {
        // EXIF orientation applied, alpha dropped, grey expanded; 16-bit levels kept for the scaling below
        bgr = cv::imread(path, cv::IMREAD_COLOR | cv::IMREAD_ANYDEPTH);
        if (!bgr.empty() && bgr.depth() == CV_16U) {
            // Pillow (runtime/face.py's _pil_to_rgb) reads 16-bit colour as its high bytes (OpenCV's >> 8 too) but
            // 16-bit grey ("I;16") as rint(level / 257); only the grey ones need their own scaling
            cv::Mat levels = cv::imread(path, cv::IMREAD_ANYCOLOR | cv::IMREAD_ANYDEPTH);
            if (levels.channels() == 1 && levels.depth() == CV_16U) {
                cv::Mat grey(levels.rows, levels.cols, CV_8UC1);
                for (int y = 0; y < levels.rows; ++y)
                    for (int x = 0; x < levels.cols; ++x)
                        grey.at<std::uint8_t>(y, x) = static_cast<std::uint8_t>(
                            std::nearbyint(levels.at<std::uint16_t>(y, x) / 257.0));
                cv::cvtColor(grey, bgr, cv::COLOR_GRAY2BGR);
            } else {
                cv::Mat high(bgr.rows, bgr.cols, CV_8UC3);
                for (int y = 0; y < bgr.rows; ++y) {
                    const std::uint16_t* in = bgr.ptr<std::uint16_t>(y);
                    std::uint8_t* out = high.ptr<std::uint8_t>(y);
                    for (int i = 0; i < bgr.cols * 3; ++i) out[i] = static_cast<std::uint8_t>(in[i] >> 8);
                }
                bgr = high;
            }
        } else if (!bgr.empty() && bgr.depth() != CV_8U) {
            bgr = cv::imread(path, cv::IMREAD_COLOR);  // other depths as OpenCV makes them 8-bit
        }
    } catch (const cv::Exception&) {
        bgr = cv::Mat();
    }
    if (bgr.empty()) {
        throw Error(path + " is not an image OpenCV can read; give a JPEG, PNG, BMP, TIFF or WebP file");
    }
    Rgb rgb = from_bgr(bgr);
    check_image(rgb, path);
    return rgb;
}

namespace {

Rgb read_camera(int index) {
    quiet_opencv();
    cv::Mat bgr;
    try {
        cv::VideoCapture capture(index);
        if (capture.isOpened() && !capture.read(bgr)) bgr = cv::Mat();
    } catch (const cv::Exception&) {
        bgr = cv::Mat();
    }
    if (bgr.empty() || bgr.type() != CV_8UC3)
        throw Error("camera " + std::to_string(index) + " cannot be opened or gives no frame");
    return from_bgr(bgr);
}

// frames read by capture_camera_frame and not yet taken, by camera index
std::mutex captured_mutex;
std::map<int, Rgb> captured;

}  // namespace

void capture_camera_frame(int index) {
    Rgb frame = read_camera(index);
    std::lock_guard<std::mutex> lock(captured_mutex);
    captured[index] = std::move(frame);
}

Rgb camera_frame(int index) {
    std::optional<Rgb> kept;
    {
        std::lock_guard<std::mutex> lock(captured_mutex);
        if (auto found = captured.find(index); found != captured.end()) {
            kept = std::move(found->second);
            captured.erase(found);
        }
    }
    Rgb rgb = kept ? std::move(*kept) : read_camera(index);
    check_image(rgb, "camera " + std::to_string(index));
    return rgb;
}

std::vector<int> video_frame_indices(int num_video_frames) {
    if (num_video_frames < 1) throw Error("a video needs at least one frame");
    int last = num_video_frames - 1;
    double step = static_cast<double>(last) / (NUM_FRAMES - 1);
    std::vector<int> indices;
    for (int i = 0; i < NUM_FRAMES - 1; ++i) indices.push_back(static_cast<int>(i * step));
    indices.push_back(last);
    return indices;
}

namespace {

cv::VideoCapture open_video(const std::string& path) {
    cv::VideoCapture capture;
    try {
        capture.open(path, cv::CAP_FFMPEG);
    } catch (const cv::Exception&) {
    }
    if (!capture.isOpened())
        throw Error(path + " is not a video OpenCV can decode; give an MP4, AVI, MOV, MKV or WebM file");
    return capture;
}

// decode every frame in order, keeping the wanted ones as RGB; returns the frame count
int decode_frames(const std::string& path, const std::vector<int>& wanted, std::vector<std::pair<int, Rgb>>& frames) {
    cv::VideoCapture capture = open_video(path);
    int index = 0;
    while (capture.grab()) {
        if (std::find(wanted.begin(), wanted.end(), index) != wanted.end()) {
            cv::Mat bgr;
            if (!capture.retrieve(bgr)) break;
            frames.emplace_back(index, from_bgr(bgr));
        }
        ++index;
    }
    return index;
}

}  // namespace

Video read_video(const std::string& path) {
    quiet_opencv();
    bool directory = false;
    if (!is_file(path, directory)) throw Error("video not found: " + path + (directory ? " is a directory" : ""));
    int reported = 0;
    {
        cv::VideoCapture capture = open_video(path);
        reported = static_cast<int>(capture.get(cv::CAP_PROP_FRAME_COUNT));
    }
    std::vector<int> wanted = reported > 0 ? video_frame_indices(reported) : std::vector<int>{};
    std::vector<std::pair<int, Rgb>> frames;
    int decoded = decode_frames(path, wanted, frames);
    if (decoded == 0) throw Error("no frames could be decoded from " + path + "; the video may be corrupt");
    if (decoded != reported) {
        wanted = video_frame_indices(decoded);
        frames.clear();
        decode_frames(path, wanted, frames);
    }
    Video video;
    video.frame_indices = wanted;
    video.num_frames = decoded;
    for (int index : wanted) {
        auto found = std::find_if(frames.begin(), frames.end(), [&](const auto& f) { return f.first == index; });
        if (found == frames.end()) throw Error("frame " + std::to_string(index) + " of " + path + " could not be decoded");
        video.frames.push_back(found->second);
    }
    return video;
}

Rgb expand2square(const Rgb& image) {
    if (image.height == image.width) return image;
    int side = std::max(image.height, image.width);
    Rgb square;
    square.height = square.width = side;
    square.data.resize(static_cast<std::size_t>(side) * side * 3);
    for (std::size_t i = 0; i < square.data.size(); i += 3)
        for (int c = 0; c < 3; ++c) square.data[i + c] = contract::SQUARE_FILL[c];
    int top = (side - image.height) / 2, left = (side - image.width) / 2;
    for (int y = 0; y < image.height; ++y)
        std::memcpy(&square.data[(static_cast<std::size_t>(top + y) * side + left) * 3],
                    &image.data[static_cast<std::size_t>(y) * image.width * 3], static_cast<std::size_t>(image.width) * 3);
    return square;
}

std::vector<float> resize_bicubic_pillow(const std::vector<float>& in, int in_height, int in_width, int out_height,
                                         int out_width) {
    std::vector<float> current = in;
    int width = in_width;
    if (out_width != in_width) {  // horizontal pass
        Coefficients c = coefficients(in_width, out_width);
        std::vector<float> out(static_cast<std::size_t>(in_height) * out_width);
        for (int y = 0; y < in_height; ++y) {
            const float* row = &current[static_cast<std::size_t>(y) * width];
            for (int xx = 0; xx < out_width; ++xx) {
                const double* k = &c.weights[static_cast<std::size_t>(xx) * c.ksize];
                double ss = 0.0;
                for (int x = 0; x < c.count[xx]; ++x) ss += row[x + c.first[xx]] * k[x];
                out[static_cast<std::size_t>(y) * out_width + xx] = static_cast<float>(ss);
            }
        }
        current.swap(out);
        width = out_width;
    }
    if (out_height != in_height) {  // vertical pass
        Coefficients c = coefficients(in_height, out_height);
        std::vector<float> out(static_cast<std::size_t>(out_height) * width);
        for (int yy = 0; yy < out_height; ++yy) {
            const double* k = &c.weights[static_cast<std::size_t>(yy) * c.ksize];
            for (int x = 0; x < width; ++x) {
                double ss = 0.0;
                for (int y = 0; y < c.count[yy]; ++y)
                    ss += current[static_cast<std::size_t>(y + c.first[yy]) * width + x] * k[y];
                out[static_cast<std::size_t>(yy) * width + x] = static_cast<float>(ss);
            }
        }
        current.swap(out);
    }
    return current;
}

std::vector<float> preprocess_image(const Rgb& image) {
    int height = image.height, width = image.width;
    // torchvision's Resize(int): the short side becomes 224, the long side int(224 * long / short)
    int out_height, out_width;
    if (height <= width) {
        out_height = IMAGE_SIZE;
        out_width = static_cast<int>(static_cast<double>(IMAGE_SIZE * width) / height);
    } else {
        out_height = static_cast<int>(static_cast<double>(IMAGE_SIZE * height) / width);
        out_width = IMAGE_SIZE;
    }
    int top = crop_offset(out_height, IMAGE_SIZE), left = crop_offset(out_width, IMAGE_SIZE);
    std::vector<float> out(static_cast<std::size_t>(3) * IMAGE_SIZE * IMAGE_SIZE);
    std::vector<float> channel(static_cast<std::size_t>(height) * width);
    for (int c = 0; c < 3; ++c) {
        for (std::size_t i = 0; i < channel.size(); ++i) channel[i] = static_cast<float>(image.data[i * 3 + c]) / 255.0f;
        std::vector<float> resized = (out_height == height && out_width == width)
                                         ? channel
                                         : resize_bicubic_pillow(channel, height, width, out_height, out_width);
        for (int y = 0; y < IMAGE_SIZE; ++y)
            for (int x = 0; x < IMAGE_SIZE; ++x) {
                float v = resized[static_cast<std::size_t>(y + top) * out_width + (x + left)];
                out[(static_cast<std::size_t>(c) * IMAGE_SIZE + y) * IMAGE_SIZE + x] = (v - clip_mean(c)) / clip_std(c);
            }
    }
    return out;
}

std::vector<float> preprocess_video(const std::vector<Rgb>& frames) {
    if (frames.size() != static_cast<std::size_t>(NUM_FRAMES))
        throw std::invalid_argument("the video tower takes exactly 8 frames");
    int height = frames[0].height, width = frames[0].width;
    for (const Rgb& frame : frames)
        if (frame.height != height || frame.width != width) throw Error("the video's frames differ in size");
    // pytorchvideo's short_side_scale: the short side becomes 224, the long side floor(224 * long / short)
    int out_height, out_width;
    if (width < height) {
        out_height = static_cast<int>(std::floor(static_cast<double>(height) / width * IMAGE_SIZE));
        out_width = IMAGE_SIZE;
    } else {
        out_height = IMAGE_SIZE;
        out_width = static_cast<int>(std::floor(static_cast<double>(width) / height * IMAGE_SIZE));
    }
    int top = crop_offset(out_height, IMAGE_SIZE), left = crop_offset(out_width, IMAGE_SIZE);
    const std::size_t plane = static_cast<std::size_t>(IMAGE_SIZE) * IMAGE_SIZE;
    std::vector<float> out(3 * NUM_FRAMES * plane);
    for (int t = 0; t < NUM_FRAMES; ++t) {
        cv::Mat normalized(height, width, CV_32FC3);
        for (int y = 0; y < height; ++y) {
            float* row = normalized.ptr<float>(y);
            const std::uint8_t* src = &frames[t].data[static_cast<std::size_t>(y) * width * 3];
            for (int i = 0; i < width * 3; ++i) {
                int c = i % 3;
                row[i] = (static_cast<float>(src[i]) / 255.0f - clip_mean(c)) / clip_std(c);
            }
        }
        cv::Mat resized;
        cv::resize(normalized, resized, cv::Size(out_width, out_height), 0, 0, cv::INTER_LINEAR);
        for (int y = 0; y < IMAGE_SIZE; ++y) {
            const float* row = resized.ptr<float>(y + top);
            for (int x = 0; x < IMAGE_SIZE; ++x)
                for (int c = 0; c < 3; ++c)
                    out[(static_cast<std::size_t>(c) * NUM_FRAMES + t) * plane + static_cast<std::size_t>(y) * IMAGE_SIZE + x] =
                        row[(x + left) * 3 + c];
        }
    }
    return out;
}

// --- landmarks from .npy ---------------------------------------------------------------------------------

namespace {

std::string shape_text(const std::vector<long long>& shape) {
    std::string out = "(";
    for (std::size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
    return out + (shape.size() == 1 ? ",)" : ")");
}

struct NpyArray {
    std::vector<long long> shape;
    std::vector<double> values;  // C order
};

NpyArray read_npy(const std::string& path) {
    auto unreadable = [&](const std::string& reason) {
        return Error(path + " is not a readable .npy array (" + reason + "); save landmarks with numpy.save");
    };
    auto not_numeric = [&] {
        return Error(path + " does not hold a numeric array; save a (68, 2) array with numpy.save");
    };
    std::ifstream in(path, std::ios::binary);
    if (!in) throw unreadable(std::strerror(errno));
    char magic[8] = {};
    in.read(magic, 8);
    if (in.gcount() != 8 || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw unreadable("not a .npy file");
    std::uint32_t header_size = 0;
    if (magic[6] == 1) {
        unsigned char size[2] = {};
        in.read(reinterpret_cast<char*>(size), 2);
        header_size = size[0] | (size[1] << 8);
    } else if (magic[6] == 2 || magic[6] == 3) {
        unsigned char size[4] = {};
        in.read(reinterpret_cast<char*>(size), 4);
        header_size = size[0] | (size[1] << 8) | (size[2] << 16) | (static_cast<std::uint32_t>(size[3]) << 24);
    } else {
        throw unreadable("an unknown .npy version");
    }
    if (!in || header_size > (1u << 20)) throw unreadable("a damaged header");
    std::string header(header_size, '\0');
    in.read(header.data(), header_size);
    if (static_cast<std::uint32_t>(in.gcount()) != header_size) throw unreadable("a truncated header");
    std::smatch match;
    if (!std::regex_search(header, match, std::regex(R"('descr'\s*:\s*'([^']*)')"))) {
        if (header.find("'descr'") != std::string::npos) throw not_numeric();  // a structured dtype
        throw unreadable("a header without descr");
    }
    std::string descr = match[1];
    bool fortran = std::regex_search(header, std::regex(R"('fortran_order'\s*:\s*True)"));
    if (!std::regex_search(header, match, std::regex(R"('shape'\s*:\s*\(([^)]*)\))"))) throw unreadable("a header without shape");
    NpyArray array;
    std::string dims = match[1];
    const std::regex number(R"(\d+)");
    for (std::sregex_iterator it(dims.begin(), dims.end(), number), end; it != end; ++it)
        array.shape.push_back(std::stoll(it->str()));
    if (descr.size() < 3) throw not_numeric();
    char order = descr[0], kind = descr[1];
    int size = std::atoi(descr.c_str() + 2);
    bool big = order == '>';
    if (kind == 'O') throw unreadable("Object arrays cannot be loaded when allow_pickle=False");
    bool numeric = (kind == 'f' && (size == 4 || size == 8)) || ((kind == 'i' || kind == 'u') &&
                   (size == 1 || size == 2 || size == 4 || size == 8));
    if (!numeric) throw not_numeric();
    unsigned long long total = 1;
    for (long long d : array.shape) {
        if (d > 0 && total > (1ull << 32) / static_cast<unsigned long long>(d)) throw unreadable("an array too large");
        total *= static_cast<unsigned long long>(d);
    }
    std::vector<unsigned char> raw(total * size);
    in.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(raw.size()));
    if (static_cast<std::size_t>(in.gcount()) != raw.size()) throw unreadable("the file is truncated");
    std::vector<double> values(total);
    for (std::size_t i = 0; i < total; ++i) {
        unsigned char bytes[8];
        for (int b = 0; b < size; ++b) bytes[b] = raw[i * size + (big ? size - 1 - b : b)];
        double v = 0;
        if (kind == 'f' && size == 4) { float f; std::memcpy(&f, bytes, 4); v = f; }
        else if (kind == 'f') { std::memcpy(&v, bytes, 8); }
        else if (kind == 'i' && size == 1) { std::int8_t x; std::memcpy(&x, bytes, 1); v = x; }
        else if (kind == 'i' && size == 2) { std::int16_t x; std::memcpy(&x, bytes, 2); v = x; }
        else if (kind == 'i' && size == 4) { std::int32_t x; std::memcpy(&x, bytes, 4); v = x; }
        else if (kind == 'i') { std::int64_t x; std::memcpy(&x, bytes, 8); v = static_cast<double>(x); }
        else if (size == 1) { v = bytes[0]; }
        else if (size == 2) { std::uint16_t x; std::memcpy(&x, bytes, 2); v = x; }
        else if (size == 4) { std::uint32_t x; std::memcpy(&x, bytes, 4); v = x; }
        else { std::uint64_t x; std::memcpy(&x, bytes, 8); v = static_cast<double>(x); }
        values[i] = v;
    }
    if (fortran && array.shape.size() > 1) {  // to C order
        std::vector<double> c_order(total);
        std::size_t rank = array.shape.size();
        std::vector<long long> index(rank, 0);
        for (std::size_t f = 0; f < total; ++f) {
            std::size_t c = 0;
            for (std::size_t d = 0; d < rank; ++d) c = c * array.shape[d] + index[d];
            c_order[c] = values[f];
            for (std::size_t d = 0; d < rank; ++d) {  // Fortran order: the first index runs fastest
                if (++index[d] < array.shape[d]) break;
                index[d] = 0;
            }
        }
        values.swap(c_order);
    }
    array.values = std::move(values);
    return array;
}

}  // namespace

std::vector<float> load_landmarks(const std::string& path, Modality modality, int num_video_frames) {
    bool directory = false;
    if (!is_file(path, directory)) throw Error("landmarks file not found: " + path);
    NpyArray array = read_npy(path);
    const auto& shape = array.shape;
    const int points = contract::NUM_LANDMARKS;
    auto per_point = [&](const std::vector<long long>& tail) {
        return tail == std::vector<long long>{points, 2} || tail == std::vector<long long>{contract::LANDMARK_VALUES};
    };
    std::vector<double> values;
    if (modality == Modality::image) {
        if (!per_point(shape)) {
            throw Error(path + " has shape " + shape_text(shape) + "; image landmarks must be (68, 2) or (136,): the 68 "
                        "iBUG points, x then y");
        }
        values = array.values;
    } else {
        if (shape.size() < 2 || !per_point(std::vector<long long>(shape.begin() + 1, shape.end()))) {
            throw Error(path + " has shape " + shape_text(shape) + "; video landmarks must be (frames, 68, 2) or "
                        "(frames, 136), one row per decoded frame");
        }
        if (shape[0] != num_video_frames) {
            throw Error(path + " has landmarks for " + std::to_string(shape[0]) + " frames but the video decodes to " +
                        std::to_string(num_video_frames) + "; give one row per decoded frame");
        }
        const std::size_t row = static_cast<std::size_t>(contract::LANDMARK_VALUES);
        for (int index : video_frame_indices(num_video_frames))
            values.insert(values.end(), array.values.begin() + index * row, array.values.begin() + (index + 1) * row);
    }
    double largest = 0;
    for (double v : values) {
        if (!std::isfinite(v)) throw Error(path + " holds NaN or infinite values; every landmark needs a position");
        largest = std::max(largest, std::fabs(v));
    }
    if (largest <= 2.0) {
        throw Error(path + " holds values within [-2, 2], which look already divided by 256; the official format "
                    "stores pixels of the 256x256 face crop");
    }
    std::vector<float> out(values.size());
    for (std::size_t i = 0; i < values.size(); ++i) out[i] = static_cast<float>(values[i] / contract::LANDMARK_SCALE);
    return out;
}

}  // namespace facellava
