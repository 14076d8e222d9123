// The one exception type for errors a user can cause and fix (facellava/errors.py's FaceLlavaError): its message
// is one line that says what is wrong and what to do. Bugs throw ordinary exceptions.
#pragma once
#include <stdexcept>
#include <string>

namespace facellava {

struct Error : std::runtime_error {
    explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace facellava
