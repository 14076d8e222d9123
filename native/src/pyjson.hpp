// JSON written the way Python's json.dumps writes it (", " and ": " separators, ASCII with \uXXXX escapes, floats
// as Python's repr), so the native CLI's --json output reads like the Python CLI's.
#pragma once
#include <string>

#include <nlohmann/json.hpp>

namespace facellava {

std::string python_json(const nlohmann::ordered_json& value);
std::string python_float(double value);  // Python's repr of a float

}  // namespace facellava
