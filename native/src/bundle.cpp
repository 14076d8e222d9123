#include "bundle.hpp"

#include <fcntl.h>
#include <pwd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <set>

#include <openssl/evp.h>

#include "contract_generated.hpp"
#include "errors.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace facellava {

namespace {

constexpr const char* JOURNAL = ".commit.json";
constexpr const char* VERIFIED_CACHE = ".verified.json";  // bundle.py's, its format too
constexpr std::size_t MAX_MANIFEST_BYTES = std::size_t{64} << 20;
// the manifest's vocabularies, generated from facellava/bundle.py
const std::set<std::string> FILE_KINDS(std::begin(contract::FILE_KINDS), std::end(contract::FILE_KINDS));
const std::set<std::string> PRECISIONS(std::begin(contract::PRECISIONS), std::end(contract::PRECISIONS));
const std::set<std::string> MODALITIES(std::begin(contract::MODALITIES), std::end(contract::MODALITIES));

std::string one_of(const char* const* begin, const char* const* end) {
    std::string out = "one of ";
    for (auto it = begin; it != end; ++it) out += (it == begin ? "" : ", ") + std::string(*it);
    return out;
}
const std::string KINDS_TEXT = one_of(std::begin(contract::FILE_KINDS), std::end(contract::FILE_KINDS));
const std::string PRECISIONS_TEXT = one_of(std::begin(contract::PRECISIONS), std::end(contract::PRECISIONS));

std::string repr(const std::string& text) {
    // Python's repr of a str, near enough for messages: single quotes, control characters escaped
    std::string out = "'";
    for (unsigned char c : text) {
        if (c == '\'' || c == '\\') {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c < 32 || c == 127) {
            char buffer[8];
            std::snprintf(buffer, sizeof buffer, "\\x%02x", c);
            out += buffer;
        } else {
            out += static_cast<char>(c);
        }
    }
    return out + "'";
}

bool is_inside(const std::string& root, const std::string& path) {
    return path == root || (path.size() > root.size() && path.compare(0, root.size(), root) == 0 &&
                            (root == "/" || path[root.size()] == '/'));
}

// realpath(3); empty when some part of the path does not exist
std::string real_path(const fs::path& path) {
    char* resolved = ::realpath(path.c_str(), nullptr);
    if (resolved == nullptr) return {};
    std::string out(resolved);
    std::free(resolved);
    return out;
}

fs::path resolve_inside(const fs::path& root, const std::string& name) {
    check_name(name);
    std::string real = real_path(root / name);
    if (real.empty()) {
        throw Error("bundle file " + name + " is missing from " + root.string() + "; export the bundle again");
    }
    if (!is_inside(root.string(), real) || real == root.string()) {
        throw Error("bundle file " + name + " leads outside the bundle (through a symlink); the bundle was tampered "
                    "with: export it again");
    }
    return real;
}

bool hex64(const json& v) {
    if (!v.is_string()) return false;
    const auto& s = v.get_ref<const std::string&>();
    return s.size() == 64 && s.find_first_not_of("0123456789abcdef") == std::string::npos;
}

bool count(const json& v) {
    return v.is_number_unsigned() || (v.is_number_integer() && v.get<std::int64_t>() >= 0);
}

bool name_list(const json& v) {
    if (!v.is_array()) return false;
    for (const auto& item : v)
        if (!item.is_string()) return false;
    return true;
}

bool identifier(const json& v) {
    if (!v.is_string()) return false;
    const auto& s = v.get_ref<const std::string&>();
    if (s.empty() || std::isdigit(static_cast<unsigned char>(s[0]))) return false;
    for (unsigned char c : s)
        if (!(std::isalnum(c) || c == '_' || c >= 0x80)) return false;
    return true;
}

bool in_set(const json& v, const std::set<std::string>& set) {
    return v.is_string() && set.count(v.get<std::string>()) > 0;
}

struct FieldCheck {
    std::function<bool(const json&)> check;
    const char* must;
};

const std::map<std::string, FieldCheck>& entry_fields() {
    static const std::map<std::string, FieldCheck> fields = {
        {"sha256", {hex64, "64 lower-case hex digits"}},
        {"bytes", {count, "a non-negative integer"}},
        {"kind", {[](const json& v) { return in_set(v, FILE_KINDS); }, KINDS_TEXT.c_str()}},
        {"modality", {[](const json& v) { return in_set(v, MODALITIES); }, "image or video"}},
        {"precision", {[](const json& v) { return in_set(v, PRECISIONS); }, PRECISIONS_TEXT.c_str()}},
        {"landmarks", {[](const json& v) { return v.is_boolean(); }, "true or false"}},
        {"type", {identifier, "a GGUF type name"}},
        {"external_data", {name_list, "a list of file names"}},
        {"part_of", {[](const json& v) { return v.is_string(); }, "a file name"}},
        {"source", {[](const json& v) { return v.is_string(); }, "a file name"}},
        {"source_sha256", {hex64, "64 lower-case hex digits"}},
        {"source_onnx_sha256", {hex64, "64 lower-case hex digits"}},
        {"inputs", {[](const json& v) { return v.is_null() || v.is_object(); }, "an object"}},
        {"outputs", {[](const json& v) { return v.is_null() || v.is_object(); }, "an object"}},
        {"gpu", {[](const json& v) { return v.is_string(); }, "a string"}},
        {"tensorrt", {[](const json& v) { return v.is_string(); }, "a string"}},
        {"model", {identifier, "a front-end model name"}},
    };
    return fields;
}

std::vector<std::string> required_by_kind(const std::string& kind) {
    if (kind == "vision") return {"modality", "precision", "landmarks"};
    if (kind == "engine") return {"modality", "precision", "landmarks", "source"};
    if (kind == "llm") return {"type"};
    if (kind == "front_end_engine") return {"model", "source"};
    return {};
}

// --- ONNX external data: a protobuf walk over the messages that can hold tensors (onnx.proto field numbers) ----

struct NotProtobuf {};

enum class Message { model, training, graph, node, function, attribute, sparse, tensor };

const std::map<int, Message>& children(Message kind) {
    static const std::map<Message, std::map<int, Message>> table = {
        {Message::model, {{7, Message::graph}, {20, Message::training}, {25, Message::function}}},
        {Message::training, {{1, Message::graph}, {2, Message::graph}}},
        {Message::graph, {{1, Message::node}, {5, Message::tensor}, {15, Message::sparse}}},
        {Message::node, {{5, Message::attribute}}},
        {Message::function, {{7, Message::node}}},
        {Message::attribute, {{5, Message::tensor}, {6, Message::graph}, {10, Message::tensor}, {11, Message::graph},
                              {22, Message::sparse}, {23, Message::sparse}}},
        {Message::sparse, {{1, Message::tensor}, {2, Message::tensor}}},
    };
    return table.at(kind);
}

std::uint64_t varint(const std::uint8_t* data, std::size_t& pos, std::size_t end) {
    std::uint64_t value = 0;
    for (int shift = 0;; shift += 7) {
        if (pos >= end || shift > 63) throw NotProtobuf{};
        std::uint8_t byte = data[pos++];
        value |= static_cast<std::uint64_t>(byte & 0x7F) << shift;
        if (byte < 0x80) return value;
    }
}

struct Field {
    int number;
    int wire;
    std::uint64_t value;  // wire 0: the value; wire 2: the start
    std::size_t end;      // wire 2: one past the end
};

// every field of the message in data[pos:end], wire types 1 and 5 skipped
std::vector<Field> fields(const std::uint8_t* data, std::size_t pos, std::size_t end) {
    std::vector<Field> out;
    while (pos < end) {
        std::uint64_t key = varint(data, pos, end);
        int number = static_cast<int>(key >> 3), wire = static_cast<int>(key & 7);
        if (number == 0) throw NotProtobuf{};
        if (wire == 0) {
            std::uint64_t value = varint(data, pos, end);
            out.push_back({number, wire, value, pos});
        } else if (wire == 2) {
            std::uint64_t length = varint(data, pos, end);
            if (length > end - pos) throw NotProtobuf{};
            out.push_back({number, wire, pos, pos + length});
            pos += length;
        } else if (wire == 1 || wire == 5) {
            std::size_t skip = wire == 1 ? 8 : 4;
            if (skip > end - pos) throw NotProtobuf{};
            pos += skip;
        } else {
            throw NotProtobuf{};  // groups (3, 4) are not in onnx.proto
        }
    }
    return out;
}

void external_locations(const std::uint8_t* data, Message kind, std::size_t pos, std::size_t end, int depth,
                        std::vector<std::string>& found) {
    if (depth > 64) throw NotProtobuf{};
    if (kind == Message::tensor) {
        bool external = false, has_location = false;
        std::string location;
        for (const Field& f : fields(data, pos, end)) {
            if (f.number == 14 && f.wire == 0) {  // data_location
                external = f.value == 1;
            } else if (f.number == 13 && f.wire == 2) {  // external_data: StringStringEntryProto
                std::map<int, std::string> entry;
                for (const Field& e : fields(data, f.value, f.end))
                    if (e.wire == 2) entry[e.number] = std::string(reinterpret_cast<const char*>(data + e.value),
                                                                   e.end - e.value);
                if (entry.count(1) && entry[1] == "location") {
                    location = entry.count(2) ? entry[2] : "";
                    has_location = true;
                }
            }
        }
        if (external || has_location) found.push_back(location);
        return;
    }
    const auto& table = children(kind);
    for (const Field& f : fields(data, pos, end)) {
        auto child = table.find(f.number);
        if (f.wire == 2 && child != table.end()) external_locations(data, child->second, f.value, f.end, depth + 1, found);
    }
}

}  // namespace

