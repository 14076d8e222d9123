/* libfacellava: answer questions about a face photo or video from an exported Face-LLaVA bundle, without Python.
 *
 * A small C ABI over the C++ runner: open a bundle once, ask as many questions as needed, close it. Every function
 * that can fail returns NULL (or non-zero) and sets *error to a one-line message (free it with facellava_free);
 * the message says what is wrong and what to do. Answers are JSON objects in the Python CLI's --json format.
 *
 *     facellava_options options;
 *     facellava_options_default(&options);
 *     char* error = NULL;
 *     facellava_runner* runner = facellava_open("bundle", &options, &error);
 *     facellava_request request;
 *     facellava_request_default(&request);
 *     request.image = "face.jpg";    (the face found on the bundle's front-end graphs, its landmarks from the mesh)
 *     char* answer = facellava_ask(runner, "How old is this person?", &request, print_piece, NULL, &error);
 *     facellava_free(answer);
 *     facellava_close(runner);
 */
#ifndef FACELLAVA_H
#define FACELLAVA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FACELLAVA_ABI_VERSION 3

/* facellava_request.face_index: the largest face (the default) */
#define FACELLAVA_LARGEST_FACE (-2147483647 - 1)

#if defined(__GNUC__)
#define FACELLAVA_EXPORT __attribute__((visibility("default")))
#else
#define FACELLAVA_EXPORT
#endif

typedef struct facellava_runner facellava_runner;

typedef struct facellava_options {
    const char* llm_type;         /* GGUF type, e.g. "q4_k_m"; NULL: the most precise in the bundle */
    const char* vision_precision; /* "fp32" (default), "fp16" or "int8" */
    int n_ctx;                    /* the LLM's context in tokens (4096) */
    int n_threads;                /* decode threads; 0: every usable core */
    int n_threads_batch;          /* prefill threads; 0: every usable core */
    int poll;                     /* 0-100: how hard idle threads busy-wait (0) */
    int kv_cache_f32;             /* 1: an F32 KV cache; 0: F16 (llama.cpp's default) */
    int flash_attn;               /* -1 auto (default), 0 off, 1 on */
    int n_gpu_layers;             /* LLM layers on the GPU where llama.cpp has one (0) */
    int min_face;                 /* the smallest face searched for, in pixels (20) */
    const char* device;           /* the ONNX graphs' execution providers: "auto" (default: the best installed,
                                     TensorRT then CUDA then the CPU), "cpu", "cuda" or "tensorrt" */
    const char* vision;           /* the vision backend: "auto" (default), "onnxruntime" or "tensorrt" */
} facellava_options;

typedef struct facellava_request {
    const char* image;         /* a photograph, or NULL */
    const char* video;         /* a video (8 frames taken as the official processor does), or NULL */
    const char* landmarks_npy; /* precomputed 68-point landmarks (official .npy), or NULL */
    int no_landmarks;          /* 1: run without FRLP/FRGCA */
    int no_face_crop;          /* 1: the whole image padded to a square, no face detection */
    int max_tokens;            /* 256 */
    float temperature;         /* 0: greedy (default) */
    float top_p;               /* 1: off */
    int top_k;                 /* 0: off */
    uint32_t seed;
    int face_index;            /* which face, counted left to right; FACELLAVA_LARGEST_FACE: the largest (default) */
    const char* task;          /* a built-in task (facellava_task): the answer constrained to its JSON schema, or NULL */
    int camera;                /* an OpenCV camera index: one frame of it instead of an image; -1: none (default) */
} facellava_request;

/* One image's or video frame's face as the front end makes it (runtime/face.py's FaceCrop). */
typedef struct facellava_face {
    int width, height;     /* the crop's size: 256 x 256, or with no_face_crop the image padded to a square */
    uint8_t* rgb;          /* height x width x 3 bytes, RGB */
    int has_landmarks;     /* 1: landmarks holds the face mesh's 68 points */
    float landmarks[136];  /* x, y of the 68 iBUG points in crop pixels / crop side */
    int has_box;           /* 1: box is the face the crop was cut around (0 with no_face_crop) */
    int box[4];            /* x, y, width, height in the image's pixels (the official detector's convention) */
    double score;          /* the box's detection score */
    double detect_ms, landmarks_ms;
} facellava_face;

