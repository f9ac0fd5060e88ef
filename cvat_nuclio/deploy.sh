#!/usr/bin/env bash
# Deploy prelabel's CVAT functions with nuctl, as CVAT's own serverless/deploy_{cpu,gpu}.sh deploy theirs.
#
#   cvat_nuclio/deploy.sh [--gpu] [FUNCTION ...]    (default: cvat_nuclio/grounding_dino cvat_nuclio/sam)
#
# A FUNCTION is a folder, or the name of one here: grounding_dino, sam, sam3 (SAM 3: text prompts -> masks),
# sam2_tracker (SAM 2 video: follows a box from frame to frame, CVAT's "tracker" functions).
#
# Needs docker, nuctl (the version your CVAT's docker-compose.serverless.yml names) and a running CVAT started with
# that compose file. Environment: CVAT_NETWORK (default cvat_cvat), NUCTL (default nuctl), DOCKER (default docker).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$SCRIPT_DIR")"
NUCTL="${NUCTL:-nuctl}"
DOCKER="${DOCKER:-docker}"
NETWORK="${CVAT_NETWORK:-cvat_cvat}"

variant=cpu
if [[ "${1:-}" == "--gpu" ]]; then variant=gpu; shift; fi
if [[ $# -eq 0 ]]; then set -- "$SCRIPT_DIR/grounding_dino" "$SCRIPT_DIR/sam"; fi
dirs=()
for func in "$@"; do
    if [[ ! -d "$func" && -d "$SCRIPT_DIR/$func" ]]; then dirs+=("$SCRIPT_DIR/$func"); else dirs+=("$func"); fi
done
set -- "${dirs[@]}"

for tool in "$NUCTL" "$DOCKER"; do
    command -v "$tool" >/dev/null || { echo "error: $tool is not on PATH (see README: CVAT)" >&2; exit 2; }
done

if [[ $variant == gpu ]]; then dockerfile=Dockerfile.gpu; config=function-gpu.yaml; else dockerfile=Dockerfile; config=function.yaml; fi
for func_dir in "$@"; do
    [[ -f "$func_dir/$config" ]] || { echo "error: $func_dir has no $config" >&2; exit 2; }
    if grep -q "type: detector" "$func_dir/$config" && [[ ! -f "$func_dir/prompts.yaml" ]]; then
        echo "error: $func_dir has no prompts.yaml; run: prelabel cvat spec --prompts FILE" >&2; exit 2
    fi
done

# the base image holds ml_backend and torch; each function image adds its weights on top
"$DOCKER" build -f "$ROOT/docker/$dockerfile" -t "prelabel:$variant" "$ROOT"
"$NUCTL" create project cvat --platform local >/dev/null 2>&1 || true  # exists already after the first deploy

for func_dir in "$@"; do
    echo "deploying $func_dir ($config)"
    "$NUCTL" deploy --project-name cvat --path "$func_dir" --file "$func_dir/$config" --platform local \
        --platform-config "{\"attributes\": {\"network\": \"$NETWORK\"}}"
done

"$NUCTL" get function --platform local
