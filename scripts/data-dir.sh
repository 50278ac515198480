# Sourced by the scripts (needs ROOT): sets and exports COMPRESS_DATA, the data folder
# (WikiText-2 and the task files, laid out as scripts/get-data.sh writes them): $COMPRESS_DATA
# if set, else $SHARED/data (the older variable), else ../shared/data next to the repo when it
# exists, else data/ in the repo (where scripts/get-data.sh puts it by default).
if [[ -z "${COMPRESS_DATA:-}" ]]; then
    if [[ -n "${SHARED:-}" ]]; then
        COMPRESS_DATA="$SHARED/data"
    elif [[ -d "$ROOT/../shared/data" ]]; then
        COMPRESS_DATA="$ROOT/../shared/data"
    else
        COMPRESS_DATA="$ROOT/data"
    fi
fi
export COMPRESS_DATA

# need_data FILE...: exits, saying where to get the data, unless each FILE (relative to
# COMPRESS_DATA) exists.
need_data() {
    local f
    for f in "$@"; do
        if [[ ! -f "$COMPRESS_DATA/$f" ]]; then
            echo "error: $COMPRESS_DATA/$f not found; fetch the data with scripts/get-data.sh DIR, then export COMPRESS_DATA=DIR" >&2
            exit 1
        fi
    done
}