const std::string& check_name(const std::string& name, const std::string& what) {
    if (name.empty()) throw Error(what + " " + repr(name) + " is not a file name");
    bool bad = name.find('\\') != std::string::npos || name.find('\0') != std::string::npos || name[0] == '/' ||
               name.size() > 1024 || (name.size() > 1 && name[1] == ':');
    std::size_t start = 0;
    while (!bad) {
        std::size_t slash = name.find('/', start);
        std::string part = name.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
        if (part.empty() || part == "." || part == "..") bad = true;
        if (slash == std::string::npos) break;
        start = slash + 1;
    }
    if (bad) throw Error(what + " " + repr(name) + " is not a plain name inside the bundle");
    return name;
}

std::string file_sha256(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(path.string() + " cannot be read (" + std::strerror(errno) + ")");
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    if (ctx == nullptr || EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) != 1) {
        EVP_MD_CTX_free(ctx);
        throw std::runtime_error("OpenSSL cannot start a sha256");
    }
    std::vector<char> buffer(std::size_t{1} << 20);
    while (in) {
        in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
        if (in.gcount() > 0) EVP_DigestUpdate(ctx, buffer.data(), static_cast<std::size_t>(in.gcount()));
    }
    bool failed = in.bad();
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int size = 0;
    EVP_DigestFinal_ex(ctx, digest, &size);
    EVP_MD_CTX_free(ctx);
    if (failed) throw Error(path.string() + " cannot be read");
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (unsigned int i = 0; i < size; ++i) {
        out += hex[digest[i] >> 4];
        out += hex[digest[i] & 15];
    }
    return out;
}

