// The LLM half: a GGUF in llama.cpp, fed token ids or visual-token embeddings at consecutive positions, with the
// batching, thread policy and sampler chain of the Python runtime (runtime/llm.py, runtime/session.py), so that
// both answer token for token alike.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <llama.h>

namespace facellava {

struct LlmOptions {
    int n_ctx = 4096;
    int n_batch = 512;
    int n_gpu_layers = 0;
    int threads = 0;        // 0: every usable core
    int threads_batch = 0;  // 0: every usable core
    int poll = 0;           // how hard idle threads busy-wait (0: they sleep)
    bool kv_f32 = false;    // llama.cpp's KV cache type: f16 (its default) or f32
    int flash_attn = -1;    // -1 auto, 0 off, 1 on
};

struct Sampling {
    float temperature = 0.0f;  // 0: greedy
    float top_p = 1.0f;
    int top_k = 0;
    std::uint32_t seed = 0;
    std::string grammar;  // GBNF text (root rule `root`) that constrains every token first; empty: none
};

// Throws Error unless the values are in range (runtime/session.py's Sampling).
void check_sampling(const Sampling& sampling);

class LlamaModel {
  public:
    LlamaModel(const std::string& path, const LlmOptions& options);
    ~LlamaModel();
    LlamaModel(const LlamaModel&) = delete;
    LlamaModel& operator=(const LlamaModel&) = delete;

    std::vector<llama_token> tokenize(const std::string& text, bool add_bos = false) const;
    std::string token_piece(llama_token token) const;
    void eval_tokens(const std::vector<llama_token>& tokens);
    void eval_embeddings(const float* rows, int count);
    llama_token sample(llama_sampler* chain);
    bool is_eog(llama_token token) const;
    llama_sampler* sampler_chain(const Sampling& sampling) const;

    int n_ctx() const { return n_ctx_; }
    int n_embd() const { return n_embd_; }
    int n_past() const { return n_past_; }
    llama_token bos() const;

  private:
    void decode(llama_batch& batch, int count);
    llama_model* model_ = nullptr;
    llama_context* context_ = nullptr;
    const llama_vocab* vocab_ = nullptr;
    std::vector<void*> threadpools_;
    llama_batch token_batch_{};
    llama_batch embd_batch_{};
    int n_ctx_ = 0, n_batch_ = 0, n_embd_ = 0, n_vocab_ = 0, n_past_ = 0;
};

// What one answer produced (runtime/session.py's Generation).
struct Generation {
    std::string text;
    std::vector<llama_token> tokens;
    std::string finish_reason;  // "eos", "stop" (a stop string) or "length" (max_tokens)
    int prompt_positions = 0;
    int reused_prefix = 0;
    double prefill_ms = 0.0;
    double decode_ms = 0.0;
    double decode_tokens_per_s() const;
};

// The `llava_v1` prompt's ids under the official chunked rule (contract.tokenize_chunks(prompt_chunks(...))), each
// visual block marked by IMAGE_TOKEN_INDEX.
std::vector<llama_token> prompt_ids(const LlamaModel& llm, const std::string& question, int blocks);

// One question about one medium: prefill (the system prefix, the visual blocks with the text between them, the
// question), then decoding with streaming that never cuts a UTF-8 character in two and stops at the stop string.
// `on_piece` gets each piece of text; returning false stops early (finish reason "stop").
Generation answer(LlamaModel& llm, const std::string& question, int blocks, int block_tokens,
                  const std::function<const float*(int)>& block, int max_tokens, const Sampling& sampling,
                  const std::function<bool(const std::string&)>& on_piece);

// CPython's incremental UTF-8 decoder with errors="replace" (U+FFFD for each maximal invalid subpart).
class Utf8Decoder {
  public:
    std::string decode(const std::string& bytes, bool final = false);

  private:
    std::string pending_;
};

// (text safe to emit, text held back as the possible start of the stop string, whether it was reached)
struct StopSplit {
    std::string emit, hold;
    bool stopped = false;
};
StopSplit split_stop(const std::string& pending, const std::string& stop);

}  // namespace facellava
