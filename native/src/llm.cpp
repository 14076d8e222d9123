#include "llm.hpp"

#include <sched.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <deque>
#include <mutex>

#include <ggml-cpu.h>

#include "contract_generated.hpp"
#include "errors.hpp"

namespace facellava {

namespace {

// --- llama.cpp's log: warnings and errors to stderr, except while a file loads (a failure quotes them instead) ---

std::mutex log_mutex;
std::deque<std::string> recent;
bool holding = false;
std::string held;

void log_callback(ggml_log_level level, const char* text, void*) {
    std::lock_guard<std::mutex> lock(log_mutex);
    recent.emplace_back(text);
    if (recent.size() > 64) recent.pop_front();
    if (level >= GGML_LOG_LEVEL_WARN && level != GGML_LOG_LEVEL_CONT) {
        if (holding) held += text;
        else std::fputs(text, stderr);
    }
}

void hold_log(bool on, bool keep) {
    std::lock_guard<std::mutex> lock(log_mutex);
    holding = on;
    if (!on) {
        if (keep) std::fputs(held.c_str(), stderr);
        held.clear();
    }
}

std::string recent_log(int lines = 3) {
    std::lock_guard<std::mutex> lock(log_mutex);
    std::string all;
    for (const auto& part : recent) all += part;
    std::vector<std::string> kept;
    std::size_t start = 0;
    while (start <= all.size()) {
        std::size_t end = all.find('\n', start);
        std::string line = all.substr(start, end == std::string::npos ? std::string::npos : end - start);
        auto first = line.find_first_not_of(" \t\r");
        if (first != std::string::npos) kept.push_back(line.substr(first, line.find_last_not_of(" \t\r") - first + 1));
        if (end == std::string::npos) break;
        start = end + 1;
    }
    std::string out;
    for (std::size_t i = kept.size() > static_cast<std::size_t>(lines) ? kept.size() - lines : 0; i < kept.size(); ++i)
        out += (out.empty() ? "" : " / ") + kept[i];
    return out.empty() ? "no message from llama.cpp" : out;
}

void init_backend() {
    static const bool done = [] {
        llama_log_set(log_callback, nullptr);
        llama_backend_init();
        return true;
    }();
    (void)done;
}

int usable_cores() {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
    return 1;
}

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point start) {
    return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

constexpr int GGML_DEFAULT_POLL = 50;  // ggml_threadpool_params_default's; llama.cpp's own pool is used then

}  // namespace

void check_sampling(const Sampling& s) {
    auto number = [](float v) {
        char buffer[32];
        std::snprintf(buffer, sizeof buffer, "%g", v);
        return std::string(buffer);
    };
    if (!(std::isfinite(s.temperature) && s.temperature >= 0))
        throw Error("temperature must be a finite number >= 0 (0: greedy), got " + number(s.temperature));
    if (!(s.top_p > 0 && s.top_p <= 1)) throw Error("top_p must be above 0 and at most 1 (1: off), got " + number(s.top_p));
    if (s.top_k < 0) throw Error("top_k must be from 0 (off) to 2147483647, got " + std::to_string(s.top_k));
    if (s.seed == 0xFFFFFFFFu) throw Error("seed must be from 0 to 4294967294 (llama.cpp's seeds are 32-bit), got 4294967295");
}

LlamaModel::LlamaModel(const std::string& path, const LlmOptions& options) {
    int threads = options.threads > 0 ? options.threads : usable_cores();
    int threads_batch = options.threads_batch > 0 ? options.threads_batch : usable_cores();
    if (options.poll < 0 || options.poll > 100) throw Error("poll must be from 0 to 100, got " + std::to_string(options.poll));
    init_backend();
    llama_model_params model_params = llama_model_default_params();
    model_params.n_gpu_layers = options.n_gpu_layers;
    hold_log(true, false);
    model_ = llama_model_load_from_file(path.c_str(), model_params);
    if (model_ == nullptr) {
        hold_log(false, false);
        throw Error("llama.cpp cannot load " + path + " (" + recent_log() + "): the file is damaged, or needs a newer "
                    "llama.cpp; export it again or upgrade");
    }
    hold_log(false, true);
    n_batch_ = std::max(1, std::min(options.n_batch, options.n_ctx));
    llama_context_params params = llama_context_default_params();
    params.n_ctx = static_cast<std::uint32_t>(options.n_ctx);
    params.n_batch = params.n_ubatch = static_cast<std::uint32_t>(n_batch_);
    params.n_seq_max = 1;
    params.type_k = params.type_v = options.kv_f32 ? GGML_TYPE_F32 : GGML_TYPE_F16;
    params.flash_attn_type = options.flash_attn < 0 ? LLAMA_FLASH_ATTN_TYPE_AUTO
                             : options.flash_attn == 0 ? LLAMA_FLASH_ATTN_TYPE_DISABLED
                                                       : LLAMA_FLASH_ATTN_TYPE_ENABLED;
    params.n_threads = threads;
    params.n_threads_batch = threads_batch;
    hold_log(true, false);
    context_ = llama_init_from_model(model_, params);
    if (context_ == nullptr) {
        hold_log(false, false);
        llama_model_free(model_);
        throw Error("llama.cpp cannot create a " + std::to_string(options.n_ctx) + "-token context for " + path + " (" +
                    recent_log() + "); try a smaller context or fewer GPU layers");
    }
    hold_log(false, true);
    if (options.poll != GGML_DEFAULT_POLL) {  // thread pools whose idle workers sleep (runtime/llm.py's policy)
        std::vector<int> counts = {threads};
        if (threads_batch != threads) counts.push_back(threads_batch);
        for (int count : counts) {
            ggml_threadpool_params tp = ggml_threadpool_params_default(count);
            tp.poll = static_cast<std::uint32_t>(options.poll);
            ggml_threadpool* pool = ggml_threadpool_new(&tp);
            if (pool == nullptr) {
                for (void* made : threadpools_) ggml_threadpool_free(static_cast<ggml_threadpool*>(made));
                llama_free(context_);
                llama_model_free(model_);
                throw Error("llama.cpp cannot start " + std::to_string(count) + " threads");
            }
            threadpools_.push_back(pool);
        }
        llama_attach_threadpool(context_, static_cast<ggml_threadpool*>(threadpools_.front()),
                                static_cast<ggml_threadpool*>(threadpools_.back()));
    }
    vocab_ = llama_model_get_vocab(model_);
    n_ctx_ = static_cast<int>(llama_n_ctx(context_));
    n_embd_ = llama_model_n_embd(model_);
    n_vocab_ = llama_vocab_n_tokens(vocab_);
    token_batch_ = llama_batch_init(n_batch_, 0, 1);
    embd_batch_ = llama_batch_init(n_batch_, n_embd_, 1);
}

LlamaModel::~LlamaModel() {
    llama_batch_free(token_batch_);
    llama_batch_free(embd_batch_);
    llama_free(context_);
    llama_model_free(model_);
    for (void* pool : threadpools_) ggml_threadpool_free(static_cast<ggml_threadpool*>(pool));
}

llama_token LlamaModel::bos() const { return llama_vocab_bos(vocab_); }
bool LlamaModel::is_eog(llama_token token) const { return llama_vocab_is_eog(vocab_, token); }

std::vector<llama_token> LlamaModel::tokenize(const std::string& text, bool add_bos) const {
    std::vector<llama_token> tokens(text.size() + 2);
    while (true) {
        int count = llama_tokenize(vocab_, text.data(), static_cast<std::int32_t>(text.size()), tokens.data(),
                                   static_cast<std::int32_t>(tokens.size()), add_bos, false);
        if (count >= 0) {
            tokens.resize(static_cast<std::size_t>(count));
            return tokens;
        }
        tokens.resize(static_cast<std::size_t>(-count));
    }
}

std::string LlamaModel::token_piece(llama_token token) const {
    std::vector<char> buffer(64);
    int size = llama_token_to_piece(vocab_, token, buffer.data(), static_cast<std::int32_t>(buffer.size()), 0, true);
    if (size < 0) {
        buffer.resize(static_cast<std::size_t>(-size));
        size = llama_token_to_piece(vocab_, token, buffer.data(), static_cast<std::int32_t>(buffer.size()), 0, true);
    }
    return std::string(buffer.data(), static_cast<std::size_t>(std::max(size, 0)));
}

void LlamaModel::decode(llama_batch& batch, int count) {
    batch.n_tokens = count;
    for (int i = 0; i < count; ++i) {
        batch.pos[i] = n_past_ + i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = i == count - 1;
    }
    int status = llama_decode(context_, batch);
    if (status != 0) {
        throw Error("llama.cpp failed to decode " + std::to_string(count) + " positions (status " +
                    std::to_string(status) + "): " + recent_log());
    }
    n_past_ += count;
}

void LlamaModel::eval_tokens(const std::vector<llama_token>& tokens) {
    if (n_past_ + static_cast<int>(tokens.size()) > n_ctx_) {
        throw Error("the sequence would need " + std::to_string(n_past_ + tokens.size()) + " positions but the context has " +
                    std::to_string(n_ctx_) + "; open the model with a larger n_ctx");
    }
    for (llama_token token : tokens)
        if (token < 0 || token >= n_vocab_) throw Error("token ids must lie in [0, " + std::to_string(n_vocab_) + ")");
    for (std::size_t start = 0; start < tokens.size(); start += static_cast<std::size_t>(n_batch_)) {
        int count = static_cast<int>(std::min(tokens.size() - start, static_cast<std::size_t>(n_batch_)));
        for (int i = 0; i < count; ++i) token_batch_.token[i] = tokens[start + i];
        decode(token_batch_, count);
    }
}

void LlamaModel::eval_embeddings(const float* rows, int count) {
    if (n_past_ + count > n_ctx_) {
        throw Error("the sequence would need " + std::to_string(n_past_ + count) + " positions but the context has " +
                    std::to_string(n_ctx_) + "; open the model with a larger n_ctx");
    }
    for (int start = 0; start < count; start += n_batch_) {
        int chunk = std::min(count - start, n_batch_);
        std::copy(rows + static_cast<std::size_t>(start) * n_embd_, rows + static_cast<std::size_t>(start + chunk) * n_embd_,
                  embd_batch_.embd);
        decode(embd_batch_, chunk);
    }
}

llama_sampler* LlamaModel::sampler_chain(const Sampling& s) const {
    llama_sampler* chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
    if (!s.grammar.empty()) {  // first, as runtime/session.py's chain
        llama_sampler* grammar = llama_sampler_init_grammar(vocab_, s.grammar.c_str(), "root");
        if (grammar == nullptr) {
            llama_sampler_free(chain);
            throw Error("llama.cpp cannot parse the grammar (see its log); check the JSON schema");
        }
        llama_sampler_chain_add(chain, grammar);
    }
    if (s.temperature <= 0) {
        llama_sampler_chain_add(chain, llama_sampler_init_greedy());
        return chain;
    }
    if (s.top_k > 0) llama_sampler_chain_add(chain, llama_sampler_init_top_k(s.top_k));
    if (s.top_p < 1) llama_sampler_chain_add(chain, llama_sampler_init_top_p(s.top_p, 1));
    llama_sampler_chain_add(chain, llama_sampler_init_temp(s.temperature));
    llama_sampler_chain_add(chain, llama_sampler_init_dist(s.seed));
    return chain;
}

llama_token LlamaModel::sample(llama_sampler* chain) { return llama_sampler_sample(chain, context_, -1); }

double Generation::decode_tokens_per_s() const {
    auto steps = static_cast<double>(tokens.size()) - 1;  // the first token comes out of the prefill
    return steps > 0 && decode_ms > 0 ? steps / (decode_ms / 1000) : 0.0;
}

// --- the prompt and the answer -------------------------------------------------------------------------------

namespace {

std::vector<llama_token> tokenize_chunks(const LlamaModel& llm, const std::vector<std::string>& chunks) {
    std::vector<llama_token> ids = {llm.bos()};
    for (std::size_t i = 0; i < chunks.size(); ++i) {
        if (i > 0) ids.push_back(contract::IMAGE_TOKEN_INDEX);
        if (!chunks[i].empty()) {  // the official code strips BOS from tokenizer(""), which leaves nothing
            auto encoded = llm.tokenize(chunks[i]);
            ids.insert(ids.end(), encoded.begin(), encoded.end());
        }
    }
    return ids;
}

}  // namespace

std::vector<llama_token> prompt_ids(const LlamaModel& llm, const std::string& question, int blocks) {
    std::vector<std::string> chunks = {contract::FIRST_CHUNK};
    for (int i = 1; i < blocks; ++i) chunks.emplace_back(contract::BETWEEN_FRAMES_CHUNK);
    chunks.push_back(std::string(contract::QUESTION_PREFIX) + question + contract::QUESTION_SUFFIX);
    return tokenize_chunks(llm, chunks);
}

Generation answer(LlamaModel& llm, const std::string& question, int blocks, int block_tokens,
                  const std::function<const float*(int)>& block, int max_tokens, const Sampling& sampling,
                  const std::function<bool(const std::string&)>& on_piece) {
    Generation result;
    std::vector<llama_token> prefix = tokenize_chunks(llm, {contract::FIRST_CHUNK});
    std::vector<llama_token> ids = prompt_ids(llm, question, blocks);
    if (!std::equal(prefix.begin(), prefix.end(), ids.begin()))
        throw std::logic_error("the prompt does not start with the system prefix");
    // the Python session decodes the system prefix, then the prompt up to the end of the last visual block, then
    // the question: the same batches here give the same logits
    std::size_t split = ids.size();
    while (split > 0 && ids[split - 1] != contract::IMAGE_TOKEN_INDEX) --split;
    std::vector<llama_token> head(ids.begin() + static_cast<long>(prefix.size()), ids.begin() + static_cast<long>(split));
    std::vector<llama_token> tail(ids.begin() + static_cast<long>(split), ids.end());
    int markers = static_cast<int>(std::count(ids.begin(), ids.end(), contract::IMAGE_TOKEN_INDEX));
    result.prompt_positions = static_cast<int>(ids.size()) - markers + blocks * block_tokens;
    if (result.prompt_positions + 1 > llm.n_ctx()) {
        throw Error("the prompt takes " + std::to_string(result.prompt_positions) + " positions and the context holds " +
                    std::to_string(llm.n_ctx()) + "; shorten the question or open the LLM with a larger context");
    }
    auto start = Clock::now();
    llm.eval_tokens(prefix);
    std::vector<llama_token> text;
    int next_block = 0;
    for (llama_token token : head) {
        if (token != contract::IMAGE_TOKEN_INDEX) {
            text.push_back(token);
            continue;
        }
        if (!text.empty()) llm.eval_tokens(text);
        text.clear();
        llm.eval_embeddings(block(next_block++), block_tokens);
    }
    if (!text.empty()) llm.eval_tokens(text);
    llm.eval_tokens(tail);

    llama_sampler* chain = llm.sampler_chain(sampling);
    Utf8Decoder decoder;
    std::string pending;
    bool first = true, leading = true;
    Clock::time_point decode_start;
    try {
        while (true) {
            llama_token token = llm.sample(chain);
            auto now = Clock::now();
            if (first) {
                result.prefill_ms = std::chrono::duration<double, std::milli>(now - start).count();
                decode_start = now;
            }
            if (llm.is_eog(token)) {
                result.finish_reason = "eos";
                break;
            }
            result.tokens.push_back(token);
            std::string piece = decoder.decode(llm.token_piece(token));
            first = false;
            if (leading && !piece.empty()) {
                if (piece[0] == ' ') piece.erase(0, 1);
                leading = false;
            }
            pending += piece;
            StopSplit split_result = split_stop(pending, contract::STOP_STRING);
            pending = split_result.hold;
            bool keep_going = true;
            if (!split_result.emit.empty()) {
                result.text += split_result.emit;
                keep_going = on_piece(split_result.emit);
            }
            if (split_result.stopped || !keep_going) {
                result.finish_reason = "stop";
                break;
            }
            if (static_cast<int>(result.tokens.size()) >= max_tokens || llm.n_past() + 1 > llm.n_ctx()) {
                result.finish_reason = "length";
                break;
            }
            llm.eval_tokens({token});
        }
        if (result.finish_reason != "stop") {
            std::string rest = pending + decoder.decode("", true);
            if (!rest.empty()) {
                result.text += rest;
                on_piece(rest);
            }
        }
    } catch (...) {
        llama_sampler_free(chain);
        throw;
    }
    llama_sampler_free(chain);
    if (!first) result.decode_ms = ms_since(decode_start);
    return result;
}

// --- text ----------------------------------------------------------------------------------------------------

std::string Utf8Decoder::decode(const std::string& bytes, bool final) {
    static const std::string replacement = "\xEF\xBF\xBD";
    std::string in = pending_ + bytes;
    pending_.clear();
    std::string out;
    std::size_t i = 0;
    while (i < in.size()) {
        auto b = static_cast<unsigned char>(in[i]);
        if (b < 0x80) {
            out += static_cast<char>(b);
            ++i;
            continue;
        }
        int need;
        unsigned char low = 0x80, high = 0xBF;  // the range of the second byte
        if (b >= 0xC2 && b <= 0xDF) need = 2;
        else if (b == 0xE0) { need = 3; low = 0xA0; }
        else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) need = 3;
        else if (b == 0xED) { need = 3; high = 0x9F; }
        else if (b == 0xF0) { need = 4; low = 0x90; }
        else if (b >= 0xF1 && b <= 0xF3) need = 4;
        else if (b == 0xF4) { need = 4; high = 0x8F; }
        else {
            out += replacement;
            ++i;
            continue;
        }
        int have = 1;
        bool invalid = false;
        while (have < need) {
            if (i + have >= in.size()) break;
            auto c = static_cast<unsigned char>(in[i + have]);
            unsigned char lo = have == 1 ? low : 0x80, hi = have == 1 ? high : 0xBF;
            if (c < lo || c > hi) {
                invalid = true;
                break;
            }
            ++have;
        }
        if (invalid) {  // the maximal valid prefix is one replacement character
            out += replacement;
            i += have;
        } else if (have < need) {  // the input ends inside a character
            if (!final) {
                pending_ = in.substr(i);
            } else {
                out += replacement;
            }
            break;
        } else {
            out.append(in, i, need);
            i += need;
        }
    }
    return out;
}

StopSplit split_stop(const std::string& pending, const std::string& stop) {
    StopSplit result;
    std::size_t index = stop.empty() ? std::string::npos : pending.find(stop);
    if (index != std::string::npos) {
        result.emit = pending.substr(0, index);
        result.stopped = true;
        return result;
    }
    std::size_t hold = 0;  // the longest tail of pending that begins the stop string
    for (std::size_t size = std::min(stop.size() - (stop.empty() ? 0 : 1), pending.size()); size > 0; --size) {
        if (stop.compare(0, size, pending, pending.size() - size, size) == 0) {
            hold = size;
            break;
        }
    }
    result.emit = pending.substr(0, pending.size() - hold);
    result.hold = pending.substr(pending.size() - hold);
    return result;
}

}  // namespace facellava