std::vector<std::string> onnx_external_data(const fs::path& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw Error(path.string() + " cannot be read (" + std::strerror(errno) + ")");
    struct stat st {};
    if (::fstat(fd, &st) != 0 || st.st_size == 0) {
        ::close(fd);
        throw Error(path.filename().string() + " is empty, not an ONNX graph; export the bundle again");
    }
    auto size = static_cast<std::size_t>(st.st_size);
    void* mapped = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    if (mapped == MAP_FAILED) throw Error(path.string() + " cannot be mapped (" + std::strerror(errno) + ")");
    std::vector<std::string> found;
    bool bad = false;
    try {
        external_locations(static_cast<const std::uint8_t*>(mapped), Message::model, 0, size, 0, found);
    } catch (const NotProtobuf&) {
        bad = true;
    }
    ::munmap(mapped, size);
    if (bad) {
        throw Error(path.filename().string() + " is not an ONNX graph (its bytes are not a protobuf model); export "
                    "the bundle again");
    }
    return found;
}

void check_manifest(const json& data, const std::string& where) {
    auto bad = [&](const std::string& path, const std::string& must) {
        return Error(where + ": " + path + " must be " + must + "; the bundle is damaged or was tampered with, export "
                     "it again");
    };
    if (!data.is_object()) throw bad("the top level", "an object");
    const json version = data.contains("schema_version") ? data["schema_version"] : json();
    if (!(version.is_number_integer() && version.get<std::int64_t>() == contract::MANIFEST_SCHEMA_VERSION)) {
        std::string shown = version.is_number_integer() || version.is_string() ? version.dump() : version.type_name();
        if (version.is_string()) shown = version.get<std::string>();
        if (shown.size() >= 20) shown = version.type_name();
        throw Error(where + " has schema version " + shown + ", this tool reads " +
                    std::to_string(contract::MANIFEST_SCHEMA_VERSION) + "; export the bundle again");
    }
    for (const char* key : {"source", "contract", "files", "parity", "tools"})
        if (data.contains(key) && !data[key].is_object()) throw bad(key, "an object");
    if (data.contains("created_by") && !data["created_by"].is_string()) throw bad("created_by", "a string");
    const json files = data.value("files", json::object());
    for (const auto& [name, entry] : files.items()) {
        check_name(name, where + ": files key");
        std::string label = "files[" + repr(name) + "]";
        if (!entry.is_object()) throw bad(label, "an object");
        std::vector<std::string> required = {"sha256", "bytes", "kind"};
        if (entry.contains("kind") && entry["kind"].is_string())
            for (const auto& key : required_by_kind(entry["kind"].get<std::string>())) required.push_back(key);
        for (const auto& key : required)
            if (!entry.contains(key)) throw bad(label + "." + key, "present");
        for (const auto& [key, value] : entry.items()) {
            auto check = entry_fields().find(key);
            if (check != entry_fields().end() && !check->second.check(value)) throw bad(label + "." + key, check->second.must);
            if (key == "part_of" || key == "source") check_name(value.get<std::string>(), where + ": " + label + "." + key);
        }
        if (entry.contains("external_data")) {
            for (const auto& extra : entry["external_data"]) {
                check_name(extra.get<std::string>(), where + ": " + label + ".external_data");
                if (!files.contains(extra.get<std::string>())) throw bad(label + ".external_data", "names of files in the manifest");
            }
        }
    }
    const json parity = data.value("parity", json::object());
    for (const auto& [name, figures] : parity.items()) {
        check_name(name, where + ": parity key");
        if (!figures.is_object()) throw bad("parity[" + repr(name) + "]", "an object");
    }
    const json source = data.value("source", json::object());
    if (source.contains("checkpoint") && !source["checkpoint"].is_string()) throw bad("source.checkpoint", "a path");
    if (source.contains("checkpoint_sha256") && !hex64(source["checkpoint_sha256"]))
        throw bad("source.checkpoint_sha256", "64 lower-case hex digits");
    const json tools = data.value("tools", json::object());
    for (const auto& [_, version_text] : tools.items())
        if (!version_text.is_string()) throw bad("tools", "an object of version strings");
}

