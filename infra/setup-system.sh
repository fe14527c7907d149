#!/usr/bin/env bash
# System packages dinoflow's demo and tests use, from Debian's archive:
#   dataset-fashion-mnist              the real demo images (70k Fashion-MNIST, MIT)
#   ceph-mon ceph-osd radosgw ceph-common   a real S3-compatible server for the S3 tests
# As root they are installed when missing. As another user nothing is installed: the demo data is
# then fetched into the project cache with `apt-get download` by `dinoflow data`, and the S3 tests
# skip with a loud reason.
set -euo pipefail

packages=(dataset-fashion-mnist ceph-mon ceph-osd radosgw ceph-common)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup-system: not root (or no apt-get); not installing: ${missing[*]}" >&2
  echo "setup-system: the demo data will be fetched without root; S3 tests will be skipped." >&2
  exit 0
fi
echo "setup-system: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
