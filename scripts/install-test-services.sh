#!/usr/bin/env bash
# Installs the servers the test suite starts on 127.0.0.1: Ceph's radosgw (a real S3 server).
# Without root or apt-get the S3 tests fall back to moto's server (installed by bootstrap.sh).
set -uo pipefail
if command -v radosgw >/dev/null && command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "note: radosgw not installed (needs root and apt-get); S3 tests will use moto's server" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
if ! apt-get install -y -qq --no-install-recommends ceph-mon ceph-osd radosgw ceph-common >/dev/null 2>&1; then
    echo "note: could not install radosgw from apt; S3 tests will use moto's server" >&2
fi
exit 0
