#!/usr/bin/env bash
# Build this repo's distributions as wheels and fetch the pure-Python test
# dependencies the lent GPU machine lacks, into the ignored .whl/ folder that
# device calls carry. Run here (not on the device) before a device call.
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl/moe_*.whl
mkdir -p .whl
python3 -m pip wheel -q --no-deps -w .whl ./moe-core ./moe-plugin-portable ./moe-plugin-nvidia ./moe-plugin-amd
deps=(pluggy==1.6.0 pytest==8.4.2 iniconfig==2.1.0 packaging==25.0 hypothesis==6.140.2 sortedcontainers==2.4.0 attrs==25.3.0)
for dep in "${deps[@]}"; do
  name=${dep%%==*}
  ls .whl/"${name//-/_}"-* >/dev/null 2>&1 || python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "$dep"
done
du -sh .whl
