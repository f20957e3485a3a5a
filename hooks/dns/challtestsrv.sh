#!/bin/sh
# certbatch dns-01 script for pebble-challtestsrv (Pebble's mock DNS server). TESTING ONLY.
#
#   challtestsrv.sh add|remove <domain> <record-name> <value>
#
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

[ "$#" -eq 4 ] || die "usage: $prog add|remove <domain> <record-name> <value>"
action=$1
domain=$2
record=$3
value=$4
url=${CERTBATCH_CHALLTESTSRV_URL:-http://127.0.0.1:8055}

# The values go into JSON unescaped, so only accept what they can legitimately be: DNS names
# (letters, digits, '-', '_', '.') and a base64url TXT value.
case $domain in
    "" | *[!A-Za-z0-9._-]*) die "invalid domain: $domain" ;;
esac
case $record in
    "" | *[!A-Za-z0-9._-]*) die "invalid record name: $record" ;;
esac
case $value in
    "" | *[!A-Za-z0-9_-]*) die "invalid TXT value (expected base64url): $value" ;;
esac
case $url in
    http://* | https://*) ;;
    *) die "CERTBATCH_CHALLTESTSRV_URL must be an http(s) URL: $url" ;;
esac
command -v curl >/dev/null 2>&1 || die "curl is not installed"

# Plain assignments and no command substitution: certbatch runs this once per record and
# action, and every subshell is a fork (a run of 100 certificates makes 400 calls).
case $action in
    add)
        endpoint=set-txt
        body="{\"host\":\"$record\",\"value\":\"$value\"}"
        ;;
    remove)
        endpoint=clear-txt
        body="{\"host\":\"$record\"}"
        ;;
    *) die "unknown action: $action (expected add or remove)" ;;
esac

# curl's own error line goes to stderr first; ours, the last line, is what certbatch reports.
curl --silent --show-error --fail --max-time 10 --output /dev/null \
    --header 'Content-Type: application/json' --data "$body" "${url%/}/$endpoint" ||
    die "$action $record via ${url%/}/$endpoint failed"
