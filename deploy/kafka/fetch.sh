#!/usr/bin/env bash
# Resolve the jars of a single-node Apache Kafka broker into a local cache and print the libs directory.
#
# The Kafka version is pinned in pom.xml next to this script. The jars land in
#   ${CROSSDISTIL_CACHE:-$HOME/.cache/crossdistil}/kafka-<version>/libs
# and a marker file is written only after the copy succeeded, so an interrupted run is redone and a
# completed one returns at once without touching the network.
#
# Usage: bash deploy/kafka/fetch.sh        (stdout: the libs directory, nothing else)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pom="$here/pom.xml"

die() { echo "fetch.sh: $*" >&2; exit 1; }

version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom" | head -n1)"
[ -n "$version" ] || die "could not read <kafka.version> from $pom"

cache="${CROSSDISTIL_CACHE:-$HOME/.cache/crossdistil}/kafka-$version"
libs="$cache/libs"
marker="$cache/.complete"

# The marker records the pom it was made from: editing the pom (say, a new log4j) refetches.
pom_sum="$(cksum < "$pom" | cut -d' ' -f1)"
if [ -f "$marker" ] && [ "$(cat "$marker")" = "$pom_sum" ] && [ -d "$libs" ]; then
    echo "$libs"
    exit 0
fi

command -v java >/dev/null 2>&1 || die "java not found; Kafka $version needs Java 17 or newer (e.g. 'apt-get install openjdk-17-jre-headless')"
java_major="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\)[."].*/\1/p' | head -n1)"
if [ -z "$java_major" ] || [ "$java_major" -lt 17 ]; then
    die "Kafka $version needs Java 17 or newer; 'java -version' reports: $(java -version 2>&1 | head -n1)"
fi
command -v mvn >/dev/null 2>&1 || die "mvn (Apache Maven) not found; it resolves the Kafka jars from Maven Central (e.g. 'apt-get install maven')"

mkdir -p "$cache"
# Several processes (test sessions, the CLI) may fetch at once: one resolves, the others wait and reuse it.
exec 9>"$cache/.lock"
flock 9
if [ -f "$marker" ] && [ "$(cat "$marker")" = "$pom_sum" ] && [ -d "$libs" ]; then
    echo "$libs"
    exit 0
fi
echo "fetch.sh: resolving Apache Kafka $version jars into $libs (about 45 MB, once)" >&2
tmp="$(mktemp -d "$cache/libs.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
# Maven's own output goes to stderr so that stdout carries only the libs directory.
(cd "$here" && mvn -q -B -Dstyle.color=never dependency:copy-dependencies -DoutputDirectory="$tmp" -DincludeScope=runtime) >&2 \
    || die "mvn could not resolve the Kafka jars (see its output above); check access to Maven Central"
ls "$tmp"/kafka_2.13-"$version".jar >/dev/null 2>&1 || die "mvn finished but kafka_2.13-$version.jar is missing from $tmp"

rm -rf "$libs"
mv "$tmp" "$libs"
trap - EXIT
echo "$pom_sum" > "$marker"
echo "$libs"
