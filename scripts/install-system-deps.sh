#!/usr/bin/env bash
# Installs the Debian packages napari needs on a headless machine: Xvfb, Mesa's software OpenGL,
# and the xcb libraries Qt 6 loads. Does nothing when they are already there.
set -euo pipefail
PKGS=(xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxkbcommon0 libxcb-cursor0 libdbus-1-3
      libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0
      libxcb-xinerama0 libxcb-xkb1 libfontconfig1 libglib2.0-0)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "installing system packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
