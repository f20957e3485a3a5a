#!/bin/sh
# certbatch dns-01 script for pebble-challtestsrv (Pebble's mock DNS server). TESTING ONLY.
#
#   challtestsrv.sh add|remove <domain> <record-name> <value> [<domain> <record-name> <value> ...]
#
# One record per call (dns-01 `calls: per-record`, the default) or all the records of a
# certificate at once (`calls: per-certificate`); either way it makes one curl run.
# add    -> POST {"host": <record-name>, "value": <value>} to $URL/set-txt (values accumulate, so
#           a wildcard and its base name can both be present under one record name)
# remove -> POST {"host": <record-name>} to $URL/clear-txt (clears every value of that name;
#           a second remove for the same name is harmless)
#
# URL is $CERTBATCH_CHALLTESTSRV_URL, default http://127.0.0.1:8055. Needs curl.
set -eu

prog=challtestsrv.sh

die() {
    printf '%s: %s\n' "$prog" "$*" >&2
    exit 1
}

usage="usage: $prog add|remove <domain> <record-name> <value> [<domain> <record-name> <value> ...]"
if [ "$#" -lt 4 ] || [ $(( ($# - 1) % 3 )) -ne 0 ]; then
    die "$usage"
fi
action=$1
shift
case $action in
    add) endpoint=set-txt ;;
    remove) endpoint=clear-txt ;;
    *) die "unknown action: $action (expected add or remove)" ;;
esac
url=${CERTBATCH_CHALLTESTSRV_URL:-http://127.0.0.1:8055}
case $url in
    http://* | https://*) ;;
    *) die "CERTBATCH_CHALLTESTSRV_URL must be an http(s) URL: $url" ;;
esac
url=${url%/}/$endpoint

# Turn each triple into the arguments of one curl request, appended to "$@" while the triples
# are shifted off its front. Plain assignments, no command substitution (a fork each): certbatch
# may run this hundreds of times in one renewal.
records=$(($# / 3))
names=
i=0
while [ "$i" -lt "$records" ]; do
    domain=$1
    record=$2
    value=$3
    shift 3
    # The values go into JSON unescaped, so only accept what they can legitimately be: DNS
    # names (letters, digits, '-', '_', '.') and a base64url TXT value.
    case $domain in
        "" | *[!A-Za-z0-9._-]*) die "invalid domain: $domain" ;;
    esac
    case $record in
        "" | *[!A-Za-z0-9._-]*) die "invalid record name: $record" ;;
    esac
    case $value in
        "" | *[!A-Za-z0-9_-]*) die "invalid TXT value (expected base64url): $value" ;;
    esac
    if [ "$action" = add ]; then
        body="{\"host\":\"$record\",\"value\":\"$value\"}"
    else
        body="{\"host\":\"$record\"}"
    fi
    [ "$i" -eq 0 ] || set -- "$@" --next
    set -- "$@" --silent --show-error --fail --max-time 10 --output /dev/null \
        --header 'Content-Type: application/json' --data "$body" "$url"
    names=${names:+$names }$record
    i=$((i + 1))
done

command -v curl >/dev/null 2>&1 || die "curl is not installed"

# add: --fail-early stops at the first failed request and exits non-zero (by default only the
# last request's result counts). remove: try every record, then fail if any failed, so that one
# failed clear doesn't leave the others behind. curl's own error lines go to stderr first; ours,
# the last line, is what certbatch reports.
if [ "$action" = add ]; then
    curl --fail-early "$@" || die "add $names via $url failed"
else
    codes=$(curl --write-out '%{http_code} ' "$@") || true
    for code in $codes; do
        [ "$code" = 200 ] || die "remove $names via $url failed (HTTP status $code)"
    done
fi
