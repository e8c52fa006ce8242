#!/usr/bin/env bash
# Renders chimap's HTML reports in headless Chromium and asserts that every <img> loaded
# (complete, with a natural width) and that the group page drew its SVG plots.
# Usage: check_report.sh OUTPUT_DIR PAGE.html... (pages relative to OUTPUT_DIR)
# Needs the Debian `chromium` package; installs it with apt-get when run as root, and fails
# loudly otherwise (never skips).
set -euo pipefail
OUT=$1
shift

if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing chromium with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "check_report.sh: chromium is not installed and cannot be (needs root and apt-get): install the Debian package chromium" >&2
        exit 1
    fi
fi
chromium --version 2>/dev/null

# A copy of the output, so the probe script never touches the real pages.
RENDER=$(mktemp -d "${TMPDIR:-/tmp}/chimap-render.XXXXXX")
trap 'rm -rf "$RENDER"' EXIT
cp -r "$OUT"/. "$RENDER"/

# After the load event, mark each image loaded or broken and count the SVG plots. (No '&'
# in it: sed would read it as the matched text.)
PROBE='<script>window.addEventListener("load",function(){var n=0,bad=0;
for(var i=0;i<document.images.length;i++){var im=document.images[i];
var ok=im.complete?(im.naturalWidth>0):false;im.setAttribute("data-probe",ok?"loaded":"broken");
if(ok){n++}else{bad++}}
document.body.setAttribute("data-probe","images="+n+" broken="+bad+" svg="+document.querySelectorAll("svg").length);});</script>'

status=0
for page in "$@"; do
    probe_page="$RENDER/${page%.html}.probe.html"
    sed "s#</body>#${PROBE//$'\n'/}</body>#" "$RENDER/$page" > "$probe_page"
    dom=$(chromium --headless --no-sandbox --disable-gpu --allow-file-access-from-files \
        --virtual-time-budget=10000 --dump-dom "file://$probe_page" 2>/dev/null)
    summary=$(grep -o 'data-probe="images=[0-9]* broken=[0-9]* svg=[0-9]*"' <<<"$dom" | head -1)
    echo "$page: ${summary:-no probe result}"
    images=$(sed -E 's/.*images=([0-9]+).*/\1/' <<<"$summary")
    broken=$(sed -E 's/.*broken=([0-9]+).*/\1/' <<<"$summary")
    svg=$(sed -E 's/.*svg=([0-9]+).*/\1/' <<<"$summary")
    expected=$( (grep -o '<img ' "$RENDER/$page" || true) | wc -l)
    if [ -z "$summary" ] || [ "$broken" != 0 ] || [ "$images" != "$expected" ] \
        || [ $((images + svg)) = 0 ]; then
        echo "  FAILED: expected $expected image(s) loaded and none broken" >&2
        status=1
    fi
done
exit $status
