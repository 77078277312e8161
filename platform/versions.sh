# Sourced by the scripts under platform/: load_versions FILE... exports each KEY=value line of the files (the pinned
# versions), except where the environment already sets KEY (the environment wins).
load_versions() {
    local key value
    while IFS='=' read -r key value; do
        case "$key" in '' | '#'*) continue ;; esac
        [ -n "${!key:-}" ] || export "$key=$value"
    done < <(cat "$@")
}
