#!/usr/bin/env bash
# Fetch the data the scripts, benchmarks and `compress eval --tasks` read, from the public
# sources below, each file checked against a pinned sha256:
#   wikitext-2-raw/wiki.test.raw   WikiText-2 raw test (llama.cpp's zip)       CC BY-SA 3.0 / GFDL
#   wikitext-2/wiki.valid.tokens   WikiText-2 validation, tokenized (pytorch)  CC BY-SA 3.0 / GFDL
#   pubmedqa/*.json                PubMedQA expert-labelled set + test labels  MIT
#   piqa/valid*                    PIQA validation                             AFL-3.0
#   arc/arc_easy_test.jsonl        ARC-Easy test                               CC BY-SA 4.0
#   medqa/test.jsonl               MedQA-USMLE 4-option test                   MIT
#   mmlu-medical/*_test.csv        six medical MMLU subsets (from a 166 MB tar) MIT
#
#   scripts/get-data.sh [--only SET,...] [DIR]
#       DIR: default $COMPRESS_DATA, else data/ in the repo. SET: wikitext, pubmedqa, piqa,
#       arc, medqa, mmlu (default all). Files already present with the right sha256 are kept.
#       Then `export COMPRESS_DATA=DIR` (the one variable the CLI and the scripts read).
#   scripts/get-data.sh --make-mirror MIRROR
#       Lays out a data folder ($COMPRESS_DATA, else ../shared/data) as a mirror of the
#       sources (MIRROR/HOST/PATH, archives rebuilt), for machines without internet access.
# Env: COMPRESS_DATA_MIRROR=URL (https://... or file:///...) fetches HOST/PATH under URL
# instead of https://HOST/PATH.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)

# DEST SHA256 URL MEMBER (MEMBER: the file inside a .zip or .tar, "-" for a plain file).
ENTRIES=(
    "wikitext-2-raw/wiki.test.raw 173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08 https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip wikitext-2-raw/wiki.test.raw"
    "wikitext-2/wiki.valid.tokens f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8 https://raw.githubusercontent.com/pytorch/examples/HEAD/word_language_model/data/wikitext-2/valid.txt -"
    "pubmedqa/ori_pqal.json 8b3276be8942ebbd77f3ddcda12c1749bf0e490045a736fd8438ee40cf37a41d https://raw.githubusercontent.com/pubmedqa/pubmedqa/HEAD/data/ori_pqal.json -"
    "pubmedqa/test_ground_truth.json 939fe566f09017d13b1ca64d2ddfee0bc2374b366048152997669cccedc44d51 https://raw.githubusercontent.com/pubmedqa/pubmedqa/HEAD/data/test_ground_truth.json -"
    "piqa/valid.jsonl 93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d https://raw.githubusercontent.com/ybisk/ybisk.github.io/HEAD/piqa/data/valid.jsonl -"
    "piqa/valid-labels.lst b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb https://raw.githubusercontent.com/ybisk/ybisk.github.io/HEAD/piqa/data/valid-labels.lst -"
    "arc/arc_easy_test.jsonl 0eef1b69fbee5318aa5f380b1afbdeb8530d34d94fe61fe2ce7b77977ccff2b8 https://raw.githubusercontent.com/nju-websoft/GenMC/HEAD/data/arc_easy/official/test.jsonl -"
    "medqa/test.jsonl b0536be0ff396be91eb0cf61a42056b0abef06a23e7e8be491d62fd959b77b72 https://raw.githubusercontent.com/xk-huang/medagents-benchmark/HEAD/data/medqa/test.jsonl -"
    "mmlu-medical/anatomy_test.csv 966dfd5c4579885ebdb8c05d6754ae5834f672632586d8595be3c0f9360e6f4e https://people.eecs.berkeley.edu/~hendrycks/data.tar data/test/anatomy_test.csv"
    "mmlu-medical/clinical_knowledge_test.csv d7c23fd4e75d0a99f042a5d55221ba8465ffc9c9042bc4c30bb07f45d2199dac https://people.eecs.berkeley.edu/~hendrycks/data.tar data/test/clinical_knowledge_test.csv"
    "mmlu-medical/college_biology_test.csv e1204cb9d19887ea266145f038b5d4cc1fbc33d7efce186259c4ecca1cbe3119 https://people.eecs.berkeley.edu/~hendrycks/data.tar data/test/college_biology_test.csv"
    "mmlu-medical/college_medicine_test.csv 9c533cfff89edaa317b2e79bbabcdd5e2e522e019679cb4a6475e5f2a1861b1e https://people.eecs.berkeley.edu/~hendrycks/data.tar data/test/college_medicine_test.csv"
    "mmlu-medical/medical_genetics_test.csv 4cf70b253e326ee5bcff6e14091765c64003c0d853a58dbc6a5737281356766d https://people.eecs.berkeley.edu/~hendrycks/data.tar data/test/medical_genetics_test.csv"
    "mmlu-medical/professional_medicine_test.csv d6cb72e2238d5a3885ee28c6194bf62fff9c2799f9aabeac8aec3b89f122d438 https://people.eecs.berkeley.edu/~hendrycks/data.tar data/test/professional_medicine_test.csv"
)