Bundle Bundle::open(const std::string& path) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
        if (errno != ENOENT && errno != ENOTDIR)
            throw Error("bundle " + path + " cannot be reached: " + std::strerror(errno));
        throw Error("bundle " + path + " does not exist or is not a directory");
    }
    if (!S_ISDIR(st.st_mode)) throw Error("bundle " + path + " does not exist or is not a directory");
    fs::path root = real_path(path);
    struct stat journal {};
    if (::lstat((root / JOURNAL).c_str(), &journal) == 0) {
        throw Error(root.string() + " holds an unfinished commit of a killed export; open it once with the Python "
                    "tools (facellava inspect " + root.string() + ") to finish it");
    }
    fs::path manifest_path = root / contract::MANIFEST_NAME;
    struct stat manifest_stat {};
    if (::lstat(manifest_path.c_str(), &manifest_stat) != 0) {
        throw Error(root.string() + " has no " + contract::MANIFEST_NAME + ": not an exported bundle (run `facellava "
                    "export vision` / `facellava export llm` into it)");
    }
    fs::path real = resolve_inside(root, contract::MANIFEST_NAME);
    std::ifstream in(real, std::ios::binary);
    if (!in) throw Error(real.string() + " cannot be read (" + std::strerror(errno) + ")");
    std::string raw(MAX_MANIFEST_BYTES + 1, '\0');
    in.read(raw.data(), static_cast<std::streamsize>(raw.size()));
    raw.resize(static_cast<std::size_t>(in.gcount()));
    if (raw.size() > MAX_MANIFEST_BYTES)
        throw Error(real.string() + " is larger than " + std::to_string(MAX_MANIFEST_BYTES >> 20) + " MB: not a manifest");
    json data;
    try {
        data = json::parse(raw);
    } catch (const json::exception& error) {
        std::string reason = error.what();
        reason = reason.substr(0, reason.find('\n')).substr(0, 120);
        throw Error(real.string() + " is not valid JSON (" + reason + "); export the bundle again");
    }
    check_manifest(data, real.string());
    const json summary = json::parse(contract::SUMMARY_JSON);
    const json manifest_contract = data.value("contract", json::object());
    std::vector<std::string> differing;
    for (const auto& [key, value] : summary.items())
        if (!manifest_contract.contains(key) || manifest_contract[key] != value) differing.push_back(key);
    if (!differing.empty()) {
        std::sort(differing.begin(), differing.end());
        std::string list;
        for (const auto& key : differing) list += (list.empty() ? "" : ", ") + key;
        throw Error(real.string() + " was exported with other contract values (" + list + "); export the bundle again "
                    "with this version");
    }
    if (!data.contains("files")) data["files"] = json::object();
    return Bundle(root, std::move(data));
}

