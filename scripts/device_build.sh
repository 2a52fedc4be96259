# Helpers of scripts/prebuild_device.sh and scripts/gpu_session.sh (sourced by both).

# One line naming the sources of the compiled extension (csrc/, setup.py) and their contents,
# so that a prebuilt extension can be matched to the tree it came from.
source_digest() {
  find csrc setup.py -type f \( -name '*.c*' -o -name '*.h' -o -name '*.py' \) | LC_ALL=C sort |
    while read -r f; do printf '%s ' "$f"; sha256sum < "$f"; done | sha256sum | cut -c1-32
}

# The register and spill lines of ptxas -v in a build log (CAPSROUTE_PTXAS_VERBOSE=1), counted.
# (sed reads to the end: with head, sort got SIGPIPE once there were over 20 kinds of line, and
# under pipefail prebuild_device.sh stopped there, before its load check.)
ptxas_summary() {
  grep -A2 "Compiling entry" "$1" | grep -E "registers|spill" | sort | uniq -c | sort -rn | sed -n 1,20p
}
