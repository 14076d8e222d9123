// facellava-native: `facellava run` without Python, through libfacellava's C ABI.
//
//   facellava-native BUNDLE (--image P | --video P | --camera INDEX) [--landmarks NPY | --no-landmarks]
//                    [--no-face-crop] [--face-index N] [--min-face PX] [--task NAME] [--json] [--max-tokens N]
//                    [--device auto|cpu|cuda|tensorrt] [--vision auto|onnxruntime|tensorrt]
//                    [--priority normal|medium|high] "QUESTION"
//
// Streams the answer to stdout, then a summary line (or with --json one JSON object, the Python CLI's format).
// A user error is one line on stderr and exit status 1; a usage error exit status 2.
#include <dirent.h>
#include <sys/resource.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unistd.h>
#include <vector>

#include <nlohmann/json.hpp>

#include "facellava.h"

namespace {

const char* USAGE =
    "usage: facellava-native BUNDLE (--image P | --video P | --camera INDEX) [--landmarks NPY | --no-landmarks]\n"
    "                        [--no-face-crop] [--device auto|cpu|cuda|tensorrt] [--vision auto|onnxruntime|tensorrt]\n"
    "                        [--priority normal|medium|high]\n"
    "                        [--face-index N] [--min-face PX] [--json] [--max-tokens N] [--llm TYPE]\n"
    "                        [--vision-precision P] [--n-ctx N] [--kv-cache f16|f32] [--flash-attn auto|on|off]\n"
    "                        [--threads N] [--threads-batch N] [--poll 0-100] [--temperature T] [--top-p P]\n"
    "                        [--top-k K] [--seed S] [--task NAME] QUESTION\n"
    "\n"
    "Answer a question about a photo or a video with an exported bundle, as `facellava run` does.\n"
    "The face is found and its 68 landmarks taken on the bundle's front-end graphs (`facellava export\n"
    "front-end`, which `export vision` adds), as `facellava run --front-end graphs` does:\n"
    "  --face-index N   which face, counted left to right (default: the largest)\n"
    "  --min-face PX    the smallest face searched for, in pixels (default 20); larger is faster\n"
    "  --no-face-crop   the whole image padded to a square, no face detection\n"
    "  --landmarks NPY  precomputed 68-point landmarks (official .npy) instead of the face mesh's\n"
    "  --no-landmarks   run without FRLP/FRGCA (the official demo's path)\n"
    "  --task NAME      answer as JSON in the task's schema: emotion, action_units, age, attributes or deepfake\n"
    "                   (constrained decoding; \"\" as QUESTION asks the task's official question; max tokens\n"
    "                   default to the schema's longest answer)\n"
    "  --camera INDEX   one frame from an OpenCV camera instead of --image\n"
    "  --device D       the ONNX graphs' execution providers: auto (default: the best installed, TensorRT with its\n"
    "                   engines cached in the user's cache, then CUDA, then the CPU), cpu, cuda or tensorrt\n"
    "  --vision B       the vision backend: auto (default), onnxruntime or tensorrt (the bundle's engines)\n"
    "  --priority P     CPU priority of the whole process: normal, medium, high (nice 0, -5, -10; above normal\n"
    "                   needs root or CAP_SYS_NICE); high keeps decoding at full speed beside other busy work\n"
    "Not native: --front-end mediapipe, --vision torch (use `facellava run`).\n";

struct UsageError {
    std::string message;
};

long parse_int(const std::string& option, const std::string& text, long low, long high) {
    char* end = nullptr;
    errno = 0;
    long value = std::strtol(text.c_str(), &end, 10);
    if (text.empty() || *end != '\0' || errno != 0 || value < low || value > high)
        throw UsageError{"argument " + option + ": invalid int value: '" + text + "'"};
    return value;
}

float parse_float(const std::string& option, const std::string& text) {
    char* end = nullptr;
    float value = std::strtof(text.c_str(), &end);
    if (text.empty() || *end != '\0') throw UsageError{"argument " + option + ": invalid float value: '" + text + "'"};
    return value;
}

std::string choice(const std::string& option, const std::string& value, const std::vector<std::string>& choices) {
    std::string listed;
    for (const auto& c : choices) {
        if (c == value) return value;
        listed += (listed.empty() ? "'" : ", '") + c + "'";
    }
    throw UsageError{"argument " + option + ": invalid choice: '" + value + "' (choose from " + listed + ")"};
}

// runtime/llm.py's set_priority: every thread of this process (Linux keeps a nice value per thread; new ones
// inherit their creator's) at least at `level`'s priority, a higher one given by the system kept. Returns the
// one-line reason when the system refuses, else "".
std::string set_priority(const std::string& level) {
    int nice = level == "high" ? -10 : level == "medium" ? -5 : 0;
    std::vector<int> threads;
    if (DIR* tasks = opendir("/proc/self/task")) {
        while (dirent* entry = readdir(tasks))
            if (entry->d_name[0] != '.') threads.push_back(std::atoi(entry->d_name));
        closedir(tasks);
    }
    if (threads.empty()) threads.push_back(0);
    for (int tid : threads) {
        errno = 0;
        int current = getpriority(PRIO_PROCESS, static_cast<id_t>(tid));
        if (current == -1 && errno == ESRCH) continue;  // a thread that ended meanwhile
        if (current <= nice) continue;
        if (setpriority(PRIO_PROCESS, static_cast<id_t>(tid), nice) != 0) {
            if (errno == ESRCH) continue;
            return "priority " + level + " (nice " + std::to_string(nice) + ") needs root or CAP_SYS_NICE (systemd: "
                   "AmbientCapabilities=CAP_SYS_NICE, or Nice= in the unit)";
        }
    }
    return "";
}

int print_piece(const char* piece, size_t size, void*) {
    std::fwrite(piece, 1, size, stdout);
    std::fflush(stdout);
    return 1;
}

int fail(const char* message) {
    std::fprintf(stderr, "facellava-native: error: %s\n", message);
    return 1;
}

}  // namespace

