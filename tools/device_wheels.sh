#!/usr/bin/env bash
# Build this repo's distributions as wheels into the ignored .whl/ folder that device calls
# carry (the lent GPU machine already has torch, triton, pytest, pytest-xdist, hypothesis,
# pluggy and rich). Run here (not on the device) before a device call.
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
mkdir -p .git/info
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl/moe_*.whl
mkdir -p .whl
python3 -m pip wheel -q --no-deps -w .whl ./moe-core ./moe-plugin-portable ./moe-plugin-nvidia ./moe-plugin-amd
# OLD_REV=<rev>: also the portable plugin of that commit, into .whl/old (device_check.sh's ab step)
rm -rf .whl/old
if [ -n "${OLD_REV:-}" ]; then
  tmp=$(mktemp -d)
  git worktree add -q --detach "$tmp" "$OLD_REV"
  python3 -m pip wheel -q --no-deps -w .whl/old "$tmp/moe-plugin-portable"
  git worktree remove --force "$tmp"
  echo "$OLD_REV" > .whl/old/COMMIT
fi
# the commit the wheels were built from (+dirty when the tree had changes), for the result files
git describe --always --dirty=+dirty > .whl/COMMIT
du -sh .whl
