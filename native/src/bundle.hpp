// The bundle, read the way facellava/bundle.py reads it: the typed manifest (schema version, every entry's fields,
// plain names), the contract it was exported with, and every file used checked inside the bundle (symlinks
// resolved) and against its size and sha256 before it is opened; an ONNX graph's external-data locations must be
// files its manifest entry declares. The native runner only reads bundles: one that holds an unfinished commit of
// a killed export is refused (the Python tools finish it).
#pragma once
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace facellava {

// A manifest file name checked to be a plain relative name (as bundle.py's check_name); throws Error otherwise.
const std::string& check_name(const std::string& name, const std::string& what = "file name");

// The lower-case hex sha256 of a file (OpenSSL), read in chunks; throws Error when it cannot be read.
std::string file_sha256(const std::filesystem::path& path);

// The external-data locations an ONNX model's tensors name, read from the protobuf without loading weights (as
// bundle.py's onnx_external_data); throws Error when the file is not a protobuf model.
std::vector<std::string> onnx_external_data(const std::filesystem::path& path);

// The per-user cache directory, as bundle.py's user_cache_dir: $FACELLAVA_CACHE, else $XDG_CACHE_HOME/facellava,
// else ~/.cache/facellava.
std::filesystem::path user_cache_dir();

// How many bundle files this process has hashed (sha256): the verified cache spares the ones known unchanged.
unsigned long files_hashed();

// Which files were already hashed, as bundle.py's _VerifiedCache and in its format ({name: [st_dev, st_ino,
// st_size, st_mtime_ns, st_ctime_ns, sha256]}): `.verified.json` in a bundle this user owns and may write, else a
// file per bundle in the user's cache directory (verified/<sha256 of the bundle's path, 32 hex>.json), else memory
// only. A file is known when every stat field matches: ctime cannot be set by a user and changes with every write
// or rename, so a changed file is hashed again.
class VerifiedCache;

class Bundle {
  public:
    // Open a bundle directory: its manifest read and checked, its contract compared with this build's.
    static Bundle open(const std::string& path);

    const std::filesystem::path& root() const { return root_; }
    const nlohmann::json& files() const { return manifest_.at("files"); }
    // Names (sorted) of the files of this kind whose entries have all the given field values.
    std::vector<std::string> find(const std::string& kind, const nlohmann::json& fields = nlohmann::json::object()) const;
    // The real path of a manifest file, checked inside the bundle and against its sha256, with its external data.
    std::filesystem::path path_of(const std::string& name) const;
    // Check one manifest file (inside the bundle, a regular file, size, sha256); return its real path.
    std::filesystem::path verify(const std::string& name) const;

  private:
    Bundle(std::filesystem::path root, nlohmann::json manifest) : root_(std::move(root)), manifest_(std::move(manifest)) {}
    std::filesystem::path root_;
    nlohmann::json manifest_;
    mutable std::shared_ptr<VerifiedCache> cache_;  // read on the first verify
};

// The manifest's checks (bundle.py's Manifest.from_json), exposed for the unit test; throws Error naming the first
// bad field. `where` names the file in messages.
void check_manifest(const nlohmann::json& data, const std::string& where);

}  // namespace facellava