int main(int argc, char** argv) {
    // llama.cpp's CPU backend runs on OpenMP here, whose idle threads spin by default: beside other busy work on a
    // small machine that made decoding 10-100x slower (benchmarks/native_vs_python.py). Idle threads sleep, as the
    // project's thread policy wants (runtime/llm.py); libgomp reads the policy when it loads, before main, so the
    // process starts again with it. OMP_WAIT_POLICY=ACTIVE in the environment keeps spinning.
    if (std::getenv("OMP_WAIT_POLICY") == nullptr && setenv("OMP_WAIT_POLICY", "PASSIVE", 1) == 0) {
        execv("/proc/self/exe", argv);  // returns only when it failed: go on as we are
    }
    facellava_options options;
    facellava_options_default(&options);
    facellava_request request;
    facellava_request_default(&request);
    std::vector<std::string> positional;
    bool json = false;
    std::string llm_type, precision = "fp32", image, video, landmarks, task, device = "auto", vision = "auto",
                priority;
    bool camera = false;
    bool max_tokens_given = false;
    try {
        for (int i = 1; i < argc; ++i) {
            std::string arg = argv[i];
            std::string value;
            bool has_value = false;
            if (arg.rfind("--", 0) == 0 && arg.find('=') != std::string::npos) {
                value = arg.substr(arg.find('=') + 1);
                arg = arg.substr(0, arg.find('='));
                has_value = true;
            }
            auto next = [&]() -> std::string {
                if (has_value) return value;
                if (i + 1 >= argc) throw UsageError{"argument " + arg + ": expected one argument"};
                return argv[++i];
            };
            if (arg == "-h" || arg == "--help") {
                std::fputs(USAGE, stdout);
                return 0;
            } else if (arg == "--image") {
                image = next();
            } else if (arg == "--video") {
                video = next();
            } else if (arg == "--camera") {
                request.camera = static_cast<int>(parse_int(arg, next(), 0, INT_MAX));
                camera = true;
            } else if (arg == "--device") {
                device = choice(arg, next(), {"auto", "cpu", "cuda", "tensorrt"});
            } else if (arg == "--vision") {
                vision = choice(arg, next(), {"auto", "onnxruntime", "tensorrt"});
            } else if (arg == "--priority") {
                priority = choice(arg, next(), {"normal", "medium", "high"});
            } else if (arg == "--landmarks") {
                landmarks = next();
            } else if (arg == "--no-landmarks") {
                request.no_landmarks = 1;
            } else if (arg == "--no-face-crop") {
                request.no_face_crop = 1;
            } else if (arg == "--face-index") {
                request.face_index = static_cast<int>(parse_int(arg, next(), INT_MIN + 1, INT_MAX));
            } else if (arg == "--min-face") {
                options.min_face = static_cast<int>(parse_int(arg, next(), INT_MIN, INT_MAX));
            } else if (arg == "--json") {
                json = true;
            } else if (arg == "--max-tokens") {
                request.max_tokens = static_cast<int>(parse_int(arg, next(), INT_MIN, INT_MAX));
                max_tokens_given = true;
            } else if (arg == "--task") {
                task = next();
            } else if (arg == "--llm") {
                llm_type = next();
            } else if (arg == "--vision-precision") {
                precision = next();
            } else if (arg == "--n-ctx") {
                options.n_ctx = static_cast<int>(parse_int(arg, next(), INT_MIN, INT_MAX));
            } else if (arg == "--kv-cache") {
                std::string v = next();
                if (v != "f16" && v != "f32") throw UsageError{"argument --kv-cache: invalid choice: '" + v + "' (choose from 'f16', 'f32')"};
                options.kv_cache_f32 = v == "f32";
            } else if (arg == "--flash-attn") {
                std::string v = next();
                if (v != "auto" && v != "on" && v != "off")
                    throw UsageError{"argument --flash-attn: invalid choice: '" + v + "' (choose from 'auto', 'on', 'off')"};
                options.flash_attn = v == "auto" ? -1 : v == "on" ? 1 : 0;
            } else if (arg == "--threads") {
                options.n_threads = static_cast<int>(parse_int(arg, next(), 1, 4096));
            } else if (arg == "--threads-batch") {
                options.n_threads_batch = static_cast<int>(parse_int(arg, next(), 1, 4096));
            } else if (arg == "--poll") {
                options.poll = static_cast<int>(parse_int(arg, next(), 0, 100));
            } else if (arg == "--temperature") {
                request.temperature = parse_float(arg, next());
            } else if (arg == "--top-p") {
                request.top_p = parse_float(arg, next());
            } else if (arg == "--top-k") {
                request.top_k = static_cast<int>(parse_int(arg, next(), 0, INT_MAX));
            } else if (arg == "--seed") {
                request.seed = static_cast<uint32_t>(parse_int(arg, next(), 0, 4294967294L));
            } else if (arg.size() > 1 && arg[0] == '-' && arg != "-") {
                throw UsageError{"unrecognized arguments: " + arg};
            } else {
                positional.push_back(argv[i]);
            }
        }
        if (positional.size() != 2) throw UsageError{"give BUNDLE and QUESTION (see --help)"};
        int media = int(!image.empty()) + int(!video.empty()) + int(camera);
        if (media == 0) throw UsageError{"one of the arguments --image --video --camera is required"};
        if (media > 1) throw UsageError{"give only one of the arguments --image --video --camera"};
        if (!landmarks.empty() && request.no_landmarks)
            throw UsageError{"argument --no-landmarks: not allowed with argument --landmarks"};
    } catch (const UsageError& error) {
        std::fprintf(stderr, "facellava-native: error: %s\n", error.message.c_str());
        return 2;
    }
    request.image = image.empty() ? nullptr : image.c_str();
    request.video = video.empty() ? nullptr : video.c_str();
    request.landmarks_npy = landmarks.empty() ? nullptr : landmarks.c_str();
    options.llm_type = llm_type.empty() ? nullptr : llm_type.c_str();
    options.vision_precision = precision.c_str();
    options.device = device.c_str();
    options.vision = vision.c_str();

    std::string question = positional[1];
    if (!task.empty()) {  // as runtime/cli.py: the task's question for an empty one, its max_tokens by default
        const char* task_question = nullptr;
        int task_max_tokens = 0;
        request.task = task.c_str();
        if (facellava_task(task.c_str(), &task_question, &task_max_tokens) == 0) {
            char* refused = facellava_check("?", &request);  // the library's message names the tasks it has
            int status = fail(refused);
            facellava_free(refused);
            return status;
        }
        if (question.find_first_not_of(" \t\n\r\f\v") == std::string::npos) question = task_question;
        if (!max_tokens_given) request.max_tokens = task_max_tokens;
    }
    if (char* refused = facellava_check(question.c_str(), &request)) {  // before the bundle is loaded
        int status = fail(refused);
        facellava_free(refused);
        return status;
    }
    // runtime/cli.py reads the camera's frame here, before the bundle is opened: a busy camera is reported first
    char* captured_error = nullptr;
    if (request.camera != -1 && facellava_capture(request.camera, &captured_error) == 0) {
        int status = fail(captured_error);
        facellava_free(captured_error);
        return status;
    }
    // before the library's thread pools start: they inherit it (runtime/cli.py: a refused explicit priority is an
    // error, the default's a warning)
    std::string refused = set_priority(priority.empty() ? "normal" : priority);
    if (!refused.empty()) {
        if (!priority.empty()) return fail(refused.c_str());
        std::fprintf(stderr, "facellava-native: warning: running at normal priority: %s\n", refused.c_str());
    }
    char* error = nullptr;
    facellava_runner* runner = facellava_open(positional[0].c_str(), &options, &error);
    if (runner == nullptr) {
        int status = fail(error);
        facellava_free(error);
        return status;
    }
    char* answer = facellava_ask(runner, question.c_str(), &request, json ? nullptr : print_piece, nullptr, &error);
    int status = 0;
    if (answer == nullptr) {
        status = fail(error);
        facellava_free(error);
    } else if (json) {
        std::printf("%s\n", answer);
    } else {
        auto parsed = nlohmann::json::parse(answer);
        const auto& t = parsed["timings"];
        std::printf("\n[%s, landmarks: %s, vision: %s, %zu tokens, %s] face %.1f ms | landmarks %.1f ms | "
                    "preprocessing %.1f ms | vision %.1f ms | time to first token %.1f ms | decode %.1f tokens/s | "
                    "total %.1f ms\n",
                    parsed["modality"].get<std::string>().c_str(), parsed["landmarks"].get<std::string>().c_str(),
                    parsed["vision_backend"].get<std::string>().c_str(), parsed["tokens"].size(),
                    parsed["finish_reason"].get<std::string>().c_str(), t["face_detection_ms"].get<double>(),
                    t["landmarks_ms"].get<double>(), t["preprocessing_ms"].get<double>(), t["vision_ms"].get<double>(),
                    t["time_to_first_token_ms"].get<double>(), t["decode_tokens_per_s"].get<double>(),
                    t["total_ms"].get<double>());
    }
    facellava_free(answer);
    facellava_close(runner);
    return status;
}