/* Called with each piece of the answer's text (UTF-8, never a character cut in two); return 0 to stop early. */
typedef int (*facellava_piece_fn)(const char* piece, size_t size, void* user_data);

FACELLAVA_EXPORT void facellava_options_default(facellava_options* options);
FACELLAVA_EXPORT void facellava_request_default(facellava_request* request);

/* Open a bundle: its manifest checked, the GGUF verified (sha256) and loaded. NULL and *error on failure. */
FACELLAVA_EXPORT facellava_runner* facellava_open(const char* bundle, const facellava_options* options, char** error);

/* Answer one question. Returns the answer as a JSON object (free with facellava_free), or NULL and *error. */
FACELLAVA_EXPORT char* facellava_ask(facellava_runner* runner, const char* question, const facellava_request* request,
                    facellava_piece_fn on_piece, void* user_data, char** error);

/* The one-line reason the question or request is refused (an empty question, max_tokens < 1, a sampling value out
 * of range, landmarks both given and refused), or NULL when it is fine: the checks facellava_ask makes, without a
 * bundle, so a caller can refuse before loading one. Free the message with facellava_free. */
FACELLAVA_EXPORT char* facellava_check(const char* question, const facellava_request* request);

/* The vision graph's pixel values for the request's medium, preprocessed the official way (no bundle needed):
 * float32 [3, 224, 224] for an image, [3, 8, 224, 224] for a video, in a buffer to free with facellava_free.
 * Returns NULL and *error for a medium that cannot be read or a request this build cannot serve. */
FACELLAVA_EXPORT float* facellava_preprocess(const facellava_request* request, size_t* count, char** error);

/* The face front end alone, on the bundle's front-end graphs (verified, as every file used): the request's image (1
 * face) or video (its 8 frames), cropped as `facellava run` crops them (face_index, no_face_crop, and the face
 * mesh's landmarks unless landmarks_npy or no_landmarks) with options->min_face (NULL: the defaults). Returns
 * *count faces (free with facellava_free_faces), or NULL and *error (no face, a face index out of range, no graphs). */
FACELLAVA_EXPORT facellava_face* facellava_front_end(const char* bundle, const facellava_options* options,
                                                     const facellava_request* request, size_t* count, char** error);
FACELLAVA_EXPORT void facellava_free_faces(facellava_face* faces, size_t count);

/* A built-in face task (emotion, action_units, age, attributes, deepfake: runtime/structured.py's): 1 with its
 * official question and the max_tokens its longest answer fits in (each may be NULL), or 0 for an unknown name. */
FACELLAVA_EXPORT int facellava_task(const char* name, const char** question, int* max_tokens);

/* Read one frame of OpenCV camera `camera` now and keep it for the next request with that camera index (the CLI does
 * this before facellava_open, as `facellava run` reads its frame before it opens the bundle). Returns 1, or 0 and
 * *error when the camera cannot be opened or gives no frame. */
FACELLAVA_EXPORT int facellava_capture(int camera, char** error);

/* How many bundle files this process has hashed (sha256) so far. A bundle's files are hashed once and remembered in
 * the Python runtime's verified cache (.verified.json in a bundle this user owns and may write, else the user's cache
 * directory), so a later start hashes only the files changed since (a new size, mtime or ctime). */
FACELLAVA_EXPORT unsigned long facellava_files_hashed(void);

FACELLAVA_EXPORT void facellava_close(facellava_runner* runner);
FACELLAVA_EXPORT void facellava_free(void* memory);
FACELLAVA_EXPORT const char* facellava_version(void);

#ifdef __cplusplus
}
#endif

#endif /* FACELLAVA_H */
