// ctest: the pieces of libfacellava that need no bundle, each against values worked out by hand or by the Python
// side (tests/test_native.py drives the whole CLI on a real bundle).
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>

#include "bundle.hpp"
#include "errors.hpp"
#include "llm.hpp"
#include "media.hpp"
#include "pyjson.hpp"

namespace {

int failures = 0;

void check(bool ok, const char* what) {
    if (!ok) {
        std::fprintf(stderr, "FAILED: %s\n", what);
        ++failures;
    }
}

template <typename F>
bool throws_error(F&& body) {
    try {
        body();
    } catch (const facellava::Error&) {
        return true;
    }
    return false;
}

}  // namespace

int main() {
    using namespace facellava;

    // names: plain relative names only (bundle.py's check_name)
    check(check_name("engines/gpu-trt10/vision.plan") == "engines/gpu-trt10/vision.plan", "a nested plain name");
    for (const char* bad : {"../x", "/etc/passwd", "a//b", "a/./b", "a\\b", "c:x", ""})
        check(throws_error([&] { check_name(bad); }), bad);

    // the manifest's schema version and field types
    check(throws_error([] { check_manifest(nlohmann::json{{"schema_version", 2}}, "m"); }), "schema version 2 refused");
    check(throws_error([] {
              check_manifest(nlohmann::json::parse(R"({"schema_version": 1, "files": {"a.gguf": {"sha256": "x",
                  "bytes": 1, "kind": "llm", "type": "f32"}}})"), "m");
          }), "a short sha256 refused");
    check(throws_error([] {
              check_manifest(nlohmann::json::parse(R"({"schema_version": 1, "files": {"a.onnx": {"sha256":
                  "0000000000000000000000000000000000000000000000000000000000000000", "bytes": true,
                  "kind": "vision", "modality": "image", "precision": "fp32", "landmarks": false}}})"), "m");
          }), "bytes: true refused");
    check(!throws_error([] {
              check_manifest(nlohmann::json::parse(R"({"schema_version": 1, "files": {"a.gguf": {"sha256":
                  "0000000000000000000000000000000000000000000000000000000000000000", "bytes": 3, "kind": "llm",
                  "type": "f32"}}})"), "m");
          }), "a good manifest accepted");

    // sha256 of a known string, and a file that is no protobuf
    {
        std::ofstream("unit-abc.bin", std::ios::binary) << "abc";
        check(file_sha256("unit-abc.bin") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "sha256");
        std::ofstream("unit-bad.onnx", std::ios::binary) << std::string("\x07\x07\x07\x07", 4);
        check(throws_error([] { onnx_external_data("unit-bad.onnx"); }), "a non-protobuf .onnx refused");
    }

    // the official frame choice: np.linspace(0, 11, 8, dtype=int)
    check(video_frame_indices(12) == std::vector<int>({0, 1, 3, 4, 6, 7, 9, 11}), "frame indices of 12");
    check(video_frame_indices(3) == std::vector<int>({0, 0, 0, 0, 1, 1, 1, 2}), "frame indices of 3");

    // expand2square pads with the processor's mean colour at the centre
    {
        Rgb image{2, 4, std::vector<std::uint8_t>(2 * 4 * 3, 255)};
        Rgb square = expand2square(image);
        check(square.height == 4 && square.width == 4, "square side");
        check(square.data[0] == 122 && square.data[1] == 116 && square.data[2] == 104, "fill colour in row 0");
        check(square.data[(1 * 4 + 0) * 3] == 255 && square.data[(2 * 4 + 3) * 3] == 255, "image in rows 1-2");
        check(square.data[(3 * 4 + 0) * 3] == 122, "fill colour in row 3");
    }

    // Pillow's bicubic: a constant stays constant, a ramp stays monotonic and its mean is kept
    {
        std::vector<float> flat(256 * 256, 0.25f);
        auto resized = resize_bicubic_pillow(flat, 256, 256, 224, 224);
        double worst = 0;
        for (float v : resized) worst = std::max(worst, std::fabs(v - 0.25));
        check(resized.size() == 224u * 224u && worst < 1e-6, "a constant image stays constant");
        std::vector<float> ramp(300 * 300);
        for (int y = 0; y < 300; ++y)
            for (int x = 0; x < 300; ++x) ramp[y * 300 + x] = x / 299.0f;
        auto shrunk = resize_bicubic_pillow(ramp, 300, 300, 224, 224);
        bool monotonic = true;
        for (int x = 1; x < 224; ++x) monotonic = monotonic && shrunk[100 * 224 + x] > shrunk[100 * 224 + x - 1];
        check(monotonic, "a ramp stays monotonic");
    }

    // CPython's UTF-8 decoding with errors="replace", fed byte by byte
    {
        Utf8Decoder decoder;
        std::string text = decoder.decode("caf\xc3");
        text += decoder.decode("\xa9 ok");
        check(text == "caf\xc3\xa9 ok", "a character split over two pieces");
        Utf8Decoder other;
        check(other.decode("a\xff" "b") == "a\xef\xbf\xbd" "b", "an invalid byte replaced");
        check(other.decode("\xe0\x80", true) == "\xef\xbf\xbd\xef\xbf\xbd", "a bad second byte: two replacements");
        check(other.decode("\xf0\x9f\x98", true) == "\xef\xbf\xbd", "a cut 4-byte character: one replacement");
    }

    // the stop string: held back while it may begin, cut where it is complete
    {
        auto held = split_stop("hello </", "</s>");
        check(held.emit == "hello " && held.hold == "</" && !held.stopped, "a possible stop held back");
        auto stopped = split_stop("a</s>b", "</s>");
        check(stopped.emit == "a" && stopped.stopped, "a stop string cuts the text");
    }

    // Python's float repr, as json.dumps writes it
    check(python_float(0.0) == "0.0" && python_float(12.5) == "12.5" && python_float(1e-05) == "1e-05" &&
              python_float(1e16) == "1e+16" && python_float(100000.0) == "100000.0" && python_float(0.0001) == "0.0001" &&
              python_float(123.456) == "123.456" && python_float(-2.5e-07) == "-2.5e-07",
          "python float repr");
    check(python_json(nlohmann::ordered_json{{"a", "\xc3\xa9\n"}, {"b", {1, 2}}}) == "{\"a\": \"\\u00e9\\n\", \"b\": [1, 2]}",
          "python json separators and escapes");

    std::remove("unit-abc.bin");
    std::remove("unit-bad.onnx");
    if (failures == 0) std::puts("all native unit checks passed");
    return failures == 0 ? 0 : 1;
}
