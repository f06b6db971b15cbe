#!/usr/bin/env bash
# Pin every container image under cluster/ by digest, at release time: each `repo:tag@sha256:...` reference
# (REPLACE-ME, as committed, or an older digest) gets the digest the registry gives for repo:tag now.
# The digest is asked of the registry with crane, else skopeo, else docker; never typed in by hand.
# Afterwards: review `git diff cluster/` and commit it with the release.
#
#   bash scripts/pin_images.sh [FILE...]        # default: cluster/kuberay/*.yaml cluster/aws.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
(( $# )) || set -- cluster/kuberay/*.yaml cluster/aws.yaml

digest_of() {  # digest_of REPO:TAG -> sha256:<64 hex>
    if command -v crane >/dev/null; then
        crane digest "$1"
    elif command -v skopeo >/dev/null; then
        skopeo inspect --format '{{.Digest}}' "docker://$1"
    elif command -v docker >/dev/null; then
        docker buildx imagetools inspect "$1" --format '{{.Manifest.Digest}}'
    else
        echo "pin_images.sh: needs crane, skopeo or docker to ask the registry" >&2
        return 1
    fi
}

refs=$(grep -hoE '[A-Za-z0-9./_-]+:[A-Za-z0-9._-]+@sha256:(REPLACE-ME|[0-9a-f]{64})' "$@" | sort -u)
for ref in $refs; do
    tag=${ref%@sha256:*}
    digest=$(digest_of "$tag")
    [[ $digest =~ ^sha256:[0-9a-f]{64}$ ]] || { echo "pin_images.sh: $tag: not a digest: $digest" >&2; exit 1; }
    sed -i "s|$ref|$tag@$digest|g" "$@"
    echo "$tag@$digest"
done
