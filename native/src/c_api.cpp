#include <cstdlib>
#include <cstring>

#include "errors.hpp"
#include "facellava.h"
#include "bundle.hpp"
#include "pyjson.hpp"
#include "runner.hpp"

struct facellava_runner {
    std::unique_ptr<facellava::Runner> runner;
};

namespace {

char* copy(const std::string& text) {
    char* out = static_cast<char*>(std::malloc(text.size() + 1));
    if (out != nullptr) std::memcpy(out, text.c_str(), text.size() + 1);
    return out;
}

void set_error(char** error, const std::string& message) {
    if (error != nullptr) *error = copy(message);
}

// user errors pass through as their one line; anything else is a bug, said so
template <typename F>
auto guarded(char** error, F&& body) -> decltype(body()) {
    try {
        return body();
    } catch (const facellava::Error& e) {
        set_error(error, e.what());
    } catch (const std::bad_alloc&) {
        set_error(error, "out of memory");
    } catch (const std::exception& e) {
        set_error(error, std::string("internal error (a bug, please report it): ") + e.what());
    }
    return {};
}

facellava::Request to_request(const facellava_request* r) {
    facellava::Request request;
    request.image = r->image ? r->image : "";
    request.video = r->video ? r->video : "";
    request.landmarks = r->landmarks_npy ? r->landmarks_npy : "";
    request.no_landmarks = r->no_landmarks != 0;
    request.no_face_crop = r->no_face_crop != 0;
    if (r->face_index != FACELLAVA_LARGEST_FACE) request.face_index = r->face_index;
    request.task = r->task ? r->task : "";
    if (r->camera != -1) request.camera = r->camera;
    request.max_tokens = r->max_tokens;
    request.sampling = {r->temperature, r->top_p, r->top_k, r->seed, {}};
    return request;
}

}  // namespace

