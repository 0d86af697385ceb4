#!/usr/bin/env bash
# Regenerate the Python gRPC code for every .proto under protos/ into nexus/proto/.
#
#   scripts/gen_protos.sh           regenerate in place (run from anywhere)
#   scripts/gen_protos.sh --check   exit 1 if the checked-in code is out of date (CI)
#
# protoc writes imports relative to the -I root ("from toasty.v1 import toasty_pb2"),
# which only work with protos/ on sys.path; we rewrite them to absolute package
# imports ("from nexus.proto.toasty.v1 import ...") so no sys.path tricks are needed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python}"

check=0
if [[ "${1:-}" == "--check" ]]; then check=1; fi

out="nexus/proto"
if (( check )); then
    out="$(mktemp -d)"
    trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out"

mapfile -t protos < <(find protos -name '*.proto' | sort)
if (( ${#protos[@]} == 0 )); then echo "no .proto files under protos/" >&2; exit 1; fi

"$python" -m grpc_tools.protoc -I protos \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" "${protos[@]}"

# Every directory on the way to a generated module is a package.
[[ -f "$out/__init__.py" ]] || echo '"""Generated protobuf/gRPC code (scripts/gen_protos.sh); do not edit."""' > "$out/__init__.py"
find "$out" -mindepth 1 -type d ! -name __pycache__ | while read -r d; do
    [[ -f "$d/__init__.py" ]] || : > "$d/__init__.py"
done

# Rewrite imports of our own proto packages (top-level dirs of protos/), not google.protobuf.
for top in $(find protos -mindepth 1 -maxdepth 1 -type d -exec basename {} \; | sort); do
    find "$out" \( -name '*_pb2.py' -o -name '*_pb2_grpc.py' -o -name '*_pb2.pyi' \) -print0 |
        xargs -0 sed -E -i "s/^from (${top}(\\.[A-Za-z0-9_]+)*) import /from nexus.proto.\\1 import /"
done

if (( check )); then
    if ! diff -r -x __pycache__ "$out" nexus/proto; then
        echo "nexus/proto is out of date: run scripts/gen_protos.sh" >&2
        exit 1
    fi
    echo "nexus/proto is up to date"
else
    echo "generated: $(find "$out" -name '*_pb2*.py' | sort | tr '\n' ' ')"
fi
