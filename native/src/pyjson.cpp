#include "pyjson.hpp"

#include <charconv>
#include <cmath>
#include <cstdio>

namespace facellava {

std::string python_float(double value) {
    if (std::isnan(value)) return "NaN";
    if (std::isinf(value)) return value > 0 ? "Infinity" : "-Infinity";
    if (value == 0) return std::signbit(value) ? "-0.0" : "0.0";
    char buffer[64];
    // the shortest digits that read back as the same double, in scientific form: d.ddde[+-]x
    auto result = std::to_chars(buffer, buffer + sizeof buffer, value, std::chars_format::scientific);
    std::string text(buffer, result.ptr);
    bool negative = text[0] == '-';
    if (negative) text.erase(0, 1);
    auto e = text.find('e');
    int exponent = std::stoi(text.substr(e + 1));
    std::string digits = text.substr(0, e);
    digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
    std::string out;
    if (exponent >= -4 && exponent < 16) {  // Python's repr: positional notation in this range
        if (exponent >= 0) {
            if (static_cast<int>(digits.size()) <= exponent + 1) {
                out = digits + std::string(static_cast<std::size_t>(exponent + 1) - digits.size(), '0') + ".0";
            } else {
                out = digits.substr(0, static_cast<std::size_t>(exponent + 1)) + "." + digits.substr(static_cast<std::size_t>(exponent + 1));
            }
        } else {
            out = "0." + std::string(static_cast<std::size_t>(-exponent - 1), '0') + digits;
        }
    } else {
        out = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
        char exp[32];
        std::snprintf(exp, sizeof exp, "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
        out += exp;
    }
    return negative ? "-" + out : out;
}

namespace {

void write_string(const std::string& text, std::string& out) {
    out += '"';
    std::size_t i = 0;
    auto hex = [&](unsigned code) {
        char buffer[16];
        std::snprintf(buffer, sizeof buffer, "\\u%04x", code);
        out += buffer;
    };
    while (i < text.size()) {
        auto c = static_cast<unsigned char>(text[i]);
        if (c < 0x80) {
            switch (c) {
                case '"': out += "\\\""; break;
                case '\\': out += "\\\\"; break;
                case '\n': out += "\\n"; break;
                case '\r': out += "\\r"; break;
                case '\t': out += "\\t"; break;
                case '\b': out += "\\b"; break;
                case '\f': out += "\\f"; break;
                default:
                    if (c < 0x20 || c == 0x7f) {
                        if (c == 0x7f) out += static_cast<char>(c);
                        else hex(c);
                    } else {
                        out += static_cast<char>(c);
                    }
            }
            ++i;
            continue;
        }
        // valid UTF-8 here (the decoder replaced invalid bytes): decode one code point
        int length = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
        unsigned code = c & (length == 2 ? 0x1F : length == 3 ? 0x0F : 0x07);
        for (int k = 1; k < length && i + k < text.size(); ++k) code = (code << 6) | (static_cast<unsigned char>(text[i + k]) & 0x3F);
        i += static_cast<std::size_t>(length);
        if (code >= 0x10000) {
            code -= 0x10000;
            hex(0xD800 + (code >> 10));
            hex(0xDC00 + (code & 0x3FF));
        } else {
            hex(code);
        }
    }
    out += '"';
}

void write(const nlohmann::ordered_json& value, std::string& out) {
    switch (value.type()) {
        case nlohmann::json::value_t::object: {
            out += '{';
            bool first = true;
            for (const auto& [key, item] : value.items()) {
                if (!first) out += ", ";
                first = false;
                write_string(key, out);
                out += ": ";
                write(item, out);
            }
            out += '}';
            break;
        }
        case nlohmann::json::value_t::array: {
            out += '[';
            for (std::size_t i = 0; i < value.size(); ++i) {
                if (i) out += ", ";
                write(value[i], out);
            }
            out += ']';
            break;
        }
        case nlohmann::json::value_t::string: write_string(value.get<std::string>(), out); break;
        case nlohmann::json::value_t::number_float: out += python_float(value.get<double>()); break;
        case nlohmann::json::value_t::boolean: out += value.get<bool>() ? "true" : "false"; break;
        case nlohmann::json::value_t::null: out += "null"; break;
        default: out += value.dump(); break;  // integers
    }
}

}  // namespace

std::string python_json(const nlohmann::ordered_json& value) {
    std::string out;
    write(value, out);
    return out;
}

}  // namespace facellava
