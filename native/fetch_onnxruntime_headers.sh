#!/usr/bin/env bash
# ONNX Runtime's C API headers without installing anything: Debian 13 (trixie) ships them in libonnxruntime-dev;
# its .deb is downloaded with apt from a private apt directory (the system's sources, lists and packages stay
# untouched) and unpacked into DEST. The pip wheel's libonnxruntime.so is linked against them (the C API is
# versioned and backward compatible). Usage: native/fetch_onnxruntime_headers.sh DEST   (idempotent)
set -euo pipefail
dest=${1:?usage: $0 DEST}
if [ -f "$dest/usr/include/onnxruntime/onnxruntime_c_api.h" ]; then
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/etc/preferences.d"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-trixie-stable.gpg] http://deb.debian.org/debian trixie main" \
    > "$work/etc/sources.list"
: > "$work/status"
opts=(-o Dir::Etc::SourceList="$work/etc/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o Dir::Etc::Preferences="$work/etc/preferences" -o Dir::Etc::PreferencesParts="$work/etc/preferences.d"
      -o Dir::State::Lists="$work/lists" -o Dir::State::Status="$work/status" -o Dir::Cache="$work/cache"
      -o APT::Architecture=amd64 -o Debug::NoLocking=1 -o APT::Sandbox::User=root -qq)
apt-get "${opts[@]}" update
(cd "$work" && apt-get "${opts[@]}" download libonnxruntime-dev)
mkdir -p "$dest"
dpkg -x "$work"/libonnxruntime-dev_*.deb "$dest"
test -f "$dest/usr/include/onnxruntime/onnxruntime_c_api.h"