std::vector<std::string> Bundle::find(const std::string& kind, const json& wanted) const {
    std::vector<std::string> names;
    for (const auto& [name, entry] : files().items()) {
        if (entry.value("kind", json()) != json(kind)) continue;
        bool all = true;
        for (const auto& [key, value] : wanted.items())
            if (!entry.contains(key) || entry[key] != value) all = false;
        if (all) names.push_back(name);
    }
    std::sort(names.begin(), names.end());
    return names;
}

namespace {

std::atomic<unsigned long> hashed{0};

std::string hex_sha256(const std::string& text) {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int size = 0;
    EVP_Digest(text.data(), text.size(), digest, &size, EVP_sha256(), nullptr);
    static const char* HEX = "0123456789abcdef";
    std::string out;
    for (unsigned int i = 0; i < size; ++i) out += {HEX[digest[i] >> 4], HEX[digest[i] & 15]};
    return out;
}

json stat_key(const struct stat& st, const std::string& sha256) {
    auto ns = [](const timespec& t) { return static_cast<std::int64_t>(t.tv_sec) * 1000000000 + t.tv_nsec; };
    return json::array({static_cast<std::uint64_t>(st.st_dev), static_cast<std::uint64_t>(st.st_ino),
                        static_cast<std::int64_t>(st.st_size), ns(st.st_mtim), ns(st.st_ctim), sha256});
}

}  // namespace

unsigned long files_hashed() { return hashed.load(); }

class VerifiedCache {
  public:
    explicit VerifiedCache(fs::path root) : root_(std::move(root)) {
        struct stat st {};
        bool owned = ::stat(root_.c_str(), &st) == 0 && st.st_uid == ::geteuid() && ::access(root_.c_str(), W_OK) == 0;
        path_ = owned ? root_ / VERIFIED_CACHE : in_user_cache();
        load();
    }
    bool known(const std::string& name, const struct stat& st, const std::string& sha256) const {
        return entries_.contains(name) && entries_[name] == stat_key(st, sha256);
    }
    void remember(const std::string& name, const struct stat& st, const std::string& sha256) {
        entries_[name] = stat_key(st, sha256);
        while (!path_.empty()) {
            if (write(path_)) return;
            // a read-only bundle: the user's cache instead; a read-only cache: memory only
            path_ = path_.parent_path() == root_ ? in_user_cache() : fs::path();
        }
    }

  private:
    fs::path in_user_cache() const { return user_cache_dir() / "verified" / (hex_sha256(root_.string()).substr(0, 32) + ".json"); }

