#!/bin/sh
# Installs Debian's chromium for the headless render test of report.html
# (tests/report/test_report_html_chromium.py). Called by .ci/run, which runs as root.
# Without root, or when apt cannot reach its mirror, it says so and returns 0: that one test is
# then skipped with a reason, and the rest of the suite still runs.
set -u
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo ".ci/chromium.sh: not root, chromium not installed; the report.html render test will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; then
    echo ".ci/chromium.sh: apt-get could not install chromium; the report.html render test will be skipped" >&2
fi
exit 0
