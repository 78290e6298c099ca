#!/usr/bin/env bash
# Build the Python environment that Triton's Python backend runs pcee models in, on a CPU machine:
#   bash deploy/triton-env.sh [ENV_DIR]        (default: .triton-venv, beside this repository's folders)
# It holds the tritonserver binary of the nvidia-pytriton wheel (server 2.51), numpy < 2 (the wheel's
# backend stub hands a numpy 2 model corrupted BYTES tensors), onnxruntime, tokenizers and this
# checkout of pcee (editable, without its other dependencies). It is separate from the project's own
# environment, which uses numpy 2. Then ENV_DIR/bin/tritonserver starts the server with the
# Python backend and this environment set up, e.g.
#   .triton-venv/bin/tritonserver --model-repository runs/demo/triton
# Running it again is quick: it rebuilds only when this script changed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
env_dir=$(realpath -m "${1:-$repo/.triton-venv}")
python=${PYTHON:-python3}
stamp="$env_dir/.pcee-triton-env"
# pyproject.toml too: the editable install maps the packages it lists when it is made.
script_hash=$(cat "$0" "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$script_hash" && -x "$env_dir/bin/tritonserver" ]]; then
    exit 0
fi

if [[ -e "$env_dir" && ! -f "$stamp" ]]; then
    echo "$env_dir exists and was not made by this script; give another ENV_DIR or remove it" >&2
    exit 1
fi
rm -rf "$env_dir"
"$python" -m venv "$env_dir"
pip=("$env_dir/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "numpy>=1.24,<2" "onnxruntime>=1.17" "tokenizers>=0.15"
"${pip[@]}" --no-deps -e "$repo"
# Last, and without its client-side dependencies: only its server binary and backend are used.
"${pip[@]}" --no-deps "nvidia-pytriton==0.7.0"

site=$("$env_dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
version=$("$env_dir/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
server="$site/pytriton/tritonserver"
# A backend directory of our own: the wheel's Python backend plus the stub built for this Python.
backends="$env_dir/triton-backends"
mkdir -p "$backends/python"
ln -sf "$server"/backends/python/libtriton_python.so "$server"/backends/python/triton_python_backend_utils.py \
    "$backends/python/"
cp "$server/python_backend_stubs/$version/triton_python_backend_stub" "$backends/python/"

# The Python backend's stub takes its packages from the first python3 on PATH: this environment's.
cat > "$env_dir/bin/tritonserver" <<EOF
#!/usr/bin/env bash
export PATH="$env_dir/bin:\$PATH"
export LD_LIBRARY_PATH="$site/nvidia_pytriton.libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$server/bin/tritonserver" --backend-directory "$backends" "\$@"
EOF
chmod +x "$env_dir/bin/tritonserver"
echo "$script_hash" > "$stamp"
echo "Triton environment ready: $env_dir/bin/tritonserver --model-repository DIR"