    void load() {
        int fd = ::open(path_.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) return;
        std::string raw;
        char buffer[65536];
        ssize_t got = 0;
        while (raw.size() < MAX_MANIFEST_BYTES && (got = ::read(fd, buffer, sizeof buffer)) > 0)
            raw.append(buffer, static_cast<std::size_t>(got));
        ::close(fd);
        raw.resize(std::min(raw.size(), MAX_MANIFEST_BYTES));
        json data = json::parse(raw, nullptr, false);
        if (!data.is_discarded() && data.is_object()) entries_ = std::move(data);
    }

    // atomic_file's way: a temporary name beside it, flushed, renamed into place; false when it cannot be written
    bool write(const fs::path& path) const {
        std::error_code ignored;
        fs::create_directories(path.parent_path(), ignored);
        std::string temp = (path.parent_path() / ("." + path.filename().string() + ".XXXXXX.partial")).string();
        int fd = ::mkstemps(temp.data(), 8);
        if (fd < 0) return false;
        std::string text = entries_.dump();
        bool ok = ::fchmod(fd, 0644) == 0;
        for (std::size_t done = 0; ok && done < text.size();) {
            ssize_t n = ::write(fd, text.data() + done, text.size() - done);
            ok = n > 0;
            done += ok ? static_cast<std::size_t>(n) : 0;
        }
        ok = ::fsync(fd) == 0 && ok;
        ok = ::close(fd) == 0 && ok;
        ok = ok && ::rename(temp.c_str(), path.c_str()) == 0;
        if (!ok) ::unlink(temp.c_str());
        return ok;
    }

    fs::path root_, path_;
    json entries_ = json::object();
};

fs::path user_cache_dir() {
    const char* own = std::getenv("FACELLAVA_CACHE");
    if (own != nullptr && *own != '\0') return own;
    const char* xdg = std::getenv("XDG_CACHE_HOME");
    if (xdg != nullptr && *xdg != '\0') return fs::path(xdg) / "facellava";
    const char* home = std::getenv("HOME");  // Path.home(): $HOME, else the password database's
    std::string base = home != nullptr && *home != '\0' ? home : "";
    if (base.empty())
        if (const passwd* entry = ::getpwuid(::geteuid())) base = entry->pw_dir;
    return fs::path(base) / ".cache" / "facellava";
}

fs::path Bundle::verify(const std::string& name) const {
    const json& entry = files().at(name);
    fs::path path = resolve_inside(root_, name);
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0)
        throw Error("bundle file " + name + " is missing from " + root_.string() + "; export the bundle again");
    if (!S_ISREG(st.st_mode)) throw Error("bundle file " + name + " is not a regular file; export the bundle again");
    auto declared = entry["bytes"].get<std::uint64_t>();
    if (static_cast<std::uint64_t>(st.st_size) != declared) {
        throw Error("bundle file " + name + " has " + std::to_string(st.st_size) + " bytes, its manifest says " +
                    std::to_string(declared) + ": the bundle was altered or damaged; export it again");
    }
    const std::string sha256 = entry["sha256"].get<std::string>();
    if (cache_ == nullptr) cache_ = std::make_shared<VerifiedCache>(root_);
    if (cache_->known(name, st, sha256)) return path;
    ++hashed;
    if (file_sha256(path) != sha256) {
        throw Error("bundle file " + name + " does not match its manifest sha256: the bundle was altered or damaged; "
                    "export it again");
    }
    cache_->remember(name, st, sha256);
    return path;
}

fs::path Bundle::path_of(const std::string& name) const {
    if (!files().contains(name))
        throw Error(root_.string() + " has no file " + repr(name) + " in its manifest");
    fs::path path = verify(name);
    std::set<std::string> declared;
    for (const auto& extra : files().at(name).value("external_data", json::array()))
        declared.insert(verify(extra.get<std::string>()).string());
    if (name.size() >= 5 && name.compare(name.size() - 5, 5, ".onnx") == 0) {
        for (const auto& location : onnx_external_data(path)) {
            std::string target = location.empty() ? "" : real_path(path.parent_path() / location);
            if (location.empty() || location[0] == '/' || target.empty() || declared.count(target) == 0) {
                throw Error("bundle file " + name + " names external data " + repr(location.substr(0, 80)) +
                            " that its manifest entry does not declare; the bundle was tampered with: export it again");
            }
        }
    }
    return path;
}

}  // namespace facellava