die() {
    echo "error: $*" >&2
    exit 1
}
command -v python3 >/dev/null 2>&1 || die "python3 is needed (sha256, archives)"

sha256() { python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

# The set a destination belongs to.
set_of() {
    case "$1" in
    wikitext*) echo wikitext ;;
    mmlu-medical/*) echo mmlu ;;
    *) echo "${1%%/*}" ;;
    esac
}

# Writes MEMBER of archive ARCHIVE (.zip or .tar) to OUT.
extract() {
    python3 - "$1" "$2" "$3" <<'PY'
import shutil, sys, tarfile, zipfile
archive, member, out = sys.argv[1:]
if archive.endswith(".zip"):
    src = zipfile.ZipFile(archive).open(member)
else:
    src = tarfile.open(archive).extractfile(member)
    if src is None:
        sys.exit(f"{member}: not a file in {archive}")
with src, open(out, "wb") as f:
    shutil.copyfileobj(src, f)
PY
}

# Downloads URL to OUT (curl, else python3's urllib; both read file:// URLs).
download() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL --retry 3 -o "$2" "$1"
    else
        python3 -c 'import shutil,sys,urllib.request as u; shutil.copyfileobj(u.urlopen(sys.argv[1]), open(sys.argv[2],"wb"))' "$1" "$2"
    fi
}

# --make-mirror MIRROR: MIRROR/HOST/PATH for every source, archives rebuilt from the files.
if [[ "${1:-}" == --make-mirror ]]; then
    [[ $# == 2 ]] || die "usage: scripts/get-data.sh --make-mirror MIRROR"
    SRC="${COMPRESS_DATA:-$ROOT/../shared/data}"
    MIRROR=$2
    declare -A started=()
    for e in "${ENTRIES[@]}"; do
        read -r dest _ url member <<<"$e"
        [[ -f "$SRC/$dest" ]] || die "$SRC/$dest not found (set COMPRESS_DATA to a complete data folder)"
        target="$MIRROR/${url#https://}"
        mkdir -p "$(dirname "$target")"
        # An archive is rebuilt from scratch, then gets one member per entry.
        [[ -n "${started[$target]:-}" ]] || rm -f "$target"
        started[$target]=1
        if [[ $member == - ]]; then
            cp -f "$SRC/$dest" "$target"
        else
            python3 - "$target" "$member" "$SRC/$dest" <<'PY'
import os, sys, tarfile, zipfile
archive, member, src = sys.argv[1:]
if archive.endswith(".zip"):
    with zipfile.ZipFile(archive, "a") as z:
        z.write(src, member)
else:
    with tarfile.open(archive, "a") as t:
        t.add(src, member)
PY
        fi
    done
    echo "mirror in $MIRROR; fetch with COMPRESS_DATA_MIRROR=file://$(cd "$MIRROR" && pwd) scripts/get-data.sh DIR"
    exit 0
fi

ONLY=""
if [[ "${1:-}" == --only ]]; then
    [[ $# -ge 2 ]] || die "--only needs a list of sets (wikitext, pubmedqa, piqa, arc, medqa, mmlu)"
    ONLY=",$2,"
    shift 2
fi
[[ $# -le 1 ]] || die "usage: scripts/get-data.sh [--only SET,...] [DIR]"
DIR="${1:-${COMPRESS_DATA:-$ROOT/data}}"
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CACHE="$DIR/.download"
mkdir -p "$CACHE"

fetched=0
kept=0
for e in "${ENTRIES[@]}"; do
    read -r dest want url member <<<"$e"
    s=$(set_of "$dest")
    [[ -z $ONLY || $ONLY == *",$s,"* ]] || continue
    out="$DIR/$dest"
    if [[ -f "$out" && $(sha256 "$out") == "$want" ]]; then
        kept=$((kept + 1))
        continue
    fi
    src="$url"
    [[ -n "${COMPRESS_DATA_MIRROR:-}" ]] && src="${COMPRESS_DATA_MIRROR%/}/${url#https://}"
    mkdir -p "$(dirname "$out")"
    tmp="$out.part"
    if [[ $member == - ]]; then
        echo "fetch $dest <- $src"
        download "$src" "$tmp" || { rm -f "$tmp"; die "$dest: download of $src failed"; }
    else
        archive="$CACHE/$(basename "$url")"
        if [[ ! -f "$archive" ]]; then
            echo "fetch $(basename "$url") <- $src"
            download "$src" "$archive.part" || { rm -f "$archive.part"; die "$dest: download of $src failed"; }
            mv "$archive.part" "$archive"
        fi
        extract "$archive" "$member" "$tmp" || { rm -f "$tmp"; die "$dest: $member not found in $archive"; }
    fi
    got=$(sha256 "$tmp")
    if [[ "$got" != "$want" ]]; then
        rm -f "$tmp"
        [[ $member == - ]] || rm -f "$archive"
        die "$dest: sha256 $got, expected $want (from $src); the source changed or the download is damaged"
    fi
    mv "$tmp" "$out"
    fetched=$((fetched + 1))
done
rm -rf "$CACHE"
echo "data in $DIR ($fetched fetched, $kept already there, all sha256 checked)"
echo "export COMPRESS_DATA=$DIR"
