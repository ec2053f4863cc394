#!/usr/bin/env bash
# Build edgeenc-embed into cpp/build/: installs the compiler, CMake, libsndfile and libsoxr from
# Debian when they are missing, and fetches ONNX Runtime from two registry packages (see README.md):
#   headers  <- Debian's libonnxruntime-dev (trixie; bookworm has no ONNX Runtime package), unpacked
#               with `apt-get download` + `dpkg-deb -x`, never installed, so the system stays bookworm
#   library  <- the onnxruntime wheel of the same version on PyPI (capi/libonnxruntime.so.<version>)
# Set ORT_ROOT=/path (with include/onnxruntime_c_api.h and lib/libonnxruntime.so) to use an ONNX
# Runtime you already have instead, e.g. JetPack's.
set -euo pipefail

# The headers and the library must be the same release: the C API version is compiled in.
ORT_VERSION=1.21.0
ORT_DEBIAN_VERSION=1.21.0+dfsg-1
ORT_DEBIAN_SUITE=trixie

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
build="$here/build"
deps="$build/deps"
mkdir -p "$deps"

say() { echo "build.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

apt_packages=(cmake g++ make pkg-config libsndfile1-dev libsoxr-dev dpkg-dev)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  [[ $(id -u) == 0 ]] || die "missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})"
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get on this system"
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

fetch_ort_headers() {  # $1: destination include folder
  local tmp; tmp=$(mktemp -d)
  mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $ORT_DEBIAN_SUITE main" \
    >"$tmp/sources.list"
  # A private apt state: the system's sources and package lists are neither read nor changed.
  local opts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o "Dir::Etc::SourceParts=$tmp/none"
              -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o "APT::Sandbox::User=root")
  apt-get "${opts[@]}" update -qq
  (cd "$tmp" && apt-get "${opts[@]}" download -qq "libonnxruntime-dev=$ORT_DEBIAN_VERSION")
  dpkg-deb -x "$tmp"/libonnxruntime-dev_*.deb "$tmp/x"
  mkdir -p "$1"
  cp "$tmp"/x/usr/include/onnxruntime/*.h "$1/"
  rm -rf "$tmp"
}

fetch_ort_library() {  # $1: destination lib folder
  local tmp; tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "onnxruntime==$ORT_VERSION"
  python3 - "$tmp"/onnxruntime-*.whl "$1" "$ORT_VERSION" <<'PY'
import os, sys, zipfile
wheel, dest, version = sys.argv[1:]
name = f"libonnxruntime.so.{version}"
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    with z.open(f"onnxruntime/capi/{name}") as src, open(os.path.join(dest, name), "wb") as out:
        out.write(src.read())
PY
  ln -sf "libonnxruntime.so.$ORT_VERSION" "$1/libonnxruntime.so.1"
  ln -sf "libonnxruntime.so.$ORT_VERSION" "$1/libonnxruntime.so"
  rm -rf "$tmp"
}

if [[ -z "${ORT_ROOT:-}" ]]; then
  ORT_ROOT="$deps/onnxruntime-$ORT_VERSION"
  if [[ ! -f "$ORT_ROOT/include/onnxruntime_cxx_api.h" ]]; then
    say "fetching ONNX Runtime $ORT_VERSION headers (Debian $ORT_DEBIAN_SUITE libonnxruntime-dev)"
    fetch_ort_headers "$ORT_ROOT/include.part"
    mv "$ORT_ROOT/include.part" "$ORT_ROOT/include"
  fi
  if [[ ! -f "$ORT_ROOT/lib/libonnxruntime.so.$ORT_VERSION" ]]; then
    say "fetching libonnxruntime.so $ORT_VERSION (PyPI onnxruntime wheel)"
    fetch_ort_library "$ORT_ROOT/lib"
  fi
fi

cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=Release -DORT_ROOT="$ORT_ROOT" >/dev/null
cmake --build "$build" -j "$(nproc)" >&2
say "built $build/edgeenc-embed"