extern "C" {

void facellava_options_default(facellava_options* o) {
    *o = facellava_options{nullptr, "fp32", 4096, 0, 0, 0, 0, -1, 0, facellava::front_end::MIN_FACE_SIDE, "auto", "auto"};
}

void facellava_request_default(facellava_request* r) {
    *r = facellava_request{nullptr, nullptr, nullptr, 0, 0, 256, 0.0f, 1.0f, 0, 0, FACELLAVA_LARGEST_FACE, nullptr, -1};
}

facellava_runner* facellava_open(const char* bundle, const facellava_options* o, char** error) {
    if (error != nullptr) *error = nullptr;
    return guarded(error, [&]() -> facellava_runner* {
        facellava_options defaults;
        facellava_options_default(&defaults);
        if (o == nullptr) o = &defaults;
        facellava::RunnerOptions options;
        options.llm_type = o->llm_type ? o->llm_type : "";
        options.vision_precision = o->vision_precision ? o->vision_precision : "fp32";
        options.llm.n_ctx = o->n_ctx;
        options.llm.threads = o->n_threads;
        options.llm.threads_batch = o->n_threads_batch;
        options.llm.poll = o->poll;
        options.llm.kv_f32 = o->kv_cache_f32 != 0;
        options.llm.flash_attn = o->flash_attn;
        options.llm.n_gpu_layers = o->n_gpu_layers;
        options.min_face = o->min_face;
        options.device = o->device ? o->device : "auto";
        options.vision = o->vision ? o->vision : "auto";
        if (bundle == nullptr) throw facellava::Error("no bundle given");
        auto runner = std::make_unique<facellava::Runner>(bundle, options);
        return new facellava_runner{std::move(runner)};
    });
}

char* facellava_ask(facellava_runner* runner, const char* question, const facellava_request* r,
                    facellava_piece_fn on_piece, void* user_data, char** error) {
    if (error != nullptr) *error = nullptr;
    return guarded(error, [&]() -> char* {
        if (runner == nullptr || question == nullptr || r == nullptr) throw std::invalid_argument("a NULL argument");
        auto answer = runner->runner->ask(question, to_request(r), [&](const std::string& piece) {
            return on_piece == nullptr || on_piece(piece.data(), piece.size(), user_data) != 0;
        });
        return copy(facellava::python_json(answer.to_json(runner->runner->vision_backend())));
    });
}

char* facellava_check(const char* question, const facellava_request* r) {
    char* error = nullptr;
    guarded(&error, [&]() -> int {
        if (question == nullptr || r == nullptr) throw std::invalid_argument("a NULL argument");
        facellava::check_request(question, to_request(r));
        return 0;
    });
    return error;
}

float* facellava_preprocess(const facellava_request* r, size_t* count, char** error) {
    if (error != nullptr) *error = nullptr;
    return guarded(error, [&]() -> float* {
        if (r == nullptr || count == nullptr) throw std::invalid_argument("a NULL argument");
        auto pixels = facellava::prepare_pixels(to_request(r));
        auto* out = static_cast<float*>(std::malloc(pixels.size() * sizeof(float)));
        if (out == nullptr) throw std::bad_alloc();
        std::copy(pixels.begin(), pixels.end(), out);
        *count = pixels.size();
        return out;
    });
}

facellava_face* facellava_front_end(const char* bundle, const facellava_options* o, const facellava_request* r,
                                    size_t* count, char** error) {
    if (error != nullptr) *error = nullptr;
    return guarded(error, [&]() -> facellava_face* {
        if (bundle == nullptr || r == nullptr || count == nullptr) throw std::invalid_argument("a NULL argument");
        facellava_options defaults;
        facellava_options_default(&defaults);
        if (o == nullptr) o = &defaults;
        auto crops = facellava::face_crops(bundle, o->min_face, to_request(r), o->device ? o->device : "auto");
        auto* faces = static_cast<facellava_face*>(std::calloc(crops.size(), sizeof(facellava_face)));
        if (faces == nullptr) throw std::bad_alloc();
        for (std::size_t i = 0; i < crops.size(); ++i) {
            const auto& crop = crops[i];
            facellava_face& face = faces[i];
            face.width = crop.crop.width;
            face.height = crop.crop.height;
            face.rgb = static_cast<uint8_t*>(std::malloc(crop.crop.data.size()));
            if (face.rgb == nullptr) {
                facellava_free_faces(faces, i);
                throw std::bad_alloc();
            }
            std::memcpy(face.rgb, crop.crop.data.data(), crop.crop.data.size());
            if (crop.landmarks) {
                face.has_landmarks = 1;
                std::copy(crop.landmarks->begin(), crop.landmarks->end(), face.landmarks);
            }
            if (crop.box) {
                face.has_box = 1;
                face.box[0] = crop.box->x;
                face.box[1] = crop.box->y;
                face.box[2] = crop.box->width;
                face.box[3] = crop.box->height;
                face.score = crop.box->score;
            }
            face.detect_ms = crop.detect_ms;
            face.landmarks_ms = crop.landmarks_ms;
        }
        *count = crops.size();
        return faces;
    });
}

void facellava_free_faces(facellava_face* faces, size_t count) {
    if (faces == nullptr) return;
    for (size_t i = 0; i < count; ++i) std::free(faces[i].rgb);
    std::free(faces);
}

int facellava_task(const char* name, const char** question, int* max_tokens) {
    if (name == nullptr) return 0;
    for (const auto& task : facellava::tasks::TASKS) {
        if (std::strcmp(name, task.name) != 0) continue;
        if (question != nullptr) *question = task.question;
        if (max_tokens != nullptr) *max_tokens = task.max_tokens;
        return 1;
    }
    return 0;
}

int facellava_capture(int camera, char** error) {
    if (error != nullptr) *error = nullptr;
    return guarded(error, [&]() -> int {
        if (camera < 0) throw facellava::Error("a camera index is 0 or more, got " + std::to_string(camera));
        facellava::capture_camera_frame(camera);
        return 1;
    });
}

unsigned long facellava_files_hashed(void) { return facellava::files_hashed(); }
void facellava_close(facellava_runner* runner) { delete runner; }
void facellava_free(void* memory) { std::free(memory); }
const char* facellava_version(void) { return "facellava-native 0.1"; }

}  // extern "C"
