#!/bin/sh
# Installs the Trellis Outpost Agent from the hub at @HUB_URL@ and joins it:
#
#   curl ... @HUB_URL@/install | sh -s -- --token TOKEN [--prefix DIR] [--data DIR] [--unit-dir DIR] [--no-start]
#
# It downloads the newest agent binary the hub holds for this host's
# architecture (from the hub itself: the host needs to reach nothing else),
# checks its SHA-256, and runs `trellis-agent install`, which joins the hub
# with the token and only then puts the binary, the systemd unit and the
# data directory in place. A failed join installs nothing.
#
# Trust: the hub's TLS certificate comes from its own CA, which this host
# does not know. Every download is pinned to the hub's public key
# (`curl --pinnedpubkey`, the pin below, served with this script); the
# join itself checks the hub's CA against the fingerprint in the token.
set -eu

HUB='@HUB_URL@'
PIN='@PIN@'

die() {
    echo "trellis install: $*" >&2
    exit 1
}

token=''
prefix=''
data=''
unit_dir=''
no_start=''
while [ $# -gt 0 ]; do
    case "$1" in
    --token)
        [ $# -ge 2 ] || die "--token needs the join token"
        token=$2
        shift 2
        ;;
    --token=*)
        token=${1#--token=}
        shift
        ;;
    --prefix)
        [ $# -ge 2 ] || die "--prefix needs a directory"
        prefix=$2
        shift 2
        ;;
    --data)
        [ $# -ge 2 ] || die "--data needs a directory"
        data=$2
        shift 2
        ;;
    --unit-dir)
        [ $# -ge 2 ] || die "--unit-dir needs a directory"
        unit_dir=$2
        shift 2
        ;;
    --no-start)
        no_start=1
        shift
        ;;
    -h | --help)
        echo "usage: curl ... $HUB/install | sh -s -- --token TOKEN [--prefix DIR] [--data DIR] [--unit-dir DIR] [--no-start]"
        exit 0
        ;;
    *)
        die "unknown option $1; usage: sh -s -- --token TOKEN [--prefix DIR] [--data DIR] [--unit-dir DIR] [--no-start]"
        ;;
    esac
done

[ -n "$token" ] || die "no join token given; run the command \`trellis create outpost\` printed (… | sh -s -- --token TOKEN)"
case "$token" in
tjt1.*) ;;
*) die "that is not a join token (it does not start with tjt1.); copy it whole from what \`trellis create outpost\` printed, or ask the hub's administrator for a new one" ;;
esac
command -v curl >/dev/null 2>&1 || die "curl is needed"
command -v sha256sum >/dev/null 2>&1 || die "sha256sum is needed (coreutils or busybox)"

fetch() {
    # $1: where to write, $2: the URL. Prints what the hub said on failure.
    if [ -n "$PIN" ]; then
        # -k: the hub's CA is not in this host's trust store; the pinned
        # public key is what authenticates the hub (curl checks it with -k).
        code=$(curl -sS --proto '=https' -k --pinnedpubkey "$PIN" -o "$1" -w '%{http_code}' "$2") ||
            die "cannot download $2 (the hub did not answer with the key this script was served with)"
    else
        code=$(curl -sS --proto '=https' -o "$1" -w '%{http_code}' "$2") || die "cannot download $2"
    fi
    if [ "$code" != 200 ]; then
        die "the hub answered $code for $2: $(head -c 2000 "$1")"
    fi
}

machine=$(uname -m)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
trap 'exit 1' INT TERM

fetch "$tmp/which" "$HUB/install/agent?machine=$machine"
read -r version arch sha256 <"$tmp/which" || die "the hub's answer about the agent binary is empty"
echo "downloading trellis-agent $version for $arch from $HUB"
fetch "$tmp/trellis-agent" "$HUB/api/v1/agent-binaries/$version/$arch"
echo "$sha256  $tmp/trellis-agent" | sha256sum -c - >/dev/null 2>&1 ||
    die "the downloaded agent binary does not have the SHA-256 the hub gave ($sha256); nothing was installed"
chmod 755 "$tmp/trellis-agent"

set -- install --hub "$HUB" --token "$token"
[ -z "$prefix" ] || set -- "$@" --prefix "$prefix"
[ -z "$data" ] || set -- "$@" --data "$data"
[ -z "$unit_dir" ] || set -- "$@" --unit-dir "$unit_dir"
[ -z "$no_start" ] || set -- "$@" --no-start
"$tmp/trellis-agent" "$@"
