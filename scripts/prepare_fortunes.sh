#!/usr/bin/env bash
# The default data set: Debian's fortunes (plain English text, ~2.5 MB), as byte tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f data/fortunes/train.bin ] && [ -f data/fortunes/val.bin ] && exit 0
./build/moetrain prepare --input /usr/share/games/fortunes --output data/fortunes
