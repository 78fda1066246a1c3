#!/usr/bin/env bash
# Installs what nestcache needs to build and test on a fresh Debian machine.
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config clang
  googletest libgtest-dev libgmock-dev libbenchmark-dev
  liburcu-dev libfmt-dev nlohmann-json3-dev libcli11-dev libexpected-dev
  spin python3 gnuplot-nox
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "nestcache setup: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# libFuzzer (scripts/fuzz.sh) is in clang's runtime package, which clang only
# recommends: install the one that matches the installed clang.
clang_major=$(clang++ --version | sed -n 's/.*clang version \([0-9][0-9]*\).*/\1/p' | head -1)
rt="libclang-rt-${clang_major}-dev"
if [ -n "$clang_major" ] && ! dpkg-query -W -f='${Status}' "$rt" 2>/dev/null | grep -q "install ok installed" &&
   apt-cache show "$rt" >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "nestcache setup: installing $rt" >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$rt" >/dev/null
fi
